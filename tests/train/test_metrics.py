"""oztune's numpy metrics agree with scikit-learn and scipy where those are installed."""

from __future__ import annotations

import numpy as np
import pytest

from oztune.train.metrics import classification_metrics, compute_metrics, multilabel_metrics, regression_metrics

sk = pytest.importorskip("sklearn.metrics")


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
    stats = pytest.importorskip("scipy.stats")
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
