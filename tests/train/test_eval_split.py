"""--eval-split: a seeded, stratified share of the training file held out for evaluation."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from oztune.cli import main
from oztune.data.load import hold_out
from oztune.data.readers import Example


def examples(counts: dict) -> list[Example]:
    out = []
    for label, n in counts.items():
        out += [Example(f"{label} text {i}", None, label, 0) for i in range(n)]
    for line, e in enumerate(out, start=2):
        e.line = line
    return out


def test_hold_out_keeps_label_shares_file_order_and_a_training_example_of_each_label():
    ex = examples({"a": 80, "b": 20, "rare": 1})
    train, held = hold_out(ex, 0.25, seed=3)
    assert Counter(e.label for e in held) == {"a": 20, "b": 5}  # the rare label keeps its one example
    assert Counter(e.label for e in train) == {"a": 60, "b": 15, "rare": 1}
    assert {e.line for e in train}.isdisjoint(e.line for e in held)
    assert len(train) + len(held) == len(ex)
    assert [e.line for e in held] == sorted(e.line for e in held)
    assert [e.line for e in train] == sorted(e.line for e in train)


def test_hold_out_is_seeded():
    ex = examples({"a": 50, "b": 50})
    lines = lambda seed: [e.line for e in hold_out(ex, 0.2, seed)[1]]  # noqa: E731
    assert lines(0) == lines(0)
    assert lines(0) != lines(1)


def test_hold_out_without_stratification_takes_a_share_of_all():
    ex = examples({"x": 30, "y": 10})
    train, held = hold_out(ex, 0.5, seed=0, stratify=False)
    assert len(held) == 20 and len(train) == 20  # a share of all examples; the labels' mix is left to chance


def test_finetune_with_eval_split_evaluates_on_held_out_lines(tiny_base, sentiment_files, tmp_path, capsys):
    train, _ = sentiment_files
    out = tmp_path / "m"
    assert main(["finetune", "--train", str(train), "--eval-split", "0.25", "--output", str(out), "--model",
                 str(tiny_base), "--epochs", "2", "--lr", "3e-3", "--batch-size", "16", "--no-progress",
                 "--no-freeze-embeddings", "--patience", "3"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["eval_examples"] == 100 and run["train_examples"] == 300  # 400 lines, a quarter held out
    assert len(run["eval_lines"]) == 100 and len(set(run["eval_lines"])) == 100
    assert "accuracy" in run["metrics"]  # evaluated (not the training loss only)
    stdout = capsys.readouterr().out
    assert "eval metrics" in stdout and "some predictions on the held-out examples" in stdout
    assert "held out from training (--eval-split 0.25)" in (out / "README.md").read_text()


@pytest.mark.parametrize("args, message", [
    (["--eval-split", "1.0"], "--eval-split is the share of training examples held out, in [0, 1)"),
    (["--eval-split", "0.2", "--eval", "EVAL"], "give --eval FILE or --eval-split, not both"),
])
def test_bad_eval_split_is_refused(tiny_base, sentiment_files, tmp_path, capsys, args, message):
    train, dev = sentiment_files
    args = [str(dev) if x == "EVAL" else x for x in args]
    code = main(["finetune", "--train", str(train), "--output", str(tmp_path / "m"), "--model", str(tiny_base), *args])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_an_eval_split_of_too_few_examples_is_refused(tiny_base, tmp_path, capsys):
    train = tmp_path / "t.tsv"
    train.write_text("sentence\tlabel\ngood\tpos\nbad\tneg\nfine\tpos\n")
    code = main(["finetune", "--train", str(train), "--eval-split", "0.1", "--output", str(tmp_path / "m"),
                 "--model", str(tiny_base), "--no-progress"])
    assert code == 2
    assert "holds out none" in capsys.readouterr().err


def test_hold_out_leaves_a_label_of_one_example_in_training():
    ex = [Example(text="r", label="rare", line=2)] + [Example(text=f"t{i}", label="common", line=i + 3)
                                                      for i in range(10)]
    train, held = hold_out(ex, 0.6, 0)
    assert [e.label for e in train].count("rare") == 1 and len(held) == 6


def test_hold_out_holds_out_the_same_positions_whatever_label_comes_first_in_the_file():
    ab = [Example(text=f"t{i}", label=lab, line=i + 2) for i, lab in enumerate(["a", "b"] * 10)]
    ba = [Example(text=f"t{i}", label=lab, line=i + 2) for i, lab in enumerate(["b", "a"] * 10)]
    held_ab, held_ba = hold_out(ab, 0.3, 0)[1], hold_out(ba, 0.3, 0)[1]
    assert (sorted(ab.index(e) // 2 for e in held_ab if e.label == "a")
            == sorted(ba.index(e) // 2 for e in held_ba if e.label == "a"))


def test_finetune_eval_split_keeps_each_labels_share(tiny_base, tmp_path):
    """--eval-split 0.25 of 4 pos and 36 neg rows holds out 1 pos and 9 neg (the documented stratification)."""
    from conftest import write_tsv

    rows = [(f"good film {i}", "pos") for i in range(4)] + [(f"bad film {i}", "neg") for i in range(36)]
    train, out = write_tsv(tmp_path / "t.tsv", rows), tmp_path / "m"
    assert main(["finetune", "--train", str(train), "--output", str(out), "--model", str(tiny_base), "--epochs", "1",
                 "--batch-size", "16", "--no-progress", "--eval-split", "0.25"]) == 0
    lines = json.loads((out / "run.json").read_text())["eval_lines"]
    assert len(lines) == 10 and sum(1 for line in lines if line <= 5) == 1  # (lines 2-5: the pos rows)


def test_the_max_train_examples_sample_follows_the_seed_and_keeps_file_order():
    from oztune.train.finetune import sample

    a, b = sample(list(range(100)), 10, 1), sample(list(range(100)), 10, 2)
    assert a != b and a == sorted(a) and b == sorted(b) and a == sample(list(range(100)), 10, 1)
