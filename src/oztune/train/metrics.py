"""Metrics of each problem type, in numpy (small enough that a dependency would not pay its way).

single_label: accuracy, macro-F1, MCC (multi-class Matthews); multi_label: subset accuracy, micro-/macro-F1; both
(:func:`evaluation_metrics`: ``oztune evaluate``, the training loop's evaluations, the compression reports) the
probabilities' log loss and expected calibration error; regression: Pearson, Spearman, MSE. ``MAIN_METRIC`` names the one early
stopping uses. Of zero rows (not from a file, which the readers refuse empty: data encoded or filtered in Python) every metric is
0, a number (not nan, which JSON does not take), as single-label's always were; regression's then carry a ``note``
saying so (its mse of 0 would otherwise read as a perfect fit).
:func:`label_report` breaks a classification down by label (``oztune evaluate --per-label``).
"""

from __future__ import annotations

import numpy as np

MAIN_METRIC = {"single_label": "accuracy", "multi_label": "micro_f1", "regression": "pearson"}


def metric_values(entry: dict) -> dict[str, float]:
    """The metrics (and training loss) of a history entry: its float values but ``epoch``, which is a float
    only for an evaluation inside an epoch."""
    return {k: v for k, v in entry.items() if isinstance(v, float) and k != "epoch"}


def _f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """F1 = 2 tp / (2 tp + fp + fn); 1 where tp + fp + fn = 0 (nothing to find, nothing predicted: a perfect
    answer, scikit-learn's ``zero_division=1.0``), as for a multi-label eval set in which no example has a label."""
    denom = 2 * tp + fp + fn
    return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 1.0)


def classification_metrics(pred: np.ndarray, gold: np.ndarray, num_labels: int) -> dict[str, float]:
    """Accuracy, macro-F1 over the labels present in gold or pred, and multi-class MCC."""
    cm = np.zeros((num_labels, num_labels), dtype=np.float64)
    np.add.at(cm, (gold, pred), 1)
    tp = np.diag(cm)
    fp, fn = cm.sum(0) - tp, cm.sum(1) - tp
    present = (cm.sum(0) + cm.sum(1)) > 0
    t, p, c, s = cm.sum(1), cm.sum(0), tp.sum(), cm.sum()
    denom = np.sqrt((s * s - (p * p).sum()) * (s * s - (t * t).sum()))
    return {
        "accuracy": float(c / s) if s else 0.0,
        "macro_f1": float(_f1(tp, fp, fn)[present].mean()) if present.any() else 0.0,
        "mcc": float((c * s - (t * p).sum()) / denom) if denom > 0 else 0.0,
    }


def multilabel_metrics(pred: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    """Subset accuracy, micro-F1 and macro-F1 (over every label) of 0/1 matrices (N, L). Where there is nothing
    to find and nothing was predicted, F1 is 1: overall for micro-F1, per label for macro-F1 (see :func:`_f1`).
    Of zero rows every metric is 0, as :func:`classification_metrics`' (subset accuracy was nan, the F1s 1)."""
    if not len(gold):  # (pred may then be (0, 0): the logits of no batch)
        return {"subset_accuracy": 0.0, "micro_f1": 0.0, "macro_f1": 0.0}
    pred, gold = pred.astype(bool), gold.astype(bool)
    tp = (pred & gold).sum(0).astype(float)
    fp = (pred & ~gold).sum(0).astype(float)
    fn = (~pred & gold).sum(0).astype(float)
    return {
        "subset_accuracy": float((pred == gold).all(1).mean()),
        "micro_f1": float(_f1(tp.sum(), fp.sum(), fn.sum())),
        "macro_f1": float(_f1(tp, fp, fn).mean()),
    }


def _rank(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean rank), as Spearman needs."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=float)
    ranks[order] = np.arange(len(x), dtype=float)
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=ranks)
    return sums[inv] / counts[inv]


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    # undefined for a constant: 0 (centred on its rounded mean, a constant can leave a residue that correlates)
    if not len(a) or (a == a[0]).all() or (b == b[0]).all():
        return 0.0
    a, b = a - a.mean(), b - b.mean()
    d = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / d) if d > 0 else 0.0


