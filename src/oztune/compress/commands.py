"""The compression commands: quantize, prune, distill, compress."""

from __future__ import annotations

from oztune.cli import command


# --- quantize --------------------------------------------------------------------------------------------------

import time  # noqa: E402
from dataclasses import asdict, dataclass, field, replace  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from oztune.errors import OztuneError, check_at_least_1, check_positive  # noqa: E402
from oztune.models.hub import format_size  # noqa: E402
from oztune.train import distributed  # noqa: E402
from oztune.train.distributed import is_main_process  # noqa: E402


@dataclass
class QuantizeArgs:
    """Quantize a fine-tuned classifier to int8: every Linear runs int8 x int8 (weights per output channel,
    activations per token at run time), embeddings are stored int8. Optionally quantization-aware
    fine-tuning first, when plain quantization loses too much.

    Args:
        model: fine-tuned model directory (from oztune finetune, prune or distill).
        output: directory to write the quantized model to (replaced atomically).
        scheme: int8 (dynamic per-token int8 activations x per-channel int8 weights in every Linear).
        skip: module-name patterns kept in fp32, comma-separated (e.g. head.*,backbone.layers.5.*); patterns that
            leave nothing to quantize are refused.
        embeddings: int8 (weight-only, one scale per row) or none (keep them fp32).
        weight_bits: 8, or 7 (the Linear weights' codes within +-63: what oneDNN's int8 kernel computes exactly
            and fast on x86 CPUs without VNNI). Default: 7 on such a CPU, else 8.
        eval: labelled file: print the metrics before and after quantization.
        qat_train: labelled file for quantization-aware fine-tuning before converting (default: none).
        qat_epochs: epochs of quantization-aware fine-tuning (default 1; only with --qat-train).
        qat_lr: peak learning rate of quantization-aware fine-tuning (default 2e-5; only with --qat-train).
        max_train_examples: quantization-aware fine-tuning on a seeded random sample of this many examples of
            --qat-train (the sample oztune finetune takes with the same number and --seed).
        batch_size: examples per step of quantization-aware fine-tuning and per forward pass of evaluation.
        max_length: longest input in tokens (default: the length the model was fine-tuned with).
        text_column: column holding the text.
        text_pair_column: column holding the second text of a pair.
        label_column: column holding the label.
        seed: seed of quantization-aware fine-tuning.
        progress: show progress bars and the start and per-epoch lines (--no-progress: only the result).
    """

    model: str = ""
    output: str = ""
    scheme: str = "int8"
    skip: list[str] = field(default_factory=list)
    embeddings: str = "int8"
    weight_bits: int | None = None
    eval: str | None = None
    qat_train: str | None = None
    qat_epochs: int | None = None  # (None: not given, QAT_EPOCHS; so that one given without --qat-train is seen)
    qat_lr: float | None = None  # (None: not given, QAT_LR)
    max_train_examples: int | None = None
    batch_size: int = 32
    max_length: int | None = None
    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str | None = None
    seed: int = 42
    progress: bool = True


QAT_EPOCHS, QAT_LR = 1, 2e-5  # the defaults of --qat-epochs and --qat-lr


def run_quantize(a: QuantizeArgs) -> dict:
    """Load, (fine-tune with fake quantization,) quantize, evaluate and save; returns the run record.

    Under torchrun every process runs this and trains its share of each batch of the quantization-aware
    fine-tuning; only rank 0 evaluates and saves, the others wait for it (as
    :func:`oztune.compress.distill.run_distill`).
    """
    from oztune.compress.quantize import EMBEDDINGS, SCHEMES, WEIGHT_BITS_CHOICES, QuantConfig
    from oztune.outdir import check_output_dir
    from oztune.train.finetune import check_sample_size, check_seed

    for option, value, known in (("--scheme", a.scheme, SCHEMES), ("--embeddings", a.embeddings, EMBEDDINGS),
                                 ("--weight-bits", a.weight_bits, (None, *WEIGHT_BITS_CHOICES))):
        if value not in known:  # (QuantConfig's own message names no option)
            raise OztuneError(f"{option} must be one of {', '.join(str(k) for k in known if k)}, not {value!r}")
    config = QuantConfig(a.scheme, a.embeddings, list(a.skip), a.weight_bits)
    for option, count in (("--qat-epochs", a.qat_epochs), ("--batch-size", a.batch_size),
                          ("--max-length", a.max_length)):
        check_at_least_1(option, count)
    check_sample_size(a.max_train_examples)
    if a.max_train_examples is not None and not a.qat_train:  # (it would be ignored: no fine-tuning runs)
        raise OztuneError("--max-train-examples samples --qat-train's examples; give --qat-train FILE too")
    check_positive("--qat-lr", a.qat_lr)
    for option, value in (("--qat-epochs", a.qat_epochs), ("--qat-lr", a.qat_lr)):
        if value is not None and not a.qat_train:  # (it would be ignored, and look as if QAT had run)
            raise OztuneError(f"{option} is for quantization-aware fine-tuning, which runs only with --qat-train; "
                              "give --qat-train FILE too")
    a = replace(a, qat_epochs=QAT_EPOCHS if a.qat_epochs is None else a.qat_epochs,
                qat_lr=QAT_LR if a.qat_lr is None else a.qat_lr)
    check_seed(a.seed)
    check_output_dir(a.output, inputs=(a.model, a.eval, a.qat_train))
    with distributed.joined() as env:  # (the other ranks wait while rank 0 saves)
        return _run_quantize(a, config, env.is_main)


