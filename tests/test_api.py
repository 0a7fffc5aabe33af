"""The Python API: predictions carry the right label names and scores; a lone text and pair are one example."""

from __future__ import annotations

import numpy as np
import pytest

from oztune.api import Classifier, format_predictions
from oztune.models.hub import load_classifier

ID2LABEL = {0: "c", 1: "a", 2: "b"}  # names not in id order: a mix-up of ids and names shows


def test_single_label_predictions_name_the_argmax_and_every_score():
    probs = np.array([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]], dtype=np.float32)
    got = format_predictions(np.log(probs), "single_label", ID2LABEL, all_scores=True)
    assert [(r["label"], r["score"]) for r in got] == [("a", pytest.approx(0.5)), ("c", pytest.approx(0.6))]
    for r, p in zip(got, probs):
        assert r["scores"] == {ID2LABEL[i]: pytest.approx(float(v)) for i, v in enumerate(p)}
    assert "scores" not in format_predictions(np.log(probs), "single_label", ID2LABEL)[0]


def test_a_near_tie_is_the_label_of_the_logits_argmax_as_in_the_metrics():
    """Logits 1e-8 apart have equal float32 probabilities: predict (and evaluate --mistakes) took the first label
    where the metrics' argmax of the logits took the second, so the mistakes listed were not the ones counted."""
    logits = np.array([[0.0, 1e-8, -5.0]], dtype=np.float32)
    got = format_predictions(logits, "single_label", ID2LABEL)
    assert got[0]["label"] == "a" and got[0]["score"] == pytest.approx(0.5, abs=1e-2)


def test_multi_label_predictions_pair_each_label_with_its_own_probability():
    probs = np.array([[0.9, 0.2, 0.7], [0.1, 0.4, 0.2]], dtype=np.float32)
    got = format_predictions(np.log(probs / (1 - probs)), "multi_label", ID2LABEL, all_scores=True)
    assert got[0]["label"] == ["c", "b"] and got[0]["score"] == [pytest.approx(0.9), pytest.approx(0.7)]
    assert got[1]["label"] == [] and got[1]["score"] == []
    assert got[1]["scores"] == {"c": pytest.approx(0.1), "a": pytest.approx(0.4), "b": pytest.approx(0.2)}


def test_regression_predictions_are_the_value():
    got = format_predictions(np.array([[2.5]], dtype=np.float32), "regression", {0: "value"}, all_scores=True)
    assert got == [{"label": None, "score": 2.5}]


def test_a_lone_text_and_pair_are_one_example(tiny_base):
    model, enc, _ = load_classifier(tiny_base, num_labels=2)
    clf = Classifier(model, enc, {0: "neg", 1: "pos"})
    one = clf.predict("good movie", "the plot was dull")
    assert len(one) == 1 and one == clf.predict(["good movie"], ["the plot was dull"])
    assert one != clf.predict(["good movie"], ["t"])  # the pair is read, not ignored
    with pytest.raises(ValueError, match="2 texts but 1 text_pairs"):
        clf.predict(["a", "b"], ["c"])


def test_multi_label_mistakes_agree_with_the_metrics(tiny_base, tmp_path):
    """A logit just above 0 is a predicted label for the metrics and for the mistakes alike."""
    import numpy as np

    from oztune.api import Predictor
    from oztune.data.tokenize import TextEncoder

    class Fixed(Predictor):
        encoder, id2label, problem_type, batch_size = TextEncoder.from_dir(tiny_base, 32), {0: "a", 1: "b"}, "multi_label", 8

        def encoded_logits(self, data):
            return np.array([[0.0, 4.0], [4.0, -4.0]], dtype=np.float32)

    f = tmp_path / "gold.jsonl"
    f.write_text('{"text": "good movie", "label": ["b"]}\n{"text": "bad plot", "label": ["a"]}\n')
    out = Fixed().evaluate(str(f), per_label=True, mistakes=True)
    assert out["subset_accuracy"] == 1.0 and out["per_label"]["a"]["precision"] == 1.0
    assert out["mistakes"] == []


def test_multi_label_predict_puts_a_label_on_by_the_rule_of_the_metrics(tiny_hf_dir, tmp_path):
    """predict put a label on at probability >= 0.5, the metrics and evaluate --mistakes at logit > 0: a logit of 0
    (or -3e-8, whose sigmoid is 0.5 in fp32) was a label predict gave and a mistake evaluate listed."""
    d, _ = tiny_hf_dir("bert", num_labels=4, problem_type="multi_label_classification")
    clf = Classifier.from_pretrained(d)
    crafted = np.array([[0.0, -3e-8, 3e-8, 1.0]], dtype=np.float32)
    clf.encoded_logits = lambda data: np.repeat(crafted, len(data), 0)
    assert clf.predict(["good movie"])[0]["label"] == ["LABEL_2", "LABEL_3"]
    data = tmp_path / "eval.tsv"
    data.write_text("sentence\tlabel\ngood movie\tLABEL_2|LABEL_3\n")
    metrics = clf.evaluate(str(data), mistakes=True)
    assert metrics["mistakes"] == [] and metrics["subset_accuracy"] == 1.0


def test_evaluate_lists_as_mistakes_the_rows_its_metrics_count_wrong_on_a_near_tie(tiny_base, tmp_path):
    """Every text scored [0, 1e-8]: the metrics' argmax is "pos" everywhere (the neg row wrong), but --mistakes
    and predict took the argmax of equal float32 probabilities, "neg": the two pos rows were listed instead."""
    import torch

    from conftest import write_tsv

    model, enc, _ = load_classifier(tiny_base, num_labels=2)
    with torch.no_grad():
        model.head.out.weight.zero_()
        model.head.out.bias.copy_(torch.tensor([0.0, 1e-8]))
    clf = Classifier(model, enc, {0: "neg", 1: "pos"})
    data = write_tsv(tmp_path / "dev.tsv", [("a good film", "pos"), ("a fine cast", "pos"), ("a dull plot", "neg")])
    report = clf.evaluate(str(data), per_label=True, mistakes=True)
    assert report["accuracy"] == pytest.approx(2 / 3)
    assert [(m["text"], m["predicted"]) for m in report["mistakes"]] == [("a dull plot", "pos")]
    assert [p["label"] for p in clf.predict(["a good film", "a dull plot"])] == ["pos", "pos"]


@pytest.mark.parametrize("method", ["predict", "logits"])
def test_the_type_hints_take_one_string_or_any_iterable_of_strings(method):
    """A type checker reads the hints: ``clf.predict("text")`` and a generator of texts are what the docstrings
    promise (hinted list[str], mypy flagged a user's script)."""
    import collections.abc
    import typing

    from oztune.api import Predictor

    hints = typing.get_type_hints(getattr(Predictor, method))
    for name in ("texts", "text_pairs"):
        allowed = typing.get_args(hints[name])
        assert str in allowed and collections.abc.Iterable[str] in allowed, (name, hints[name])