def regression_metrics(pred: np.ndarray, gold: np.ndarray) -> dict[str, float | str]:
    """Pearson, Spearman and mean squared error.

    When the predictions or the gold scores are all the same, the correlations are undefined (scipy: nan and a
    warning): they are given as 0, a number every JSON reader takes and early stopping can compare, and a
    ``note`` (text, which :func:`metric_values` leaves out) says why, which the commands print: a 0 alone
    looks like a weak model, not one that predicts a constant. Of zero rows every metric is 0 (mse was nan), and
    the note says so.
    """
    pred, gold = pred.astype(float).ravel(), gold.astype(float).ravel()
    if not len(gold):
        return {"pearson": 0.0, "spearman": 0.0, "mse": 0.0, "note": "no examples: every metric is given as 0"}
    out: dict[str, float | str] = {"pearson": _pearson(pred, gold), "spearman": _pearson(_rank(pred), _rank(gold)),
                                   "mse": float(((pred - gold) ** 2).mean())}
    for what, x in (("predictions", pred), ("gold scores", gold)):
        if len(x) and (x == x[0]).all():  # (_pearson gives 0)
            out["note"] = (f"the {what} are all the same ({x[0]:.4g}): pearson and spearman are undefined, "
                           "given as 0")
            break
    return out


def _confusion(pred: np.ndarray, gold: np.ndarray, num_labels: int) -> np.ndarray:
    """(L, L) counts: rows the gold label, columns the predicted one."""
    cm = np.zeros((num_labels, num_labels), dtype=np.int64)
    np.add.at(cm, (gold, pred), 1)
    return cm


def label_report(problem_type: str, logits: np.ndarray, gold: np.ndarray, id2label: dict[int, str]) -> dict:
    """Each label's precision, recall, F1 and support (gold count), and for single-label the confusion matrix.

    Args:
        problem_type: "single_label" or "multi_label" (regression has no labels: an empty dict).
        logits: (N, L) raw outputs.
        gold: (N,) class ids, or (N, L) 0/1 for multi-label.
        id2label: the name of each output.

    Returns:
        ``{"per_label": {name: {"precision", "recall", "f1", "support"}}}``, plus ``"confusion_matrix"``
        (a list of rows: gold label, then predicted label, both in output order) for single-label, and for
        multi-label each label's ``"ece"`` (:func:`calibration_metrics` of its yes/no decisions alone: what a
        temperature per label, ``oztune calibrate --per-label``, works on). An undefined precision or recall is
        0, but 1 for a label neither in gold nor predicted (whose F1 is 1, see :func:`_f1`).
    """
    if problem_type not in ("single_label", "multi_label"):
        return {}
    L = logits.shape[-1]
    if problem_type == "single_label":
        cm = _confusion(logits.argmax(-1), gold.astype(int), L)
        tp = np.diag(cm).astype(float)
        fp, fn = cm.sum(0) - tp, cm.sum(1) - tp
    else:
        pred, g = labels_on(logits), gold > 0.5
        tp = (pred & g).sum(0).astype(float)
        fp, fn = (pred & ~g).sum(0).astype(float), (~pred & g).sum(0).astype(float)
    # undefined: 0, but 1 for a label neither in gold nor predicted (its F1 is 1 too, see _f1)
    precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), (fn == 0).astype(float))
    recall = np.where(tp + fn > 0, tp / np.maximum(tp + fn, 1), (fp == 0).astype(float))
    f1 = _f1(tp, fp, fn)
    names = [id2label.get(i, str(i)) for i in range(L)]
    out = {"per_label": {n: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                             "support": int(tp[i] + fn[i])} for i, n in enumerate(names)}}
    if problem_type == "single_label":
        out["confusion_matrix"] = cm.tolist()
    else:
        for i, n in enumerate(names):
            out["per_label"][n]["ece"] = calibration_metrics(logits[:, [i]], gold[:, [i]], "multi_label")["ece"]
    return out


CALIBRATION_BINS = 15  # equal-width confidence bins of the expected calibration error (Guo et al., 2017)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax of float64 ``z`` (N, L)."""
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def log_loss(logits: np.ndarray, gold: np.ndarray, problem_type: str = "single_label") -> float:
    """Mean negative log-likelihood (natural log) of the gold labels: of class ids (N,) under the softmax of
    ``logits`` (N, L) (scikit-learn's ``log_loss``), or for ``multi_label`` of 0/1 (N, L) under each label's sigmoid
    (the mean binary cross-entropy). N >= 1."""
    z = logits.astype(np.float64)
    if problem_type == "multi_label":
        return float((np.logaddexp(0, z) - (gold > 0.5) * z).mean())  # binary cross-entropy with logits
    return float(-_log_softmax(z)[np.arange(len(gold)), gold.astype(int)].mean())


