"""What the benchmarks share: timing and profiling helpers and the ONNX Runtime peer (the HF model exported to ONNX,
fp32 and ``onnxruntime.quantization.quantize_dynamic`` int8), so every script times the same peer."""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

# how to make the model a script is given (its message when the directory is missing); as bench/run_all.sh makes them
FINETUNE = ("oztune finetune --train data/sst2/train.tsv --eval data/sst2/dev.tsv --output {} --epochs 1 "
            "--max-train-examples 8000 --lr 1e-4 --seed 0 (bench/run_all.sh's runs/sst2-8k)")
QUANTIZE = "oztune quantize --model <a fine-tuned model> --output {} (bench/run_all.sh's runs/sst2-8k-int8)"
ORT_INPUTS = ["input_ids", "attention_mask", "token_type_ids"]


def need_model(path: str | Path, how: str) -> Path:
    """``path`` if it is a model directory (config.json); else exit with a message naming it and ``how`` to make it.

    Without this a missing directory was taken for a hub id: a download attempt and a traceback."""
    p = Path(path)
    if not (p / "config.json").is_file():
        what = "no such directory" if not p.exists() else "not a model directory (no config.json)"
        sys.exit(f"{sys.argv[0]}: {p}: {what}. Make it with: {how}")
    return p


def load_words(load) -> str:
    """One line on the machine's load while a benchmark timed (``load``: an ``oztune.runtime.Contention``)."""
    if load.others is None:
        return "other processes' share of the cores: unknown here (no /proc/stat)"
    said = f"other processes took {load.others:.2f} cores on average while this timed"
    return said + (" -- a busy machine: the times are slower than a quiet machine's, and a ratio between peers "
                   "timed at different moments may be off" if load.busy else " (a quiet machine)")


def best_time(fn, repeats: int) -> float:
    """Best of ``repeats`` wall times: the machine is shared, the minimum is the least disturbed."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def ops_by_self_time(prof, top: int) -> list[tuple[object, float]]:
    """The ``top`` operators of a finished ``torch.profiler`` run by self CPU time: (event, share of all)."""
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return [(e, e.self_cpu_time_total / total) for e in events[:top]]


def file_mb(*paths: Path) -> float:
    return sum(Path(p).stat().st_size for p in paths) / 1e6


def export_hf_onnx(hf_model, work: Path) -> tuple[Path, Path]:
    """The HF model exported to ONNX with dynamic batch and length (fp32), and ORT's dynamic int8 of it."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32, int8 = work / "hf_fp32.onnx", work / "hf_int8.onnx"
    ids = torch.ones(2, 8, dtype=torch.long)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    axes = {n: {0: "batch", 1: "sequence"} for n in ORT_INPUTS} | {"logits": {0: "batch"}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(hf_model, (ids, mask, torch.zeros_like(ids)), str(fp32), input_names=ORT_INPUTS,
                          output_names=["logits"], dynamic_axes=axes, opset_version=17, dynamo=False)
        quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8)
    return fp32, int8


def ort_runner(path: Path, tokenizer, threads: int):
    """texts -> logits through an ONNX Runtime session with ``threads`` intra-op threads, HF tokenizer included."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def run(texts, pairs=None):
        b = tokenizer(texts, pairs, padding=True, truncation=True, max_length=128, return_tensors="np")
        return sess.run(["logits"], {n: b[n].astype(np.int64) for n in ORT_INPUTS})[0]

    return run
