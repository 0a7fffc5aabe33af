"""The quantize recipe: load a fine-tuned model, optionally fine-tune it with fake quantization, convert it to
int8, evaluate before and after, save it with its record and model card."""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from oztune.compress.args import QuantizeArgs
from oztune.errors import OztuneError, check_at_least_1, check_positive
from oztune.train import distributed

QAT_EPOCHS, QAT_LR = 1, 2e-5  # the defaults of --qat-epochs and --qat-lr


def run_quantize(a: QuantizeArgs) -> dict:
    """Load, (fine-tune with fake quantization,) quantize, evaluate and save; returns the run record.

    Under torchrun every process runs this and trains its share of each batch of the quantization-aware
    fine-tuning; only rank 0 evaluates and saves, the others wait for it (as
    :func:`oztune.compress.distillation.run_distill`).
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
    from oztune.compress.distillation import load_trained, trained_text_pairs
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
    from oztune.compress.distillation import recipe_card

    return recipe_card("int8 classifier (oztune quantize)", [
        f"Source: `{a.model}`; every Linear int8 x int8 (weights per output channel, activations per token at run "
        f"time),\n  weights in {run['quantization']['weight_bits']}-bit codes; embeddings: {a.embeddings}; kept fp32: "
        f"{', '.join(a.skip) or 'nothing'}",
        "Quantization-aware fine-tuning: " + (f"{a.qat_epochs} epoch(s) on `{a.qat_train}`" if a.qat_train else "none"),
    ], run["metrics_before"], run["metrics"], a.output, columns=("fp32", "int8"),
                       text_pairs=text_pairs)
