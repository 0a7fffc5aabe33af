"""Multi-label metrics where there is nothing to find: scikit-learn's ``zero_division=1.0`` (checked against it
where it is installed). Predicting no label for examples that have none is a perfect answer, not a 0."""

from __future__ import annotations

import numpy as np
import pytest

from oztune.train.metrics import compute_metrics, label_report, multilabel_metrics

NO_LABELS = np.zeros((4, 3), dtype=bool)


def test_predicting_no_label_where_there_is_none_scores_1():
    """micro_f1 (early stopping's metric) and macro_f1 came out 0 for this perfect answer."""
    assert multilabel_metrics(NO_LABELS, NO_LABELS) == {"subset_accuracy": 1.0, "micro_f1": 1.0, "macro_f1": 1.0}
    m = compute_metrics("multi_label", np.full((4, 3), -2.0), NO_LABELS.astype(np.float32))  # (from logits)
    assert (m["micro_f1"], m["macro_f1"]) == (1.0, 1.0)


def test_predicting_labels_where_there_are_none_scores_0():
    pred = NO_LABELS.copy()
    pred[0, 1] = True  # one label predicted, none to find
    m = multilabel_metrics(pred, NO_LABELS)
    assert m["micro_f1"] == 0.0 and m["subset_accuracy"] == 0.75
    assert m["macro_f1"] == pytest.approx((1 + 0 + 1) / 3)  # labels 0 and 2: nothing to find, nothing predicted


def _counts(row: dict) -> dict:
    """A label's row without its ece (multi-label rows have one: test_metrics checks it)."""
    return {k: v for k, v in row.items() if k != "ece"}


def test_a_label_absent_from_gold_and_predictions_counts_as_right():
    """Per label as in the micro average: a label nobody has and nobody predicted is 1 in macro_f1 and in
    label_report (precision, recall and F1), as scikit-learn's zero_division=1.0 has it."""
    gold = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0]], dtype=bool)  # label 2: never gold, never predicted
    pred = np.array([[1, 0, 0], [0, 0, 0], [1, 1, 0]], dtype=bool)
    m = multilabel_metrics(pred, gold)
    assert m["micro_f1"] == pytest.approx(2 * 3 / (2 * 3 + 0 + 1))
    assert m["macro_f1"] == pytest.approx((1 + 2 / 3 + 1) / 3)
    rows = label_report("multi_label", np.where(pred, 2.0, -2.0), gold.astype(np.float32), {0: "a", 1: "b", 2: "c"})
    assert _counts(rows["per_label"]["c"]) == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 0}
    assert rows["per_label"]["b"]["f1"] == pytest.approx(2 / 3)
    assert np.mean([r["f1"] for r in rows["per_label"].values()]) == pytest.approx(m["macro_f1"])
    import sklearn.metrics as sk
    assert m["micro_f1"] == pytest.approx(sk.f1_score(gold, pred, average="micro", zero_division=1.0))
    assert m["macro_f1"] == pytest.approx(sk.f1_score(gold, pred, average="macro", zero_division=1.0))
    for pred_ in (NO_LABELS, np.eye(4, 3, dtype=bool)):
        m = multilabel_metrics(pred_, NO_LABELS)
        assert m["micro_f1"] == sk.f1_score(NO_LABELS, pred_, average="micro", zero_division=1.0)
        assert m["macro_f1"] == pytest.approx(sk.f1_score(NO_LABELS, pred_, average="macro", zero_division=1.0))


def test_a_label_missed_or_invented_still_has_precision_or_recall_0():
    """Only where there was nothing to find and nothing predicted: a label with gold examples and no prediction
    keeps precision 0 (scikit-learn's zero_division=1.0 would say 1 there, with recall and F1 0)."""
    gold = np.array([[1, 0], [1, 0]], dtype=np.float32)
    logits = np.array([[-1.0, 1.0], [-1.0, -1.0]])  # label 0 missed, label 1 invented
    rows = label_report("multi_label", logits, gold, {0: "a", 1: "b"})["per_label"]
    assert _counts(rows["a"]) == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}
    assert _counts(rows["b"]) == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}


@pytest.mark.parametrize("logit_columns", [3, 0])  # (0: what predict_logits gives for no rows)
def test_zero_rows_give_every_metric_0_as_single_label_does(logit_columns):
    """Of zero rows (data encoded in Python: the readers refuse an empty file) multi-label's subset accuracy was nan
    (and a RuntimeWarning) and its F1s 1; regression's mse was nan. Every metric is 0 now, as single-label's are,
    a number JSON takes."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # ("Mean of empty slice")
        single = compute_metrics("single_label", np.zeros((0, 3), np.float32), np.zeros(0, np.int64))
        multi = compute_metrics("multi_label", np.zeros((0, logit_columns), np.float32), np.zeros((0, 3), np.float32))
        regression = compute_metrics("regression", np.zeros((0, 1), np.float32), np.zeros(0, np.float32))
    assert single == {"accuracy": 0.0, "macro_f1": 0.0, "mcc": 0.0}  # (as it was: what the others follow)
    assert multi == {"subset_accuracy": 0.0, "micro_f1": 0.0, "macro_f1": 0.0}
    assert multilabel_metrics(np.zeros((0, 3), bool), np.zeros((0, 3), bool)) == multi
    assert {k: v for k, v in regression.items() if k != "note"} == {"pearson": 0.0, "spearman": 0.0, "mse": 0.0}
    assert "no examples" in regression["note"]
