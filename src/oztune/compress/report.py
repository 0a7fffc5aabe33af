"""Measure model variants the same way and write the trade-off report: report.md, report.json, pareto.png, and
for classifiers reliability.png.

Timings are end to end, tokenization included, with the threads torch has. Throughput: the eval texts
sorted by token length and cut into batches of 64 (the same batches for every variant and peer).
Latency: one text at a time, p50 and p95 over at most :data:`LATENCY_TEXTS` of the eval texts, spread evenly
over the file (:func:`latency_sample`: the same texts for every variant and peer).

Scores, changes and budgets are points: the main metric x100 (:data:`UNITS`). For accuracy these are percent; a
Pearson correlation x100 (regression) or a micro-F1 x100 (multi-label) is named so (:func:`points_of`), since
oztune evaluate prints those metrics on their own scale.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from oztune.compress.args import FASTEST, LATENCY_TEXTS
from oztune.data.dataset import EncodedData
from oztune.errors import OztuneError
from oztune.models.hub import format_size, weights_mb
from oztune.models.kernels import freeze_, thaw_
from oztune.runtime import Contention
from oztune.train.loop import predict_logits
from oztune.train.metrics import MAIN_METRIC, evaluation_metrics, reliability

COLUMNS = [  # (key, header, value -> cell)
    ("name", "variant", str), ("shape", "layers heads FFN vocab", str), ("score", "{points}", "{:.2f}".format),
    ("change", "change (pt)", "{:+.2f}".format),  # signed: -8.00 is 8 points below the baseline
    ("macro_f1", "macro-F1", "{:.2f}".format), ("ece", "ECE", "{:.3f}".format), ("file_mb", "file size", format_size),
    ("parameters", "params (M)", "{:.2f}".format),
    ("latency_p50_ms", "batch-1 p50 ms", "{:.2f}".format), ("latency_p95_ms", "batch-1 p95 ms", "{:.2f}".format),
    ("throughput", "batch-64 texts/s", "{:.0f}".format), ("speedup", "speed-up", "{:.2f}x".format),
]
MAX_DROP_UNIT = "points: percent of accuracy, micro-F1 or Pearson x100"  # (--max-drop's errors)
UNITS = ("points: the main metric x100 (score, change: signed, against the baseline, macro_f1, max_drop); "
         "ece: expected calibration error, 0 to 1 (classifiers); metrics: as oztune evaluate gives them")


def points_of(metric: str) -> str:
    """What a score is points of: accuracy (points are percent), else the metric x100 (pearson x100)."""
    return metric if metric == "accuracy" else f"{metric} x100"


def budget_words(max_drop: float, metric: str) -> str:
    """The budget in the reports' words: "1 point(s) of accuracy", "1 point(s) of pearson x100 (0.01 of
    pearson)"."""
    said = f"{max_drop:g} point(s) of {points_of(metric)}"
    return said if metric == "accuracy" else f"{said} ({max_drop / 100:g} of {metric})"


def scale_words(metric: str) -> str:
    """The reports' note on the scores' scale."""
    if metric == "accuracy":
        return "Scores in points (percent)."
    macro = ", macro-F1 x100 too" if metric == "micro_f1" else ""
    return f"Scores in points: {metric} x100 (1 pt = 0.01 of {metric}){macro}."


