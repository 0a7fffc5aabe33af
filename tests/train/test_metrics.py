"""oztune's numpy metrics, and their agreement with scikit-learn and scipy (dev dependencies: imported, so that a
missing one fails here; skipped when missing, they took every test of this file with them, those needing neither)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.stats as stats
import sklearn.metrics as sk

from oztune.train.metrics import classification_metrics, compute_metrics, multilabel_metrics, regression_metrics


@pytest.mark.parametrize("seed", range(5))
def test_classification_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    gold, pred = rng.integers(0, 4, 200), rng.integers(0, 4, 200)
    pred[:100] = gold[:100]
    m = classification_metrics(pred, gold, 4)
    assert m["accuracy"] == pytest.approx(sk.accuracy_score(gold, pred))
    assert m["macro_f1"] == pytest.approx(sk.f1_score(gold, pred, average="macro"))
    assert m["mcc"] == pytest.approx(sk.matthews_corrcoef(gold, pred))


def test_multilabel_matches_sklearn():
    rng = np.random.default_rng(0)
    gold, pred = rng.random((100, 5)) > 0.6, rng.random((100, 5)) > 0.5
    m = multilabel_metrics(pred, gold)
    assert m["micro_f1"] == pytest.approx(sk.f1_score(gold, pred, average="micro"))
    assert m["macro_f1"] == pytest.approx(sk.f1_score(gold, pred, average="macro", zero_division=0))
    assert m["subset_accuracy"] == pytest.approx(sk.accuracy_score(gold, pred))


def test_regression_matches_scipy_with_ties():
    rng = np.random.default_rng(1)
    gold = rng.integers(0, 5, 80).astype(float)  # many ties
    pred = gold + rng.normal(0, 1, 80)
    m = regression_metrics(pred, gold)
    assert m["pearson"] == pytest.approx(stats.pearsonr(pred, gold)[0])
    assert m["spearman"] == pytest.approx(stats.spearmanr(pred, gold)[0])
    assert m["mse"] == pytest.approx(float(((pred - gold) ** 2).mean()))


def test_compute_metrics_from_logits():
    logits = np.array([[2.0, 0.1], [0.2, 1.0], [3.0, -1.0]])
    assert compute_metrics("single_label", logits, np.array([0, 1, 1]))["accuracy"] == pytest.approx(2 / 3)


def test_macro_f1_averages_the_labels_present_only():
    from oztune.train.metrics import classification_metrics

    got = classification_metrics(np.array([0, 0, 1, 1]), np.array([0, 0, 1, 1]), 3)  # label 2 never appears
    assert got == {"accuracy": 1.0, "macro_f1": 1.0, "mcc": 1.0}
    got = classification_metrics(np.array([2, 0, 1, 1]), np.array([0, 0, 1, 1]), 3)  # predicted once, wrongly
    assert got["macro_f1"] == pytest.approx((2 / 3 + 1 + 0) / 3)


@pytest.mark.parametrize("seed", range(3))
def test_label_report_matches_sklearn_single_label(seed):
    from oztune.train.metrics import label_report

    rng = np.random.default_rng(seed)
    gold = rng.integers(0, 4, 150)
    gold[gold == 3] = 2  # label 3 never gold: its recall and support are 0
    logits = rng.normal(size=(150, 4))
    logits[:70, :] = 0
    logits[np.arange(70), gold[:70]] = 5  # the first 70 right
    pred = logits.argmax(-1)
    r = label_report("single_label", logits, gold, {0: "a", 1: "b", 2: "c", 3: "d"})
    p, rc, f, s = sk.precision_recall_fscore_support(gold, pred, labels=[0, 1, 2, 3], zero_division=0)
    assert list(r["per_label"]) == ["a", "b", "c", "d"]
    for i, name in enumerate("abcd"):
        row = r["per_label"][name]
        assert (row["precision"], row["recall"], row["f1"]) == pytest.approx((p[i], rc[i], f[i]))
        assert row["support"] == s[i]
    assert r["confusion_matrix"] == sk.confusion_matrix(gold, pred, labels=[0, 1, 2, 3]).tolist()


def test_label_report_matches_sklearn_multi_label():
    from oztune.train.metrics import label_report

    rng = np.random.default_rng(1)
    gold = (rng.random((80, 3)) > 0.5).astype(np.float32)
    logits = rng.normal(size=(80, 3))
    r = label_report("multi_label", logits, gold, {0: "x", 1: "y", 2: "z"})
    p, rc, f, s = sk.precision_recall_fscore_support(gold > 0.5, logits > 0, zero_division=0)
    assert [r["per_label"][n]["f1"] for n in "xyz"] == pytest.approx(f)
    assert [r["per_label"][n]["precision"] for n in "xyz"] == pytest.approx(p)
    assert [r["per_label"][n]["recall"] for n in "xyz"] == pytest.approx(rc)
    assert [r["per_label"][n]["support"] for n in "xyz"] == list(s)
    assert "confusion_matrix" not in r
    from oztune.train.metrics import calibration_metrics  # each label's ECE, of its own decisions

    eces = [r["per_label"][n]["ece"] for n in "xyz"]
    assert eces == pytest.approx([calibration_metrics(logits[:, [i]], gold[:, [i]], "multi_label")["ece"]
                                  for i in range(3)], rel=1e-12)
    assert len(set(eces)) == 3 and "ece" not in label_report("single_label", logits, gold.argmax(-1), {})["per_label"][
        "0"]
    assert label_report("regression", logits[:, :1], gold[:, 0], {}) == {}


@pytest.mark.parametrize("n", [3, 7, 10])
def test_correlations_of_constant_predictions_and_gold_are_0_as_the_note_says(n):
    """The mean of n copies of 0.1 (float64) is not exactly 0.1: centred, both sides are a constant residue
    whose correlation came out 1.0, beside a note saying it is given as 0."""
    m = regression_metrics(np.full(n, 0.1), np.full(n, 0.7))
    assert (m["pearson"], m["spearman"]) == (0.0, 0.0)
    assert m["note"].startswith("the predictions are all the same (0.1)")
    m = regression_metrics(np.full(n, 0.3), np.arange(n, dtype=float))  # only the predictions constant
    assert (m["pearson"], m["spearman"]) == (0.0, 0.0)


def test_macro_f1_leaves_out_a_label_absent_from_gold_and_predictions():
    """As scikit-learn's f1_score(average="macro") over the labels present: (2/3 + 0.8) / 2, not a perfect F1
    of 1 for a label that occurs nowhere."""
    m = classification_metrics(np.array([0, 1, 1, 1]), np.array([0, 0, 1, 1]), 3)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)


def test_a_multi_label_logit_of_exactly_zero_is_off():
    assert compute_metrics("multi_label", np.array([[0.0, 1.0]], dtype=np.float32),
                           np.array([[0.0, 1.0]]))["subset_accuracy"] == 1.0


def test_metric_values_keeps_float_metrics_but_not_a_fractional_epoch():
    """An evaluation inside an epoch has a float epoch: it is no metric (printed, logged to TensorBoard)."""
    from oztune.train.metrics import metric_values

    entry = {"epoch": 1.5, "step": 30, "accuracy": 0.75, "train_loss": 0.25, "note": "text"}
    assert metric_values(entry) == {"accuracy": 0.75, "train_loss": 0.25}


def test_constant_gold_scores_give_correlations_0_even_against_nearly_constant_predictions():
    """Centred on its rounded mean, n copies of 0.1 leave a constant residue; against predictions that differ in
    their last bit only, that residue correlated at -0.58 instead of the 0 the note promises."""
    pred = np.array([1.0, 1.0, 1.0 + 2.2e-16])
    m = regression_metrics(pred, np.full(3, 0.1))
    assert (m["pearson"], m["spearman"]) == (0.0, 0.0)
    assert m["note"].startswith("the gold scores are all the same (0.1)")


def test_label_report_names_a_label_missing_from_id2label_by_its_index_as_text():
    from oztune.train.metrics import label_report

    logits = np.array([[0.0, 0.0, 3.0], [3.0, 0.0, 0.0]])
    r = label_report("single_label", logits, np.array([2, 0]), {0: "a", 1: "b"})
    assert list(r["per_label"]) == ["a", "b", "2"]
    assert r["per_label"]["2"]["support"] == 1


def test_calibration_by_hand():
    from oztune.train.metrics import calibration_metrics

    three = np.log(3.0)
    # both predictions say 0.75 (one bin), one is right: accuracy 0.5 against confidence 0.75
    logits = np.array([[0.0, three], [three, 0.0]])
    m = calibration_metrics(logits, np.array([1, 1]))
    assert m["ece"] == pytest.approx(0.25)
    assert m["log_loss"] == pytest.approx(-(np.log(0.75) + np.log(0.25)) / 2)
    # four at 0.75, three right: calibrated
    four = np.array([[0.0, three]] * 4)
    assert calibration_metrics(four, np.array([1, 1, 1, 0]))["ece"] == pytest.approx(0.0, abs=1e-12)
    # bins are weighted by their share: 0.75 right (gap 0.25), and two at 0.99 both right (gap 0.01 each)
    sure = np.log(99.0)
    m = calibration_metrics(np.array([[0.0, three], [sure, 0.0], [0.0, sure]]), np.array([1, 0, 1]))
    assert m["ece"] == pytest.approx((0.25 + 2 * 0.01) / 3)
    assert calibration_metrics(np.zeros((0, 2)), np.zeros(0)) == {"log_loss": 0.0, "ece": 0.0}


@pytest.mark.parametrize("seed", range(3))
def test_calibration_log_loss_matches_sklearn_and_ece_a_loop(seed):
    from oztune.train.metrics import CALIBRATION_BINS, calibration_metrics

    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, (300, 4)).astype(np.float32)
    gold = rng.integers(0, 4, 300)
    m = calibration_metrics(logits, gold)
    p = np.exp(logits.astype(np.float64) - logits.max(1, keepdims=True))  # (float64: sklearn clips at its eps)
    p /= p.sum(1, keepdims=True)
    assert m["log_loss"] == pytest.approx(sk.log_loss(gold, p, labels=range(4)), rel=1e-5)
    conf, right, ece = p.max(1), p.argmax(1) == gold, 0.0  # the textbook loop over the bins
    for i in range(CALIBRATION_BINS):
        lo, hi = i / CALIBRATION_BINS, (i + 1) / CALIBRATION_BINS
        inside = (conf >= lo) & ((conf < hi) if i < CALIBRATION_BINS - 1 else (conf <= hi))
        if inside.any():
            ece += inside.mean() * abs(right[inside].mean() - conf[inside].mean())
    assert m["ece"] == pytest.approx(ece, rel=1e-5, abs=1e-9)


def test_multi_label_calibration_is_over_every_yes_no_decision():
    from oztune.train.metrics import CALIBRATION_BINS, calibration_metrics, evaluation_metrics

    three = np.log(3.0)
    m = calibration_metrics(np.array([[three, -three]]), np.array([[1.0, 0.0]]), "multi_label")
    assert m["ece"] == pytest.approx(0.25) and m["log_loss"] == pytest.approx(-np.log(0.75))  # both right at 0.75
    rng = np.random.default_rng(3)
    logits, gold = rng.normal(0, 3, (200, 4)), (rng.random((200, 4)) < 0.4).astype(float)
    m = evaluation_metrics("multi_label", logits, gold)
    p = 1 / (1 + np.exp(-logits.ravel()))
    assert m["log_loss"] == pytest.approx(sk.log_loss(gold.ravel(), p, labels=[0, 1]), rel=1e-6)
    conf, right, ece = np.maximum(p, 1 - p), (p > 0.5) == (gold.ravel() > 0.5), 0.0
    for i in range(CALIBRATION_BINS):
        lo, hi = i / CALIBRATION_BINS, (i + 1) / CALIBRATION_BINS
        inside = (conf >= lo) & ((conf < hi) if i < CALIBRATION_BINS - 1 else (conf <= hi))
        if inside.any():
            ece += inside.mean() * abs(right[inside].mean() - conf[inside].mean())
    assert m["ece"] == pytest.approx(ece, rel=1e-6, abs=1e-9) and "micro_f1" in m
    assert "ece" not in evaluation_metrics("regression", logits[:, :1], gold[:, 0])


@pytest.mark.parametrize("problem_type", ["single_label", "multi_label"])
def test_reliability_bins_count_every_decision_and_give_the_ece(problem_type):
    """The diagram's data: each bin's count, mean confidence and share right; the count-weighted mean of their
    gaps is calibration_metrics' ECE; an empty bin is None, not nan (JSON)."""
    from oztune.train.metrics import CALIBRATION_BINS, calibration_metrics, reliability

    rng = np.random.default_rng(5)
    logits = rng.normal(0, 2, (120, 3))
    gold = (rng.random((120, 3)) < 0.5).astype(float) if problem_type == "multi_label" else rng.integers(0, 3, 120)
    r = reliability(logits, gold, problem_type)
    assert len(r["count"]) == CALIBRATION_BINS and len(r["edges"]) == CALIBRATION_BINS + 1
    assert sum(r["count"]) == (360 if problem_type == "multi_label" else 120)
    full = [i for i, c in enumerate(r["count"]) if c]
    assert all(r["edges"][i] <= r["confidence"][i] <= r["edges"][i + 1] for i in full)
    empty = [i for i, c in enumerate(r["count"]) if not c]
    assert empty and all(r["accuracy"][i] is None and r["confidence"][i] is None for i in empty)  # (below 1/3)
    ece = sum(r["count"][i] * abs(r["accuracy"][i] - r["confidence"][i]) for i in full) / sum(r["count"])
    assert ece == pytest.approx(calibration_metrics(logits, gold, problem_type)["ece"], rel=1e-9)
    json.dumps(r)  # as it is
