"""``oztune compare``: saved models measured the same way, side by side.

``oztune compress`` reports the variants it makes itself; a user who fine-tuned, quantized, pruned, distilled
or exported models one command at a time wants the same table for those: each model is scored on one labelled
file and timed end to end on its texts (:mod:`oztune.compress.report`: batch-64 throughput over length-sorted
batches, batch-1 latency on at most ``--latency-texts`` of them), and the fastest model within a budget of the
first one's score (``--max-drop`` points: the main metric x100) is marked.
Model directories run on PyTorch (an ``oztune export --format aoti`` package compiled), ONNX exports on
onnxruntime, each as ``oztune evaluate`` runs it.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch

from oztune.api import Classifier
from oztune.compress.args import CompareArgs
from oztune.compress.report import (COLUMNS, MAX_DROP_UNIT, UNITS, add_relative, budget_words, busy_item,
                                   busy_words, check_fastest, fastest_words, latency_sample, latency_words, load_of,
                                   pareto_png, pick_fastest, points_of, reliability_figure, reliability_md,
                                   round_robin, row, scale_words, sorted_batches, table)
from oztune.data.load import Columns, holds_pairs, read_labelled
from oztune.errors import OztuneError, check_at_least_1
from oztune.models.compiled import CompiledClassifier
from oztune.models.hub import format_size, resolve_model, weight_files
from oztune.outdir import check_output_dir, write_atomically
from oztune.runtime import Contention
from oztune.serve.backends import open_predictor

MARK = "fastest in budget"


def compare(a: CompareArgs) -> dict:
    """Measure every model of ``a.models`` on ``a.eval``; write the report if ``a.output``; return it as a dict
    (``variants``: one row per model, the first the baseline; ``chosen``: the fastest within the budget)."""
    if not a.models or not a.eval:
        raise OztuneError("give one or more model directories, and --eval FILE to measure them on")
    if not math.isfinite(a.max_drop) or a.max_drop < 0:
        raise OztuneError(f"--max-drop must be 0 or more ({MAX_DROP_UNIT}), not {a.max_drop}")
    check_at_least_1("--latency-texts", a.latency_texts)
    check_fastest(a.fastest)
    start = time.perf_counter()
    models = [resolve_model(m, "model") for m in a.models]  # every path checked before the first model is measured
    check_distinct(a.models, models)
    names = variant_names(a.models)
    cols = Columns(a.text_column, a.text_pair_column, a.label_column)
    if a.output:  # (refused now, not after minutes of measuring)
        check_output(a.output, a.models)
    clfs, rows, measured = [], [], []
    for given, path, name in zip(a.models, models, names):
        clf = open_predictor(str(path), spin=False)  # (ONNX Runtime's spinning threads would slow the next model)
        kind = clf.problem_type
        if clfs and kind != clfs[0].problem_type:
            raise OztuneError(f"{given}: a {kind} model; {a.models[0]} is {clfs[0].problem_type}: compare models "
                              "of one task")
        rows.append({"name": name, "path": str(given), "runtime": runtime_of(clf), "problem_type": kind})
        measured.append((scored(clf, given, a.eval, cols), model_mb(path), stored_weights(clf)))
        clfs.append(clf)
    examples = read_labelled(a.eval, cols, problem_type=clfs[0].problem_type)
    texts = [e.text for e in examples]
    pairs = [e.text_pair or "" for e in examples] if holds_pairs(examples) else None
    # timed in turns (a slow spell of a shared machine slows every model), on the same length-sorted batches and
    # the same sample of texts at batch 1
    sample = latency_sample(len(texts), a.latency_texts)
    with Contention(max(torch.get_num_threads(), *(getattr(c, "threads", 0) for c in clfs))) as load:
        timings = round_robin([c.logits for c in clfs], texts, pairs, sorted_batches(clfs[0].encoder, texts, pairs),
                              latency=sample)
    rows = [{**r, **row(metrics, r["problem_type"], mb, weights, len(texts), len(sample), *t), **load_of(load)}
            for r, (metrics, mb, weights), t in zip(rows, measured, timings)]
    add_relative(rows, rows[0], a.max_drop)
    chosen = pick_fastest(rows, a.fastest)
    report = {"chosen": chosen, "max_drop": a.max_drop, "units": UNITS, "variants": rows,
              "settings": {**asdict(a), "eval_examples": len(texts), "threads": torch.get_num_threads(),
                           "torch": torch.__version__, "seconds": time.perf_counter() - start}}
    if a.output:
        write_compare_report(Path(a.output), report)
    return report


def scored(clf, given: str, eval_file: str, cols: Columns) -> dict:
    """``clf``'s metrics on ``eval_file``, as ``oztune evaluate`` gives them; an error names the model
    (``given``), which one of several refused the file (text pairs for a single-text model, say)."""
    try:
        return clf.evaluate(eval_file, cols, reliability=clf.problem_type != "regression")
    except OztuneError as e:
        raise type(e)(f"{given}: {e}") from None


def check_distinct(given: list[str], paths: list[Path]) -> None:
    """Refuse a model given twice (its two rows would have one name, both marked when it is the fastest)."""
    seen: dict[Path, str] = {}
    for g, p in zip(given, paths):
        if p.resolve() in seen:
            raise OztuneError(f"{g}: given twice (as {seen[p.resolve()]} too); give each model once")
        seen[p.resolve()] = g


def check_output(output: str, models: list[str]) -> None:
    """Refuse an ``--output`` that cannot be written, or that is one of the ``models`` (``oztune compress`` keeps
    its own report.md, report.json and pareto.png in its model directory: the comparison would replace them)."""
    check_output_dir(output, replaced=False)
    for given in models:
        if Path(output).resolve() == Path(given).resolve():
            raise OztuneError(f"--output {output}: is the model {given}, whose report files it would replace; "
                              "write the comparison to a directory of its own")


def runtime_of(clf) -> str:
    """What runs the model: "onnxruntime", "torch compiled" (an aoti package) or "torch"."""
    if not isinstance(clf, Classifier):
        return "onnxruntime"
    return "torch compiled" if isinstance(clf.model, CompiledClassifier) else "torch"


def variant_names(models: list[str]) -> list[str]:
    """Short names for the table: each directory's name, or the path as given where two names are the same."""
    short = [Path(os.path.normpath(m)).name or m for m in models]
    return [s if short.count(s) == 1 else m for s, m in zip(short, models)]