def latency_sample(n: int, cap: int | None = None) -> list[int]:
    """Indices of the texts batch-1 latency is timed on: all ``n``, or ``cap`` (default :data:`LATENCY_TEXTS`)
    of them spread evenly over the file (every n/cap-th), the same every run."""
    cap = LATENCY_TEXTS if cap is None else cap
    return list(range(n)) if n <= cap else [i * n // cap for i in range(cap)]


def latency_words(timed: int, total: int) -> str:
    """Which eval texts batch 1 was timed on, in the reports' words: "every eval text", or "256 of the 872 eval
    texts (spread evenly over the file)"."""
    return "every eval text" if timed >= total else f"{timed} of the {total} eval texts (spread evenly over the file)"


def sorted_batches(encoder, texts: list[str], pairs: list[str] | None = None, batch_size: int = 64) -> list[np.ndarray]:
    """Indices of the texts sorted by token length (longest first) and cut into batches."""
    lengths = np.array([len(ids) for ids, _ in encoder.encode(texts, pairs)])
    order = np.argsort(-lengths, kind="stable")
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def model_runner(model: torch.nn.Module, encoder) -> Callable[[list[str], list[str] | None], torch.Tensor]:
    """texts (and pairs) -> logits, end to end: tokenize, pad, forward."""

    @torch.inference_mode()
    def run(texts: list[str], pairs: list[str] | None = None) -> torch.Tensor:
        b = encoder(texts, pairs)
        return model(b["input_ids"], b["attention_mask"], b["token_type_ids"])

    return run


def time_batches(run: Callable, texts: list[str], pairs: list[str] | None, batches: list[np.ndarray]) -> float:
    """Seconds to run every batch once, after one untimed warm-up batch (:func:`round_robin` keeps the fastest
    of several passes: on a shared machine other work only ever adds time)."""
    take = (lambda idx: [pairs[i] for i in idx]) if pairs is not None else (lambda idx: None)
    run([texts[i] for i in batches[0]], take(batches[0]))
    t0 = time.perf_counter()
    for idx in batches:
        run([texts[i] for i in idx], take(idx))
    return time.perf_counter() - t0


def evaluate(model: torch.nn.Module, data: EncodedData) -> dict:
    """One variant's metrics on labelled ``data``, as ``oztune evaluate`` gives them (a classifier's: calibration too,
    and its reliability diagram's data, ``reliability``, as ``evaluate --reliability`` draws it)."""
    kind, logits, gold = model.head_cfg.problem_type, predict_logits(model, data), data.labels.numpy()
    out = evaluation_metrics(kind, logits, gold)
    if kind != "regression":
        out["reliability"] = reliability(logits, gold, kind)
    return out


def has_reliability(rows: list[dict]) -> bool:
    """Whether every row holds its reliability data (classifiers), so that reliability.png is drawn."""
    return bool(rows) and all("reliability" in r.get("metrics", {}) for r in rows)


def report_files(rows: list[dict]) -> list[str]:
    """The files a report of ``rows`` writes."""
    return ["report.md", "report.json", "pareto.png"] + (["reliability.png"] if has_reliability(rows) else [])


def reliability_figure(rows: list[dict], title: str) -> bytes | None:
    """Every row's reliability curve in one diagram (PNG bytes), or None where the rows have none (regression)."""
    if not has_reliability(rows):
        return None
    from oztune.train.calibrate import reliability_png

    kind = "multi_label" if rows[0]["metric"] == "micro_f1" else "single_label"
    return reliability_png({r["name"]: (r["metrics"]["reliability"], r["ece"]) for r in rows}, kind, None, title)


def reliability_md(rows: list[dict]) -> str:
    """report.md's image of reliability.png, where it is drawn."""
    return ("\n![how far the scores can be trusted: share right against confidence](reliability.png)\n"
            if has_reliability(rows) else "")


def measure(model: torch.nn.Module, encoder, eval_data: EncodedData, texts: list[str], pairs: list[str] | None,
            model_dir: Path, parameters: int, repeats: int = 3) -> dict:
    """Quality and speed of one variant: metrics on ``eval_data``, file size, latency (on
    :func:`latency_sample` of the texts) and throughput (on every text).

    Args:
        model: the variant, in eval mode.
        encoder: its tokenizer.
        eval_data: encoded labelled evaluation data (the same examples as ``texts``).
        texts: the evaluation texts, for the end-to-end timings.
        pairs: their second texts, or None.
        model_dir: where the variant was saved (its model.safetensors is weighed).
        parameters: parameter count (before quantization, which does not change it).
        repeats: throughput runs; the fastest counts.
    """
    freeze_(model)  # scored and timed as it runs once loaded (oztune.Classifier); thawed after: the search goes on
    try:
        metrics = evaluate(model, eval_data)
        run = model_runner(model, encoder)
        sample = latency_sample(len(texts))
        with Contention(torch.get_num_threads()) as load:
            timings = round_robin([run], texts, pairs, sorted_batches(encoder, texts, pairs), repeats,
                                  latency=sample)[0]
    finally:
        thaw_(model)
    return {**row(metrics, model.head_cfg.problem_type, weights_mb(model_dir), parameters, len(texts), len(sample),
                  *timings), **load_of(load)}


def load_of(load: Contention) -> dict:
    """A report row's record of the machine's load while it was timed: ``other_cores`` (cores other processes
    took, None where unknown) and ``busy_machine`` (more than the cores the timing left idle)."""
    return {"other_cores": load.others, "busy_machine": load.busy}


def busy_words(rows: list[dict], in_turns: bool) -> str | None:
    """A warning for the reports when other processes competed for the cores while rows were timed, else None.
    ``in_turns``: the rows were timed in turns (compare), not one after another (compress)."""
    busy = [r for r in rows if r.get("busy_machine")]
    if not busy:
        return None
    most = max(r["other_cores"] for r in busy)
    which = "the models were" if in_turns else ", ".join(r["name"] for r in busy) + (" was" if len(busy) == 1 else " were")
    said = (f"the machine was busy: other processes took up to {most:.1f} cores while {which} timed, so the timings "
            "are slower than on a quiet machine")
    if in_turns:
        return said + " (the models were timed in turns: their ratios hold better than their times)"
    return (said + "; the variants are timed one after another, so a busy spell can change which one is fastest: "
            "measure again on a quiet machine, or time the saved variants in turns with oztune compare")


def row(metrics: dict, kind: str, file_mb: float, parameters: int | None, texts: int, latency_texts: int,
        seconds: float, p50_ms: float, p95_ms: float) -> dict:
    """One variant's report row from its ``metrics`` (of problem type ``kind``), size and timings: ``seconds``
    for the ``texts`` in batches of 64, batch-1 latency percentiles over ``latency_texts`` of them."""
    return {"score": 100 * metrics[MAIN_METRIC[kind]], "metric": MAIN_METRIC[kind],
            "macro_f1": 100 * metrics["macro_f1"] if "macro_f1" in metrics else None, "ece": metrics.get("ece"),
            "metrics": metrics,
            "file_mb": file_mb, "parameters": None if parameters is None else parameters / 1e6,
            "latency_p50_ms": p50_ms, "latency_p95_ms": p95_ms, "latency_texts": latency_texts,
            "batch64_seconds": seconds,
            "throughput": texts / seconds}


def round_robin(runs: list[Callable], texts: list[str], pairs: list[str] | None, batches: list[np.ndarray],
                repeats: int = 3, warmup: int = 5, chunk: int = 16,
                latency: list[int] | None = None) -> list[tuple[float, float, float]]:
    """(batch-64 seconds, batch-1 p50 ms, p95 ms) of each of ``runs`` timed in turns, so that a spell of
    contention on a shared machine slows them all rather than one: each throughput pass runs every model once
    on every batch (the fastest of ``repeats`` counts), and batch 1 goes ``chunk`` texts per model in turn over
    the texts of indices ``latency`` (None: every text; see :func:`latency_sample`). Each turn starts
    with an untimed call (after ``warmup`` of them at first): the threads of the model before may still be
    spinning, waiting for work (PyTorch's OpenMP, ONNX Runtime), and would slow its first text."""
    # (the fastest pass: a median of three let one burst of contention flip which variant compress kept)
    seconds = [min(vals) for vals in zip(*[[time_batches(run, texts, pairs, batches) for run in runs]
                                           for _ in range(repeats)])]
    one = (lambda i: [pairs[i]]) if pairs is not None else (lambda i: None)
    picked = list(range(len(texts))) if latency is None else list(latency)
    for run in runs:
        for i in picked[:min(warmup, len(picked)) - 1]:
            run([texts[i]], one(i))
    times: list[list[float]] = [[] for _ in runs]
    for start in range(0, len(picked), chunk):
        for run, ts in zip(runs, times):
            run([texts[picked[start]]], one(picked[start]))
            for i in picked[start:start + chunk]:
                t0 = time.perf_counter()
                run([texts[i]], one(i))
                ts.append(time.perf_counter() - t0)
    return [(s, float(np.percentile(ts, 50) * 1e3), float(np.percentile(ts, 95) * 1e3))
            for s, ts in zip(seconds, times)]


def check_fastest(fastest: str) -> None:
    """Refuse a ``--fastest`` that is not one of :data:`~oztune.compress.args.FASTEST`."""
    if fastest not in FASTEST:
        raise OztuneError(f"--fastest must be one of {', '.join(FASTEST)}, not {fastest!r}")


def pick_fastest(rows: list[dict], fastest: str = "throughput") -> str:
    """The name of the fastest row within the budget (:func:`add_relative`): by batch-64 ``throughput`` or batch-1
    ``latency`` (p50), the smaller file breaking a tie."""
    within = [r for r in rows if r["within_budget"]]
    if fastest == "latency":
        return min(within, key=lambda r: (r["latency_p50_ms"], r["file_mb"]))["name"]
    return max(within, key=lambda r: (r["throughput"], -r["file_mb"]))["name"]


def fastest_words(fastest: str) -> str:
    """What "fastest" meant, in the reports' words."""
    return "batch-1 p50 latency" if fastest == "latency" else "batch-64 throughput"


def add_relative(rows: list[dict], baseline: dict, max_drop: float) -> None:
    """Fill ``change`` (signed points against the baseline: -8.00 is 8 points worse, +0.11 better; not a
    "drop", which would read as a loss when positive), ``speedup`` (throughput ratio) and ``within_budget``."""
    for r in rows:
        r["change"] = r["score"] - baseline["score"]
        r["speedup"] = r["throughput"] / baseline["throughput"]
        r["latency_speedup"] = baseline["latency_p50_ms"] / r["latency_p50_ms"]
        r["within_budget"] = r["change"] >= -max_drop - 1e-9


def write_report(out: Path, rows: list[dict], chosen: str, max_drop: float, settings: dict) -> None:
    """report.json (everything), report.md (a table and the choice), pareto.png and for classifiers
    reliability.png into ``out``.

    Args:
        out: directory to write to.
        rows: one dict per variant, the fp32 baseline first (from :func:`measure` plus name, shape, recipe).
        chosen: name of the kept variant.
        max_drop: the budget in points (the main metric x100).
        settings: the run's options and environment, kept in report.json.
    """
    out = Path(out)
    (out / "report.json").write_text(json.dumps({"chosen": chosen, "max_drop": max_drop, "units": UNITS,
                                                 "variants": rows, "settings": settings}, indent=2, default=str) + "\n")
    (out / "report.md").write_text(markdown(rows, chosen, max_drop, settings))
    pareto_png(rows, chosen, max_drop, out / "pareto.png")
    png = reliability_figure(rows, f"Reliability of each variant on {Path(str(settings.get('eval'))).name}")
    if png is not None:
        (out / "reliability.png").write_bytes(png)


def table(rows: list[dict], chosen: str, mark: str = "kept", columns: list[tuple] = COLUMNS) -> str:
    """The rows as a markdown table of ``columns``, the ``chosen`` one in bold with ``mark`` after its name."""
    head = [h.format(points=points_of(rows[0]["metric"])) for _, h, _ in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = ["-" if r.get(k) is None else cell(r[k]) for k, _, cell in columns]
        if r["name"] == chosen:
            cells[0] = f"**{cells[0]}** ({mark})"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(rows: list[dict], chosen: str, max_drop: float, settings: dict) -> str:
    metric = rows[0]["metric"]
    base, best = rows[0], next(r for r in rows if r["name"] == chosen)
    pruned = any(str(r.get("recipe", r["name"])).startswith("prune") for r in rows)
    pruning = (f"; sizes (share of encoder weights kept): {settings.get('sizes')}; recovery: {settings.get('epochs')} "
               f"epoch(s) of distillation from fp32 on {settings.get('train_examples')} examples") if pruned else ""
    return f"""# oztune compress report

Model `{settings.get('model')}`, evaluated on `{settings.get('eval')}` ({settings.get('eval_examples')} examples);
budget: at most {budget_words(max_drop, metric)} below fp32 ({base['score']:.2f}).

**Kept: `{chosen}`** (the fastest within the budget by {fastest_words(settings.get('fastest', 'throughput'))}): {points_of(metric)} {best['score']:.2f} ({best['change']:+.2f} pt), {format_size(best['file_mb'])},
{best['throughput']:.0f} texts/s at batch 64 ({best['speedup']:.2f}x fp32), batch-1 p50 {best['latency_p50_ms']:.2f} ms.

{table(rows, chosen)}

- {scale_words(metric)} Timings end to end, tokenization included, {settings.get('threads')} thread(s);
  batch 64 on the eval texts sorted by token length; batch 1 over
  {latency_words(base['latency_texts'], settings.get('eval_examples', base['latency_texts']))}.
- speed-up: batch-64 throughput relative to fp32. params: before quantization.
- {"Every variant is saved under `variants/<name>/`; the" if settings.get("keep_variants", True) else "The"} kept one is this directory's model.
- Recipes: {settings.get('recipes')}{pruning}; total time {settings.get('seconds', 0):.0f} s.
{busy_item(busy_words(rows, in_turns=False))}
![{metric} against latency](pareto.png)
{reliability_md(rows)}"""


def busy_item(words: str | None) -> str:
    """A warning as a markdown list item (with its newline), or nothing."""
    return f"- **Note: {words}.**\n" if words else ""


def pareto_png(rows: list[dict], chosen: str, max_drop: float, path: Path, baseline: str = "fp32",
               mark: str = "kept") -> None:
    """The score against batch-1 latency, marker area by file size, labelled, the baseline (the first row, called
    ``baseline``), the budget and the ``chosen`` row (red, ``mark`` in the title) marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6), dpi=110)
    x = np.array([r["latency_p50_ms"] for r in rows])
    y = np.array([r["score"] for r in rows])
    mb = np.array([r["file_mb"] for r in rows])
    area = 60 + 1500 * mb / max(mb.max(), 1e-9)
    colors = ["#d62728" if r["name"] == chosen else ("#7f7f7f" if i == 0 else "#1f77b4") for i, r in enumerate(rows)]
    ax.scatter(x, y, s=area, c=colors, alpha=0.5, edgecolors="black", linewidths=0.8, zorder=3)
    front = _frontier(x, y)
    ax.plot(x[front], y[front], color="#555555", lw=1, ls=":", marker="o", ms=3, zorder=4,  # (a dot: a front
            label="Pareto front")  # of one variant draws no line)
    ax.axhline(y[0] - max_drop, color="#d62728", lw=1, ls="--", label=f"budget: {baseline} - {max_drop:g} pt")
    pad_y = max(0.5, (y.max() - min(y.min(), y[0] - max_drop)) * 0.15)
    ax.set_ylim(min(y.min(), y[0] - max_drop) - pad_y, y.max() + pad_y)
    ax.set_xlim(0, x.max() * 1.35)
    ax.set_xlabel("batch-1 latency, p50 (ms, tokenization included)")
    metric = rows[0]["metric"]  # (as in report.md: pearson for regression, micro_f1 multi-label)
    ax.set_ylabel("accuracy (%)" if metric == "accuracy" else points_of(metric))
    kept_base = rows[0]["name"] == chosen  # nothing else within the budget: the baseline itself is kept (red)
    ax.set_title(f"{metric[:1].upper()}{metric[1:]} against latency\nmarker area = file size; "
                 f"{f'red = {baseline}, {mark}' if kept_base else f'grey = {baseline}, red = {mark}'}", fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)
    fig.tight_layout()  # before the labels: their places are chosen in the final layout's pixels
    _labels(ax, fig, rows, x, y, np.sqrt(area / np.pi), chosen)
    fig.savefig(path)
    plt.close(fig)


def _labels(ax, fig, rows: list[dict], x: np.ndarray, y: np.ndarray, radius: np.ndarray, chosen: str) -> None:
    """Label each point beside its marker (``radius`` in points), at the first of a few places where the text
    overlaps no other label or point."""
    from matplotlib.text import Text

    offsets = [(1, 0), (1, -22), (-1, 0), (-1, -22), (1, 20), (1, -40), (-1, 20), (-1, -40),
               (1, 42), (1, -62), (-1, 42), (-1, -62)]  # the last ones for variants with tied scores
    renderer = fig.canvas.get_renderer()
    points = [ax.transData.transform((xi, yi)) for xi, yi in zip(x, y)]
    placed = []
    for i in np.argsort(x, kind="stable"):
        r, best = rows[i], None
        for side, dy in offsets:
            dx = side * (radius[i] + 3)
            percent = "%" if r["metric"] == "accuracy" else ""  # (a Pearson x100 is no percentage)
            ann = ax.annotate(f"{r['name']}\n{r['score']:.2f}{percent}, {format_size(r['file_mb'])}", (x[i], y[i]),
                              textcoords="offset points", xytext=(dx, dy), fontsize=8,
                              ha="left" if dx > 0 else "right", multialignment="left" if dx > 0 else "right",
                              fontweight="bold" if r["name"] == chosen else "normal",
                              arrowprops={"arrowstyle": "-", "color": "#999999", "lw": 0.6})
            # the text's own box (an annotation's extent also spans its arrow, back to the marker's centre)
            ann.update_positions(renderer)
            box = Text.get_window_extent(ann, renderer).expanded(1.05, 1.15)
            clashes = sum(box.overlaps(b) for b in placed) + sum(box.contains(*p) for p in points)
            inside = ax.get_window_extent(renderer).contains(box.x0, box.y0) and \
                ax.get_window_extent(renderer).contains(box.x1, box.y1)
            score = clashes + (0 if inside else 0.5)
            if best is None or score < best[0]:
                if best is not None:
                    best[1].remove()
                best = (score, ann, box)
            else:
                ann.remove()
            if score == 0:
                break
        placed.append(best[2])


def _frontier(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Indices of the points no other point beats on both latency (lower) and score (higher), by latency."""
    order = np.lexsort((-y, x))
    keep, best = [], -np.inf
    for i in order:
        if y[i] > best:
            keep.append(i)
            best = y[i]
    return np.array(keep, dtype=int)
