"""Multi-label (BCE), regression (MSE) and sentence pairs, end to end through the CLI on tiny models."""

from __future__ import annotations

import json
import random

import pytest

from oztune import Classifier
from oztune.cli import main

FILLER = ["movie", "film", "the", "is", "it", "a"]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_multi_label_learns_each_label(tiny_base, tmp_path, capsys):
    rng = random.Random(0)
    rows = []
    for _ in range(300):
        words = [rng.choice(FILLER) for _ in range(4)]
        labels = []
        if rng.random() < 0.5:
            words.insert(rng.randint(0, 4), "good")
            labels.append("pos")
        if rng.random() < 0.5:
            words.insert(rng.randint(0, 4), "plot")
            labels.append("story")
        rows.append({"text": " ".join(words), "labels": labels})
    train = _jsonl(tmp_path / "train.jsonl", rows)
    out = tmp_path / "m"
    assert main(["finetune", "--train", str(train), "--eval", str(train), "--output", str(out), "--model", str(tiny_base),
                 "--epochs", "6", "--lr", "3e-3", "--batch-size", "16", "--no-progress", "--no-freeze-embeddings",
                 "--pooling", "mean"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["problem_type"] == "multi_label" and run["metrics"]["micro_f1"] > 0.85
    # finetune's closing lines name the predicted and gold labels ("pos, story (0.9, 0.8)"; none: "(none)"), not
    # Python lists with empty parentheses ("[] ()")
    shown = capsys.readouterr().out.split("(reloaded from disk):\n")[1].splitlines()[:5]
    assert any(not r["labels"] for r in rows[:5]) and any(r["labels"] for r in rows[:5])
    for line, p, r in zip(shown, Classifier.from_pretrained(out).predict([r["text"] for r in rows[:5]]), rows):
        pred = f"{', '.join(p['label'])} ({', '.join(f'{s:.3f}' for s in p['score'])})" if p["label"] else "(none)"
        assert line.split() == [*pred.split(), "gold", *(", ".join(r["labels"]) or "(none)").split(),
                                *r["text"].split()]
    preds = Classifier.from_pretrained(out).predict(["good movie", "the plot", "good plot"])
    assert [sorted(p["label"]) for p in preds] == [["pos"], ["story"], ["pos", "story"]]
    wrong = _jsonl(tmp_path / "wrong.jsonl", [{"text": "good movie", "labels": ["story"]},
                                               {"text": "the plot", "labels": ["story"]}])
    m = Classifier.from_pretrained(out).evaluate(str(wrong), per_label=True, mistakes=True)
    assert [(r["line"], r["label"], r["predicted"]) for r in m["mistakes"]] == [(1, ["story"], ["pos"])]
    assert m["per_label"]["story"]["support"] == 2 and m["per_label"]["story"]["recall"] == 0.5
    assert m["per_label"]["pos"]["precision"] == 0.0 and "confusion_matrix" not in m


def test_multi_label_class_ids_with_label_names_show_the_names(tiny_base, tmp_path, capsys):
    """Multi-label class ids named with --label-names: finetune's closing lines give the gold labels by name, as the
    predictions are (they showed the ids, "gold 0, 1" beside "pos, story")."""
    rows = [{"text": t, "labels": l} for t, l in [("good movie", [0]), ("the plot", [1]), ("good plot", [0, 1]),
                                                  ("the movie", [])] * 5]
    train = _jsonl(tmp_path / "train.jsonl", rows)
    out = tmp_path / "m"
    assert main(["finetune", "--train", str(train), "--eval", str(train), "--output", str(out), "--model", str(tiny_base),
                 "--epochs", "1", "--batch-size", "8", "--no-progress", "--label-names", "pos,story"]) == 0
    shown = capsys.readouterr().out.split("(reloaded from disk):\n")[1].splitlines()[:4]
    golds = [line.split("  gold ")[1].rsplit("  ", 1)[0].strip() for line in shown]
    assert golds == ["pos", "story", "pos, story", "(none)"], shown


def test_regression_learns_a_score(tiny_base, tmp_path, capsys):
    rng = random.Random(1)
    rows = []
    for _ in range(300):
        k = rng.randint(0, 3)
        words = ["good"] * k + [rng.choice(FILLER) for _ in range(3)]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "score": k + 0.5})
    train = _jsonl(tmp_path / "train.jsonl", rows)
    out = tmp_path / "m"
    assert main(["finetune", "--train", str(train), "--eval", str(train), "--output", str(out), "--model", str(tiny_base),
                 "--epochs", "8", "--lr", "1e-3", "--batch-size", "16", "--no-progress", "--no-freeze-embeddings",
                 "--pooling", "mean"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["problem_type"] == "regression" and run["metrics"]["pearson"] > 0.8
    # finetune's closing lines show each prediction as a value beside the gold value (there is no label)
    shown = capsys.readouterr().out.split("(reloaded from disk):\n")[1].splitlines()[:5]
    first = Classifier.from_pretrained(out).predict([rows[0]["text"]])[0]["score"]
    assert shown[0].split() == [f"{first:.3f}", "gold", f"{rows[0]['score']:.3f}", *rows[0]["text"].split()]
    assert not any("None" in line for line in shown)
    lo, hi = Classifier.from_pretrained(out).predict(["movie film", "good good good film"])
    assert lo["score"] < hi["score"]
    assert main(["evaluate", "--model", str(out), "--data", str(train), "--per-label"]) == 2  # no labels: refused
    assert main(["evaluate", "--model", str(out), "--data", str(train), "--mistakes", str(tmp_path / "w.jsonl")]) == 2
    assert not (tmp_path / "w.jsonl").exists()


def test_sentence_pairs_use_both_texts(tiny_base, tmp_path, capsys):
    rng = random.Random(2)
    lines = ["sentence1\tsentence2\tlabel"]
    for _ in range(300):
        a, b = rng.choice(["good", "bad"]), rng.choice(["good", "bad"])
        lines.append(f"the {a} movie\tit is {b}\t{b}")  # only the second text decides
    train = tmp_path / "pairs.tsv"
    train.write_text("\n".join(lines) + "\n")
    out = tmp_path / "m"
    assert main(["finetune", "--train", str(train), "--eval", str(train), "--output", str(out), "--model", str(tiny_base),
                 "--epochs", "8", "--lr", "3e-3", "--batch-size", "16", "--no-progress", "--no-freeze-embeddings"]) == 0
    assert json.loads((out / "run.json").read_text())["metrics"]["accuracy"] > 0.9
    # finetune's closing lines show both texts of a pair: the label hangs on the second one here
    shown = capsys.readouterr().out.split("(reloaded from disk):\n")[1].splitlines()[:5]
    for line, row in zip(shown, lines[1:]):
        a, b, label = row.split("\t")
        assert line.endswith(f"gold {label:>8}  {a} | {b}"), line
    preds = Classifier.from_pretrained(out).predict(["the good movie", "the bad movie"], ["it is bad", "it is good"])
    assert [p["label"] for p in preds] == ["bad", "good"]


def test_correlations_of_constant_predictions_are_0_with_a_note(tiny_hf_dir, tmp_path, capsys):
    """Pearson and Spearman are undefined when the predictions (or the gold scores) are all the same: the
    metrics say 0 (a number in every JSON) and a note says why, instead of a 0 that looks like a weak model."""
    import torch

    from conftest import tiny_hf_model, write_tiny_tokenizer

    hf = tiny_hf_model("bert", num_labels=1, problem_type="regression")
    with torch.no_grad():
        hf.classifier.weight.zero_()
        hf.classifier.bias.fill_(0.5)  # 0.5 whatever the text
    hf.save_pretrained(tmp_path / "m")
    write_tiny_tokenizer(tmp_path / "m", 64)
    data = _jsonl(tmp_path / "d.jsonl", [{"text": t, "score": s} for t, s in [("good", 1.0), ("bad film", 0.0),
                                                                              ("the plot", 0.5)]])
    assert main(["evaluate", "--model", str(tmp_path / "m"), "--data", str(data), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["pearson"] == 0.0 and out["spearman"] == 0.0
    assert out["note"] == "the predictions are all the same (0.5): pearson and spearman are undefined, given as 0"
    assert main(["evaluate", "--model", str(tmp_path / "m"), "--data", str(data)]) == 0
    assert "note: the predictions are all the same (0.5)" in capsys.readouterr().out
    same = _jsonl(tmp_path / "same.jsonl", [{"text": t, "score": 2.0} for t in ["good", "bad film"]])
    assert main(["evaluate", "--model", str(tmp_path / "m"), "--data", str(same), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["note"].startswith("the predictions are all the same")
    hf.classifier.weight.data.normal_()  # predictions that differ, gold scores that do not
    hf.save_pretrained(tmp_path / "m")
    assert main(["evaluate", "--model", str(tmp_path / "m"), "--data", str(same), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["note"] == ("the gold scores are all the same (2): pearson and spearman "
                                                           "are undefined, given as 0")
    assert main(["evaluate", "--model", str(tmp_path / "m"), "--data", str(data), "--json"]) == 0
    assert "note" not in json.loads(capsys.readouterr().out)


def test_what_only_classification_has_is_refused_for_regression_in_one_wording(tiny_hf_dir, tmp_path, capsys):
    """--all-scores printed {"label": null, "score": ...} and --per-label printed the metrics alone: both silently
    ignored, while --mistakes was refused. All three are refused alike, before the model runs."""
    from conftest import tiny_hf_model, write_tiny_tokenizer

    hf = tiny_hf_model("bert", num_labels=1, problem_type="regression")
    hf.save_pretrained(tmp_path / "m")
    write_tiny_tokenizer(tmp_path / "m", 64)
    model = str(tmp_path / "m")
    data = _jsonl(tmp_path / "d.jsonl", [{"text": t, "score": s} for t, s in [("good", 1.0), ("bad film", 0.0)]])
    capsys.readouterr()  # (save_pretrained's progress)
    for argv, what in [(["predict", "--model", model, "good film", "--all-scores"], "every label's score (--all-scores)"),
                       (["evaluate", "--model", model, "--data", str(data), "--per-label"],
                        "a per-label report (--per-label)"),
                       (["evaluate", "--model", model, "--data", str(data), "--mistakes", str(tmp_path / "w.jsonl")],
                        "listing mistakes (--mistakes)")]:
        assert main(argv) == 2, argv
        out, err = capsys.readouterr()
        assert out == "" and err.strip().splitlines() == [
            f"oztune {argv[0]}: error: {what} is for classification models; this one is a regression model"], (argv, err)
    assert main(["predict", "--model", model, "good film"]) == 0  # (without them: as before)
    assert set(json.loads(capsys.readouterr().out)) == {"label", "score"}
    clf = Classifier.from_pretrained(model)
    import pytest

    with pytest.raises(Exception, match="is for classification models"):
        clf.predict(["good"], all_scores=True)
    with pytest.raises(Exception, match="is for classification models"):
        clf.evaluate(str(data), per_label=True)


@pytest.mark.parametrize("given", [[], ["--problem-type", "regression"]])
def test_label_names_on_a_regression_task_are_refused(tiny_base, tmp_path, capsys, given):
    """--label-names score was taken for a regression run (its one output named "score") though the option names
    integer class ids ("Only for integer labels"): refused before any work, whether the problem type is given
    or read from the file."""
    train = _jsonl(tmp_path / "train.jsonl", [{"text": f"t {i}", "score": i + 0.5} for i in range(6)])
    out = tmp_path / "m"
    assert main(["finetune", "--train", str(train), "--output", str(out), "--model", str(tiny_base),
                 "--epochs", "1", "--no-progress", "--label-names", "score", *given]) == 2
    err = capsys.readouterr().err.strip()
    assert "--label-names score names integer class ids, but " in err and "drop --label-names" in err, err
    assert len(err.splitlines()) == 1 and not out.exists()
