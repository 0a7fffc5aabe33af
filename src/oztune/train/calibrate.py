"""Temperature scaling (Guo et al., 2017): one number T, fitted on labelled data, so that a classifier's scores say
how often it is right; folded into the model's last layer.

``softmax(z / T)`` keeps each row's arg max, and ``sigmoid(z / T)`` each multi-label logit's sign (the labels are those
with a logit above 0), so the labels (and accuracy, F1, the confusion matrix) stay what they were; only the scores
move. T minimises the mean negative log-likelihood of the gold labels on the given file (softmax cross-entropy, or
multi-label binary cross-entropy; :func:`fit_temperature`: the loss is convex in 1/T, so a golden-section search
over log(1/T) finds it).
:func:`scale_output_` then divides the head's output layer by T (its weight and bias, or an int8 layer's weight
scales and bias), so the saved model is an ordinary one: every way of running it (oztune, its ONNX export, the
server, Hugging Face transformers for an fp32 model) gives the calibrated scores without knowing about T.

A multi-label model can instead get one temperature per label (``per_label``: :func:`fit_temperatures`), each
fitted on that label's yes/no decisions alone, since its labels are separate binary classifiers that may be over-
and under-confident in different measure; its labels are still those with a logit above 0. (Per-class
temperatures for a single-label model would change which class scores highest, so it gets one.)

Fit T on held-out data, not on the training file (where the model is overconfident by construction), and measure
the result on other data again: ``oztune evaluate`` reports ``log_loss`` and ``ece``.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from oztune.errors import OztuneError
from oztune.train.metrics import log_loss

T_RANGE = (0.05, 20.0)  # the temperatures searched: a fit at either end is said (see run_calibrate)
STEPS = 80  # golden-section steps: the log-interval shrinks by 0.618^80 (~1e-17 of its width)


def nll(logits: np.ndarray, gold: np.ndarray, temperature: float, problem_type: str = "single_label") -> float:
    """:func:`~oztune.train.metrics.log_loss` of ``logits / temperature``: the loss the temperature is fitted on."""
    return log_loss(logits.astype(np.float64) / temperature, gold, problem_type)


def fit_temperature(logits: np.ndarray, gold: np.ndarray, problem_type: str = "single_label") -> float:
    """The temperature in :data:`T_RANGE` that gives the gold labels the least :func:`nll`, for ``logits`` (N, L) and
    gold class ids (N,), or multi-label 0/1 (N, L); N >= 1."""
    if not len(gold):
        raise ValueError("fit_temperature needs at least one example")
    lo, hi = -math.log(T_RANGE[1]), -math.log(T_RANGE[0])  # over log(1/T), where the loss is unimodal
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    loss = lambda log_beta: nll(logits, gold, math.exp(-log_beta), problem_type)  # noqa: E731
    fa, fb = loss(a), loss(b)
    for _ in range(STEPS):
        if fa <= fb:  # the minimum is in [lo, b]
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = loss(a)
        else:  # in [a, hi]
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = loss(b)
    return math.exp(-(lo + hi) / 2)


def fit_temperatures(logits: np.ndarray, gold: np.ndarray) -> np.ndarray:
    """One temperature per label of a multi-label model, (L,): each label's :func:`fit_temperature` on its own
    column of ``logits`` (N, L) and 0/1 ``gold`` (N, L)."""
    return np.array([fit_temperature(logits[:, [i]], gold[:, [i]], "multi_label") for i in range(logits.shape[1])])


@torch.no_grad()
def scale_output_(model: nn.Module, factor: float | np.ndarray) -> None:
    """Multiply the model's logits by ``factor`` (> 0), in place, by scaling its head's output layer: an
    ``nn.Linear``'s weight and bias, or an int8 layer's per-row weight scales and bias (its codes unchanged).
    ``factor`` is one number, or one per output (L,)."""
    from oztune.compress.quantize import Int8Linear

    out = model.head.out
    if not (isinstance(out, Int8Linear) or type(out) is nn.Linear):
        raise TypeError(f"the head's output layer is a {type(out).__name__}; expected nn.Linear or Int8Linear")
    factor = torch.as_tensor(np.asarray(factor, dtype=np.float32))
    if not bool((factor > 0).all()):
        raise ValueError(f"the factor must be positive, not {factor.tolist()}")
    if factor.ndim and factor.shape != (out.out_features,):
        raise ValueError(f"{factor.numel()} factors for {out.out_features} outputs")
    if isinstance(out, Int8Linear):
        out.weight_scale.mul_(factor)
        if out.bias is not None:
            out.bias.mul_(factor)
        out.sum_weights()  # (weight_sums derive from the scales)
    else:
        out.weight.mul_(factor[:, None] if factor.ndim else factor)  # (L, in): row i by factor i
        if out.bias is not None:
            out.bias.mul_(factor)


def reliability_png(curves: dict[str, tuple[dict, float]], problem_type: str, num_labels: int | None,
                    title: str) -> bytes:
    """A reliability diagram, as PNG bytes: for each curve (name -> (:func:`~oztune.train.metrics.reliability`'s
    data, its ECE)), the share right against the mean confidence in each non-empty bin, beside the diagonal of
    perfect calibration (a point below it: overconfident; its area: how many decisions the bin holds, so that the
    few-decision bins, whose share right is noisy, show as small); underneath, how the decisions spread over the bins.
    The axes start at the lowest confidence there can be: 1/2 for multi-label, 1/``num_labels`` otherwise (None:
    at the lowest bin that holds any)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    multi = problem_type == "multi_label"
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 7.5), dpi=110, sharex=True,
                                      gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], color="#888888", ls="--", lw=1, label="perfectly calibrated")
    width = 1 / (len(next(iter(curves.values()))[0]["count"]) * (len(curves) + 1))
    for i, (name, (bins, ece)) in enumerate(curves.items()):
        full = [k for k, c in enumerate(bins["count"]) if c]
        x, y = [bins["confidence"][k] for k in full], [bins["accuracy"][k] for k in full]
        line, = top.plot(x, y, lw=1.5, label=f"{name} (ECE {ece:.3f})")
        counts = np.array([bins["count"][k] for k in full], dtype=float)  # a point's area: its bin's decisions
        top.scatter(x, y, s=12 + 160 * counts / counts.max(), color=line.get_color(), zorder=3)
        share = np.array(bins["count"]) / max(sum(bins["count"]), 1)
        bottom.bar(np.array(bins["edges"][:-1]) + (i + 0.5) * width, share, width=width, label=name)
    lo = 0.5 if multi else 1 / num_labels if num_labels else 1.0
    first = min(bins["edges"][k] for bins, _ in curves.values() for k, c in enumerate(bins["count"]) if c)
    top.set_xlim(min(lo, first) - 0.01, 1.01)  # (the lowest bin that holds any, [7/15, 8/15) say, is drawn whole)
    top.set_ylim(min([lo] + [v for bins, _ in curves.values() for v in bins["accuracy"] if v is not None]) - 0.02,
                 1.02)
    top.set_ylabel("share right (point area: decisions in the bin)")
    top.set_title(title, fontsize=11)
    top.grid(alpha=0.3)
    top.legend(loc="upper left", fontsize=9)
    bottom.set_ylabel("share of\ndecisions")
    bottom.set_xlabel("confidence: each label's max(p, 1 - p)" if multi else "confidence: the top class's probability")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def run_calibrate(a) -> dict:
    """Load ``a.model``, fit its temperature (``a.per_label``: one per label) on ``a.data``, scale its output layer,
    save it to ``a.output``; returns the run record (the temperature or temperatures, the metrics before and after)."""
    from oztune.compress.distillation import load_trained, recipe_card
    from oztune.data.labels import gold_label2id
    from oztune.data.load import Columns, encode_examples, read_labelled
    from oztune.errors import check_at_least_1
    from oztune.models.hub import read_config, save_classifier
    from oztune.outdir import check_output_dir
    from oztune.train.loop import predict_logits
    from oztune.train.metrics import MAIN_METRIC, evaluation_metrics, reliability

    for option, count in (("--batch-size", a.batch_size), ("--max-length", a.max_length)):
        check_at_least_1(option, count)
    if not a.data:
        raise OztuneError("--data is required: the labelled file to fit the temperature on")
    check_output_dir(a.output, inputs=(a.model, a.data))
    model, enc, meta = load_trained(a.model, "--model", a.max_length, int8_ok=True)
    kind = model.head_cfg.problem_type
    if kind not in ("single_label", "multi_label"):
        raise OztuneError(f"--model {a.model}: a {kind} model; temperature scaling calibrates the scores of a "
                          "classifier (single- or multi-label)")
    if a.per_label and kind != "multi_label":
        raise OztuneError(f"--per-label: --model {a.model} is a single-label model, whose classes share one "
                          "temperature (one each would change which class scores highest); it is for multi-label ones")
    examples = read_labelled(a.data, Columns(a.text_column, a.text_pair_column, a.label_column), problem_type=kind,
                             text_pairs=meta["text_pairs"])
    data = encode_examples(examples, enc, gold_label2id(meta["id2label"], [e.label for e in examples]), kind, a.data)
    gold = data.labels.numpy()

    logits = predict_logits(model, data, a.batch_size)
    before, reliability_before = evaluation_metrics(kind, logits, gold), reliability(logits, gold, kind)
    if a.per_label:
        names = [meta["id2label"][i] for i in range(logits.shape[1])]
        fitted = fit_temperatures(logits, gold)
        temperature, temperatures = None, dict(zip(names, fitted.tolist()))
        scale_output_(model, 1 / fitted)
        said = "each label's scores divided by its own temperature: " + ", ".join(
            f"{n} {t:.4f}" for n, t in temperatures.items())
    else:
        temperature, temperatures = fit_temperature(logits, gold, kind), None
        scale_output_(model, 1 / temperature)
        said = f"scores divided by the temperature {temperature:.4f}"
    after_logits = predict_logits(model, data, a.batch_size)  # (the model as saved)
    after = evaluation_metrics(kind, after_logits, gold)
    at_bound = [n for n, t in (temperatures or {"": temperature}).items()
                if min(abs(math.log(t / end)) for end in T_RANGE) < 1e-6]
    run = {"command": "calibrate", "source": str(a.model), "args": asdict(a), "temperature": temperature,
           "temperatures": temperatures, "metric": MAIN_METRIC[kind],
           "temperature_at_bound": bool(at_bound), "labels_at_bound": at_bound if a.per_label else [],
           "examples": len(examples), "metrics_before": before, "metrics": after,
           "torch": torch.__version__, "source_run": meta.get("run", {})}
    quantization = read_config(meta["path"]).get("oztune", {}).get("quantization")
    card = recipe_card("Calibrated classifier (oztune calibrate)", [
        f"Source: `{a.model}`; {said} (the labels are the source's)",
        f"Fitted on `{a.data}` ({len(examples):,} examples; the table's metrics are on that file too)"],
        before, after, a.output, columns=("source", "calibrated"), text_pairs=meta["text_pairs"])
    png = reliability_png({"before": (reliability_before, before["ece"]), "after": (reliability(
        after_logits, gold, kind), after["ece"])}, kind, logits.shape[1],
        f"Reliability on {Path(a.data).name} ({len(examples):,} examples), before and after calibration")
    save_classifier(model, enc, a.output, meta["id2label"], run=run, quantization=quantization, card=card,
                    text_pairs=meta["text_pairs"], extra_files={"reliability.png": png})
    return run
