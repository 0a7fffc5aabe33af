"""Tests that kill mutations of the code which the rest of the suite let through (a mutation audit)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from oztune.errors import ModelError, OztuneError


def _fixed(tiny_base, problem_type, id2label, logits):
    """A Predictor whose logits are fixed (no model): evaluate/_mistakes run on them."""
    from oztune.api import Predictor
    from oztune.data.tokenize import TextEncoder

    class Fixed(Predictor):
        encoder, batch_size = TextEncoder.from_dir(tiny_base, 32), 8

        def encoded_logits(self, data):
            return np.array(logits, dtype=np.float32)

    f = Fixed()
    f.id2label, f.problem_type = id2label, problem_type
    return f


def test_single_label_mistake_score_is_the_predicted_labels_probability(tiny_base, tmp_path):
    f = tmp_path / "gold.jsonl"
    f.write_text('{"text": "good movie", "label": "a"}\n{"text": "bad plot", "label": "c"}\n')
    logits = [[0.0, 3.0, 1.0], [2.0, 0.0, 0.0]]  # predicted b (gold a), a (gold c)
    out = _fixed(tiny_base, "single_label", {0: "a", 1: "b", 2: "c"}, logits).evaluate(str(f), mistakes=True)
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    assert [(m["label"], m["predicted"]) for m in out["mistakes"]] == [("a", "b"), ("c", "a")]
    assert [m["score"] for m in out["mistakes"]] == pytest.approx([probs[0].max(), probs[1].max()], rel=1e-5)


def test_multi_label_mistake_with_one_label_wrong_is_listed(tiny_base, tmp_path):
    f = tmp_path / "gold.jsonl"
    f.write_text('{"text": "good movie", "label": ["a", "b"]}\n{"text": "bad plot", "label": ["a"]}\n')
    logits = [[3.0, -3.0], [3.0, -3.0]]  # first example: a right, b missed
    out = _fixed(tiny_base, "multi_label", {0: "a", 1: "b"}, logits).evaluate(str(f), mistakes=True)
    assert [(m["line"], m["label"], m["predicted"]) for m in out["mistakes"]] == [(1, ["a", "b"], ["a"])]


def test_mistakes_carry_text_pair_only_when_there_is_one(tiny_base, tmp_path):
    f = tmp_path / "gold.jsonl"
    f.write_text('{"text": "good movie", "label": "a"}\n{"text": "bad plot", "label": "b"}\n')
    out = _fixed(tiny_base, "single_label", {0: "a", 1: "b"}, [[0.0, 2.0], [2.0, 0.0]]).evaluate(str(f), mistakes=True)
    assert len(out["mistakes"]) == 2 and all("text_pair" not in m for m in out["mistakes"])
    g = tmp_path / "pairs.jsonl"
    g.write_text('{"text": "good movie", "text_pair": "the plot", "label": "a"}\n')
    from oztune.data.load import Columns

    out = _fixed(tiny_base, "single_label", {0: "a", 1: "b"}, [[0.0, 2.0]]).evaluate(
        str(g), Columns(text_pair="text_pair"), mistakes=True)
    assert out["mistakes"][0]["text_pair"] == "the plot"


def _eval_args(**kw):
    from oztune.commands import EvaluateArgs

    return EvaluateArgs(**{"model": "m", "data": "d.tsv", "json": True, **kw})


def test_bad_mistakes_path_is_refused_before_the_model_is_loaded(tmp_path, monkeypatch):
    import oztune.commands as commands

    monkeypatch.setattr(commands, "_open", lambda *a: pytest.fail("the model was loaded before the check"))
    with pytest.raises(OztuneError, match="does not exist"):
        commands.evaluate_cmd(_eval_args(mistakes=str(tmp_path / "no" / "such" / "wrong.jsonl")))


def test_no_mistakes_still_replaces_the_old_mistakes_file(tmp_path, monkeypatch, capsys):
    import oztune.commands as commands

    class Perfect:
        def evaluate(self, *a, **kw):
            return {"accuracy": 1.0, "examples": 3, "mistakes": []}

    monkeypatch.setattr(commands, "_open", lambda *a: Perfect())
    out = tmp_path / "wrong.jsonl"
    out.write_text('{"stale": "from an older run"}\n')
    assert commands.evaluate_cmd(_eval_args(mistakes=str(out))) == 0
    assert out.read_text() == ""
    assert json.loads(capsys.readouterr().out) == {"accuracy": 1.0, "examples": 3}


def test_a_failed_atomic_write_leaves_no_temporary_file(tmp_path):
    from oztune.commands import _write_atomically

    target = tmp_path / "out"
    target.mkdir()  # os.replace onto a directory fails after the temporary file is written
    with pytest.raises(OztuneError, match="cannot be written"):
        _write_atomically(str(target), "x\n", "--mistakes")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _report(n):
    names = [f"l{i}" for i in range(n)]
    per = {k: {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1} for k in names}
    return {"per_label": per, "confusion_matrix": [[i * n + j for j in range(n)] for i in range(n)]}


def test_confusion_matrix_is_printed_up_to_max_matrix_labels(capsys):
    from oztune.commands import MAX_MATRIX_LABELS, _print_label_report

    _print_label_report(_report(MAX_MATRIX_LABELS))
    assert "confusion matrix (rows" in capsys.readouterr().out
    _print_label_report(_report(MAX_MATRIX_LABELS + 1))
    assert "confusion matrix (rows" not in capsys.readouterr().out


def test_printed_confusion_matrix_rows_are_gold_labels(capsys):
    from oztune.commands import _print_label_report

    _print_label_report({"per_label": _report(2)["per_label"] | {}, "confusion_matrix": [[7, 1], [30, 500]]})
    lines = capsys.readouterr().out.splitlines()
    rows = {ln.split()[0]: ln.split()[1:] for ln in lines[lines.index(
        "  confusion matrix (rows: gold label, columns: predicted)") + 2:] if ln.strip()}
    assert rows == {"l0": ["7", "1"], "l1": ["30", "500"]}


def test_a_multi_label_report_has_each_labels_ece_column(capsys):
    from oztune.commands import _print_label_report

    per = {"toxic": {"precision": 0.5, "recall": 1.0, "f1": 0.6667, "support": 4, "ece": 0.1751},
           "spam": {"precision": 1.0, "recall": 0.5, "f1": 0.6667, "support": 2, "ece": 0.0125}}
    _print_label_report({"per_label": per})
    lines = capsys.readouterr().out.split("\n")
    header = next(ln for ln in lines if "precision" in ln)
    assert header.split() == ["label", "precision", "recall", "f1", "support", "ece"]
    assert [ln.split()[-1] for ln in lines if ln.split()[:1] in (["toxic"], ["spam"])] == ["0.1751", "0.0125"]
    _print_label_report(_report(2))  # single-label rows: no such column
    assert "ece" not in capsys.readouterr().out


def test_bert_relative_position_embeddings_are_refused(tiny_hf_dir):
    from oztune.models.hub import load_classifier

    d, _ = tiny_hf_dir("bert")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "position_embedding_type": "relative_key"}))
    with pytest.raises(ModelError, match="position_embedding_type"):
        load_classifier(d)


def test_native_config_with_inconsistent_layer_lists_is_a_model_error(tiny_base, tmp_path):
    from oztune.models.hub import load_classifier, save_classifier

    model, enc, _ = load_classifier(tiny_base, num_labels=2)
    out = save_classifier(model, enc, tmp_path / "m", {0: "a", 1: "b"})
    cfg = json.loads((out / "config.json").read_text())
    cfg.setdefault("oztune", {})["model"] = {**model.cfg.to_dict(), "layer_heads": [4]}  # 2 layers, 1 entry
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="cannot use"):
        load_classifier(out)


def test_gpt2_byte_level_vocab_with_s_tokens_gets_no_roberta_processing(tmp_path):
    from oztune.data.tokenize import _load_tokenizer

    vocab = {"<s>": 0, "</s>": 1, "<|endoftext|>": 2, **{chr(c): 3 + i for i, c in enumerate(range(97, 123))}}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert _load_tokenizer(tmp_path).encode("abc").ids == [3, 4, 5]
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "roberta"}))
    assert _load_tokenizer(tmp_path).encode("abc").ids == [0, 3, 4, 5, 1]


def test_epoch_end_checkpoint_is_written_once_after_its_evaluation(tiny_base, sentiment_files, tmp_path, monkeypatch):
    from oztune.data.load import Columns, encode_examples, label_setup, read_labelled
    from oztune.models.hub import load_classifier
    from oztune.train.checkpoint import Checkpointer
    from oztune.train.loop import TrainConfig, fit, seed_everything

    tr = read_labelled(str(sentiment_files[0]), Columns())[:32]
    ev = read_labelled(str(sentiment_files[1]), Columns())[:16]
    problem, label2id = label_setup(tr, None)
    seed_everything(0)
    model, enc, _ = load_classifier(tiny_base, num_labels=2, problem_type=problem)
    train, dev = (encode_examples(x, enc, label2id, problem, "d") for x in (tr, ev))
    saves = []
    real = Checkpointer.save_run

    def spy(self, model, opt, sched, run, env):
        saves.append((run.step, run.epoch, len(run.history)))
        return real(self, model, opt, sched, run, env)

    monkeypatch.setattr(Checkpointer, "save_run", spy)
    cfg = TrainConfig(epochs=2, batch_size=8, lr=3e-3, precision="fp32", progress=False,
                      checkpoint_dir=str(tmp_path / "ck"), checkpoint_every=2)
    fit(model, train, cfg, dev)  # 4 steps per epoch: saves at steps 2, 4 (epoch end), 6, 8 (epoch end)
    assert saves == [(2, 0, 0), (4, 1, 1), (6, 1, 1), (8, 2, 2)]