def _decisions(logits: np.ndarray, gold: np.ndarray, problem_type: str) -> tuple[np.ndarray, np.ndarray]:
    """Each decision's confidence and whether it was right (1.0 or 0.0), as :func:`calibration_metrics` counts them."""
    z = logits.astype(np.float64)
    if problem_type == "multi_label":
        conf = 1 / (1 + np.exp(-np.abs(z))).ravel()  # sigmoid(|z|) = max(p, 1 - p)
        right = ((z > 0) == (gold > 0.5)).astype(np.float64).ravel()  # (the labels' rule: logit > 0, labels_on)
        return conf, right
    log_p = _log_softmax(z)
    return np.exp(log_p.max(-1)), (log_p.argmax(-1) == gold.astype(int)).astype(np.float64)  # (N,) each


def _bin_sums(conf: np.ndarray, right: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per confidence bin [i/15, (i+1)/15): how many decisions, how many right, their confidences' sum."""
    bins = np.minimum((conf * CALIBRATION_BINS).astype(int), CALIBRATION_BINS - 1)
    return (np.bincount(bins, minlength=CALIBRATION_BINS), np.bincount(bins, right, CALIBRATION_BINS),
            np.bincount(bins, conf, CALIBRATION_BINS))


def calibration_metrics(logits: np.ndarray, gold: np.ndarray, problem_type: str = "single_label") -> dict[str, float]:
    """How far a classifier's probabilities can be taken at their word: ``log_loss`` (:func:`log_loss`) and ``ece``.

    ``ece``, the expected calibration error, groups the predictions by their confidence into
    :data:`CALIBRATION_BINS` bins [i/15, (i+1)/15) and weights each bin's |accuracy - mean confidence| by its share
    of the predictions (0: a score of 0.9 is right 90% of the time). Single-label (softmax of ``logits`` (N, L), gold
    class ids (N,)): a prediction's confidence is its top probability. Multi-label (each label's sigmoid, gold 0/1
    (N, L)): the N x L yes/no decisions, each of confidence max(p, 1 - p).
    Quantization or pruning can keep the accuracy and still move these. Of zero rows both are 0."""
    if not len(gold):
        return {"log_loss": 0.0, "ece": 0.0}
    n, right, conf = _bin_sums(*_decisions(logits, gold, problem_type))
    return {"log_loss": log_loss(logits, gold, problem_type), "ece": float(np.abs(right - conf).sum() / n.sum())}


def reliability(logits: np.ndarray, gold: np.ndarray, problem_type: str = "single_label") -> dict[str, list]:
    """The reliability diagram's data, per confidence bin of :func:`calibration_metrics`: ``count`` (decisions),
    ``confidence`` (their mean confidence) and ``accuracy`` (the share right), None where a bin is empty; and the
    bins' ``edges``. JSON as it is; the ECE is the count-weighted mean of |accuracy - confidence|."""
    n, right, conf = _bin_sums(*_decisions(logits, gold, problem_type))
    mean = lambda v: [float(x / k) if k else None for x, k in zip(v, n)]  # noqa: E731
    return {"count": n.tolist(), "confidence": mean(conf), "accuracy": mean(right),
            "edges": [i / CALIBRATION_BINS for i in range(CALIBRATION_BINS + 1)]}


def labels_on(logits: np.ndarray) -> np.ndarray:
    """A multi-label model's predicted labels, (N, L) bool: those whose logit is above 0 (probability above 0.5).
    The one rule of its metrics, ``evaluate --mistakes`` and ``predict`` (the logit, not the probability: in fp32
    a logit of -3e-8 has a sigmoid of exactly 0.5)."""
    return logits > 0


def evaluation_metrics(problem_type: str, logits: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    """What ``oztune evaluate``, the training loop's evaluations and the compression reports give:
    :func:`compute_metrics`, and for a classifier also :func:`calibration_metrics`."""
    out = compute_metrics(problem_type, logits, gold)
    if problem_type in ("single_label", "multi_label"):
        out.update(calibration_metrics(logits, gold, problem_type))
    return out


def compute_metrics(problem_type: str, logits: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    """Metrics of ``problem_type`` from raw logits (N, L) and gold labels."""
    if problem_type == "single_label":
        return classification_metrics(logits.argmax(-1), gold.astype(int), logits.shape[-1])
    if problem_type == "multi_label":
        return multilabel_metrics(labels_on(logits), gold > 0.5)
    return regression_metrics(logits.reshape(-1), gold)