def _run_quantize(a: QuantizeArgs, config, saves: bool) -> dict:
    from oztune.compress.distill import load_trained, trained_text_pairs
    from oztune.compress.quantize import prepare_qat_, quantization_record, quantize_
    from oztune.data.labels import gold_label2id
    from oztune.data.load import Columns, encode_examples, read_labelled
    from oztune.models.hub import read_config, save_classifier, weights_mb
    from oztune.train.finetune import sample
    from oztune.train.loop import TrainConfig, evaluate, fit

    model, enc, meta = load_trained(a.model, "--model", a.max_length, int8_ok=True)  # refused below, in its words
    if read_config(meta["path"]).get("oztune", {}).get("quantization"):
        raise OztuneError(f"--model {a.model}: already quantized; quantize the fp32 model it came from")
    kind = model.head_cfg.problem_type
    cols = Columns(a.text_column, a.text_pair_column, a.label_column)

    def read(path: str, text_pairs: bool | None) -> list:
        return read_labelled(path, cols, problem_type=kind, text_pairs=text_pairs)

    def encoded(examples: list, path: str):
        label2id = None if kind == "regression" else gold_label2id(meta["id2label"], [e.label for e in examples])
        return encode_examples(examples, enc, label2id, kind, path)

    train_ex = read(a.qat_train, meta["text_pairs"]) if a.qat_train else None
    # (a model that does not record its kind: --eval must be of --qat-train's, as the other recipes' eval files,
    # and the model fine-tuned on it records that kind; without --qat-train it stays unrecorded)
    text_pairs = trained_text_pairs(meta["text_pairs"], train_ex)
    eval_data = encoded(read(a.eval, text_pairs), a.eval) if a.eval else None
    before = evaluate(model, eval_data, a.batch_size) if eval_data and saves else {}  # (rank 0 reports)
    start, qat = time.perf_counter(), {}
    if a.qat_train:
        train = encoded(sample(train_ex, a.max_train_examples, a.seed), a.qat_train)
        prepare_qat_(model, config)
        result = fit(model, train, TrainConfig(epochs=a.qat_epochs, batch_size=a.batch_size, lr=a.qat_lr, seed=a.seed,
                                               freeze_embeddings=True, progress=a.progress), eval_data)
        qat = {"train": a.qat_train, "examples": len(train), "epochs": a.qat_epochs, "lr": a.qat_lr,
               "history": result.history, "seconds": round(result.seconds, 1)}
    quantize_(model.eval(), config)
    after = evaluate(model, eval_data, a.batch_size) if eval_data and saves else {}
    record = quantization_record(config)
    run = {"command": "quantize", "source": str(a.model), "args": asdict(a), "quantization": record, "qat": qat,
           "metrics_before": before, "metrics": after, "seconds": round(time.perf_counter() - start, 1),
           "file_mb_before": round(weights_mb(Path(meta["path"])), 6), "torch": torch.__version__,
           "source_run": meta.get("run", {})}
    if not saves:
        return run
    save_classifier(model, enc, a.output, meta["id2label"], run=run, quantization=record,
                    card=_card(a, run, text_pairs), text_pairs=text_pairs)
    run["file_mb"] = round(weights_mb(Path(a.output)), 6)
    return run


def _card(a: QuantizeArgs, run: dict, text_pairs: bool | None) -> str:
    from oztune.compress.distill import recipe_card

    return recipe_card("int8 classifier (oztune quantize)", [
        f"Source: `{a.model}`; every Linear int8 x int8 (weights per output channel, activations per token at run "
        f"time),\n  weights in {run['quantization']['weight_bits']}-bit codes; embeddings: {a.embeddings}; kept fp32: "
        f"{', '.join(a.skip) or 'nothing'}",
        "Quantization-aware fine-tuning: " + (f"{a.qat_epochs} epoch(s) on `{a.qat_train}`" if a.qat_train else "none"),
    ], run["metrics_before"], run["metrics"], a.output, columns=("fp32", "int8"),
                       text_pairs=text_pairs)