def model_mb(path: Path) -> float:
    """Megabytes of what a model is loaded from: its weights, or an export's model file(s)."""
    files = weight_files(path) or [f for f in path.iterdir() if f.suffix in (".onnx", ".pt2", ".data")]
    return sum(f.stat().st_size for f in files if f.is_file()) / 1e6


def stored_weights(clf) -> int | None:
    """The model's weights and biases, int8 ones included (not their scales), or None where the runtime does
    not show them (ONNX)."""
    if not isinstance(clf, Classifier):
        return None
    model = getattr(clf.model, "eager", clf.model)  # (compiled: the wrapped model)
    held = [*model.parameters(), *(b for n, b in model.named_buffers() if n.rsplit(".", 1)[-1] in ("weight", "bias"))]
    return sum(t.numel() for t in held)


COMPARE_COLUMNS = [("name", "model", str), ("runtime", "runtime", str),
                   *[c for c in COLUMNS if c[0] not in ("name", "shape")]]


def markdown(report: dict) -> str:
    """report.md of a comparison: the table, what was measured, the plot."""
    rows, s, chosen = report["variants"], report["settings"], report["chosen"]
    base, best = rows[0], next(r for r in rows if r["name"] == chosen)
    metric = base["metric"]
    return f"""# oztune compare report

{len(rows)} models, evaluated on `{s['eval']}` ({s['eval_examples']} examples); budget: at most
{budget_words(report['max_drop'], metric)} below `{base['name']}` ({base['score']:.2f}).

**Fastest within the budget (by {fastest_words(s.get('fastest', 'throughput'))}): `{chosen}`**: {points_of(metric)} {best['score']:.2f} ({best['change']:+.2f} pt),
{format_size(best['file_mb'])}, {best['throughput']:.0f} texts/s at batch 64 ({best['speedup']:.2f}x
`{base['name']}`), batch-1 p50 {best['latency_p50_ms']:.2f} ms.

{table(rows, chosen, MARK, COMPARE_COLUMNS)}

- {scale_words(metric)} Timings end to end, tokenization included, {s['threads']} thread(s); batch 64 on
  the eval texts sorted by token length (the fastest of three passes); batch 1 over
  {latency_words(base['latency_texts'], s['eval_examples'])}.
- speed-up: batch-64 throughput relative to `{base['name']}`. params: weights and biases, int8 ones included (an
  ONNX export's are not counted). Total time {s['seconds']:.0f} s.
{busy_item(busy_words(rows, in_turns=True))}
{notes(rows)}![{metric} against latency](pareto.png)
{reliability_md(rows)}"""


def notes(rows: list[dict]) -> str:
    """The metrics' notes (a score that means nothing, e.g. pearson of constant predictions), as list items."""
    said = [f"- Note, `{r['name']}`: {r['metrics']['note']}" for r in rows if "note" in r["metrics"]]
    return "\n".join(said) + "\n\n" if said else ""


def write_compare_report(out: Path, report: dict) -> None:
    """report.json, report.md, pareto.png and for classifiers reliability.png into ``out`` (made if missing), each
    replaced whole or kept."""
    rows, png = report["variants"], io.BytesIO()
    pareto_png(rows, report["chosen"], report["max_drop"], png, rows[0]["name"], MARK)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OztuneError(f"--output {out}: cannot write there ({e.strerror or e})") from None
    write_atomically(out / "report.json", json.dumps(report, indent=2, default=str) + "\n")
    write_atomically(out / "report.md", markdown(report))
    write_atomically(out / "pareto.png", png.getvalue())
    diagram = reliability_figure(rows, f"Reliability of each model on {Path(report['settings']['eval']).name}")
    if diagram is not None:
        write_atomically(out / "reliability.png", diagram)
