"""The compression commands: quantize, prune, distill, compress, compare (without torch: see
:mod:`oztune.commands`; the recipes they run are imported inside them)."""

from __future__ import annotations

from oztune.cli import command, gap
from oztune.compress.args import CompareArgs, CompressArgs, DistillArgs, PruneArgs, QuantizeArgs


# --- quantize --------------------------------------------------------------------------------------------------

@command("quantize", QuantizeArgs, "quantize a fine-tuned model to int8 (optionally after quantization-aware fine-tuning)",
         needs=("oztune.compress.quantize_recipe",))
def quantize_cmd(a: QuantizeArgs) -> int:
    from oztune.compress.quantize_recipe import run_quantize
    from oztune.models.hub import format_size
    from oztune.train.distributed import is_main_process

    run = run_quantize(a)
    if not is_main_process():  # under torchrun only rank 0 reports
        return 0
    print(f"{gap(a)}quantized {a.model} ({a.scheme}, {run['quantization']['weight_bits']}-bit weight codes, embeddings {a.embeddings}"
          f"{', fp32: ' + ','.join(a.skip) if a.skip else ''}); saved to {a.output}")
    print(f"weights: {format_size(run['file_mb_before'])} -> {format_size(run['file_mb'])}")
    for k, v in run["metrics"].items():
        if isinstance(v, float):
            print(f"{k} on {a.eval}: {run['metrics_before'][k]:.4f} (fp32) -> {v:.4f} (int8)")
    return 0


# --- prune, distill, compress -------------------------------------------------------------------------------

def _score(metrics: dict) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float) and k not in ("train_loss",))


@command("prune", PruneArgs, "prune a fine-tuned model (weights, or heads/neurons/layers) with distillation recovery",
         needs=("oztune.compress.prune", "oztune.compress.distillation"))
def prune_cmd(a: PruneArgs) -> int:
    from oztune.compress.prune import run_prune
    from oztune.train.distributed import is_main_process

    run = run_prune(a)
    if not is_main_process():  # under torchrun only rank 0 reports
        return 0
    print(f"{gap(a)}pruned {a.model}: {run['shape']}, {run['parameters'] / 1e6:.2f}M parameters, "
          f"encoder sparsity {run['sparsity']:.1%}; saved to {a.output}")
    print(f"before: {_score(run['metrics_before'])}\nafter:  {_score(run['metrics'])}")
    return 0


@command("distill", DistillArgs, "distil a fine-tuned teacher into a smaller student",
         needs=("oztune.compress.distillation",))
def distill_cmd(a: DistillArgs) -> int:
    from oztune.compress.distillation import run_distill
    from oztune.train.distributed import is_main_process

    run = run_distill(a)
    if not is_main_process():  # under torchrun only rank 0 reports
        return 0
    s = run["student"]
    print(f"{gap(a)}student: {s['layers']} layers, {s['parameters'] / 1e6:.2f}M parameters; saved to {a.output}")
    print(f"teacher: {_score(run['teacher_metrics'])}\nstudent: {_score(run['metrics'])}")
    return 0


@command("compress", CompressArgs, "try int8, pruning and both; keep the fastest model within an accuracy budget",
         needs=("oztune.compress.search",))
def compress_cmd(a: CompressArgs) -> int:
    from oztune.compress.report import busy_words, points_of, report_files
    from oztune.compress.search import compress
    from oztune.models.hub import format_size
    from oztune.train.distributed import is_main_process

    report = compress(a)
    if not is_main_process():  # under torchrun only rank 0 reports
        return 0
    best = next(r for r in report["variants"] if r["name"] == report["chosen"])
    ece = f", ECE {best['ece']:.3f}" if best.get("ece") is not None else ""  # (a classifier's)
    print(f"{gap(a)}kept {best['name']}: {points_of(best['metric'])} {best['score']:.2f} ({best['change']:+.2f} pt)"
          f"{ece}, {format_size(best['file_mb'])}, {best['speedup']:.2f}x fp32 throughput, "
          f"{best['latency_speedup']:.2f}x "
          f"its batch-1 speed; saved to {a.output} ({', '.join(report_files(report['variants']))})")
    _say_busy(busy_words(report["variants"], in_turns=False))
    return 0


def _say_busy(words: str | None) -> None:
    if words:
        print(f"note: {words}")


# --- compare ------------------------------------------------------------------------------------------------

@command("compare", CompareArgs, "measure saved models side by side: score, size, latency, throughput",
         needs=("oztune.compress.compare",))
def compare_cmd(a: CompareArgs) -> int:
    from oztune.compress.compare import MARK, compare
    from oztune.compress.report import busy_words, latency_words, points_of, report_files
    from oztune.models.hub import format_size

    report = compare(a)
    rows = report["variants"]
    width = max(len("model"), *(len(r["name"]) for r in rows))  # (the header, were every name shorter)
    points = points_of(rows[0]["metric"])  # accuracy, or pearson x100 and micro_f1 x100
    score = max(9, len(points))
    ece = all(r.get("ece") is not None for r in rows)  # (a classifier's: regression has none)
    ece_head = f"  {'ECE':>5}" if ece else ""
    print(f"{'model':<{width}}  {points:>{score}}  {'change':>6}{ece_head}  {'size':>8}  {'batch-1 ms':>10}  "
          f"{'texts/s':>8}  {'speed-up':>8}")
    for r in rows:
        by = " (batch 1)" if a.fastest == "latency" else ""
        flag = f"  <- {MARK}{by}" if r["name"] == report["chosen"] else ""
        ece_cell = f"  {r['ece']:>5.3f}" if ece else ""
        print(f"{r['name']:<{width}}  {r['score']:>{score}.2f}  {r['change']:>+6.2f}{ece_cell}  "
              f"{format_size(r['file_mb']):>8}  {r['latency_p50_ms']:>10.2f}  {r['throughput']:>8.0f}  "
              f"{r['speedup']:>7.2f}x{flag}")
    timed, total = rows[0]["latency_texts"], report["settings"]["eval_examples"]
    every = "every eval text" if timed >= total else f"all {total}"
    print(f"batch-1 ms: p50 over {latency_words(timed, total)}; texts/s: batch 64 over {every}")
    for r in rows:  # (a score that means nothing, e.g. pearson of constant predictions, says so)
        if "note" in r["metrics"]:
            print(f"note, {r['name']}: {r['metrics']['note']}")
    _say_busy(busy_words(rows, in_turns=True))
    if a.output:
        print(f"report: {a.output}/{', '.join(report_files(rows))}")
    return 0