@command("quantize", QuantizeArgs, "quantize a fine-tuned model to int8 (optionally after quantization-aware fine-tuning)")
def quantize_cmd(a: QuantizeArgs) -> int:
    run = run_quantize(a)
    if not is_main_process():  # under torchrun only rank 0 reports
        return 0
    print(f"\nquantized {a.model} ({a.scheme}, {run['quantization']['weight_bits']}-bit weight codes, embeddings {a.embeddings}"
          f"{', fp32: ' + ','.join(a.skip) if a.skip else ''}); saved to {a.output}")
    print(f"weights: {format_size(run['file_mb_before'])} -> {format_size(run['file_mb'])}")
    for k, v in run["metrics"].items():
        if isinstance(v, float):
            print(f"{k} on {a.eval}: {run['metrics_before'][k]:.4f} (fp32) -> {v:.4f} (int8)")
    return 0


# --- prune, distill, compress -------------------------------------------------------------------------------

from oztune.compress.distill import DistillArgs, run_distill  # noqa: E402
from oztune.compress.prune import PruneArgs, run_prune  # noqa: E402
from oztune.compress.report import latency_words, points_of  # noqa: E402
from oztune.compress.search import CompressArgs, compress  # noqa: E402


def _score(metrics: dict) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float) and k not in ("train_loss",))


@command("prune", PruneArgs, "prune a fine-tuned model (weights, or heads/neurons/layers) with distillation recovery")
def prune_cmd(a: PruneArgs) -> int:
    run = run_prune(a)
    if not is_main_process():  # under torchrun only rank 0 reports
        return 0
    print(f"\npruned {a.model}: {run['shape']}, {run['parameters'] / 1e6:.2f}M parameters, "
          f"encoder sparsity {run['sparsity']:.1%}; saved to {a.output}")
    print(f"before: {_score(run['metrics_before'])}\nafter:  {_score(run['metrics'])}")
    return 0


@command("distill", DistillArgs, "distil a fine-tuned teacher into a smaller student")
def distill_cmd(a: DistillArgs) -> int:
    run = run_distill(a)
    if not is_main_process():  # under torchrun only rank 0 reports
        return 0
    s = run["student"]
    print(f"\nstudent: {s['layers']} layers, {s['parameters'] / 1e6:.2f}M parameters; saved to {a.output}")
    print(f"teacher: {_score(run['teacher_metrics'])}\nstudent: {_score(run['metrics'])}")
    return 0


@command("compress", CompressArgs, "try int8, pruning and both; keep the fastest model within an accuracy budget")
def compress_cmd(a: CompressArgs) -> int:
    report = compress(a)
    if not is_main_process():  # under torchrun only rank 0 reports
        return 0
    best = next(r for r in report["variants"] if r["name"] == report["chosen"])
    print(f"\nkept {best['name']}: {points_of(best['metric'])} {best['score']:.2f} ({best['change']:+.2f} pt), "
          f"{format_size(best['file_mb'])}, {best['speedup']:.2f}x fp32 throughput; "
          f"saved to {a.output} (report.md, pareto.png)")
    return 0


# --- compare ------------------------------------------------------------------------------------------------

from oztune.compress.compare import MARK, CompareArgs, compare  # noqa: E402


@command("compare", CompareArgs, "measure saved models side by side: score, size, latency, throughput")
def compare_cmd(a: CompareArgs) -> int:
    report = compare(a)
    rows = report["variants"]
    width = max(len("model"), *(len(r["name"]) for r in rows))  # (the header, were every name shorter)
    points = points_of(rows[0]["metric"])  # accuracy, or pearson x100 and micro_f1 x100
    score = max(9, len(points))
    print(f"{'model':<{width}}  {points:>{score}}  {'change':>6}  {'size':>8}  {'batch-1 ms':>10}  "
          f"{'texts/s':>8}  {'speed-up':>8}")
    for r in rows:
        flag = f"  <- {MARK}" if r["name"] == report["chosen"] else ""
        print(f"{r['name']:<{width}}  {r['score']:>{score}.2f}  {r['change']:>+6.2f}  {format_size(r['file_mb']):>8}  "
              f"{r['latency_p50_ms']:>10.2f}  {r['throughput']:>8.0f}  {r['speedup']:>7.2f}x{flag}")
    timed, total = rows[0]["latency_texts"], report["settings"]["eval_examples"]
    every = "every eval text" if timed >= total else f"all {total}"
    print(f"batch-1 ms: p50 over {latency_words(timed, total)}; texts/s: batch 64 over {every}")
    for r in rows:  # (a score that means nothing, e.g. pearson of constant predictions, says so)
        if "note" in r["metrics"]:
            print(f"note, {r['name']}: {r['metrics']['note']}")
    if a.output:
        print(f"report: {a.output}/report.md, report.json, pareto.png")
    return 0
