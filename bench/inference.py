"""fp32 inference on SST-2 dev: oztune against Hugging Face transformers, same model, same batches, one run.

End to end: tokenization, padding, forward, softmax. Batches of 64 in file order ("unsorted") and
after sorting by token length ("sorted"), and batch 1. Model: a fine-tuned model directory (--model),
or the bundled MiniLM with a fresh head (timing only). oztune runs twice: with its Linear kernel at
inference (oneDNN's, :mod:`oztune.models.kernels`) and with PyTorch's ``F.linear`` (MKL), the column "MKL".

    python bench/inference.py --model runs/sst2      # or --quick (128 sentences)
Prints a table and writes bench/results/inference.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from peers import FINETUNE, load_words, need_model

from oztune.runtime import Contention

ROOT = Path(__file__).resolve().parents[1]


def timed(fns: list, repeats: int) -> list[tuple[float, object]]:
    """Each function's best of ``repeats`` wall times and its result, the functions taking turns (the machine is
    shared: the minimum is the least disturbed, and turns spread a busy spell over all of them)."""
    best, out = [float("inf")] * len(fns), [None] * len(fns)
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            t = time.perf_counter()
            out[k] = fn()
            best[k] = min(best[k], time.perf_counter() - t)
    return list(zip(best, out))


def batches(texts: list[str], lengths: list[int], size: int, sort: bool) -> list[list[int]]:
    order = np.argsort(lengths, kind="stable") if sort else np.arange(len(texts))
    return [list(order[i:i + size]) for i in range(0, len(order), size)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="fine-tuned model directory (default: bundled MiniLM, new head)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "inference.json"))
    a = ap.parse_args()
    if a.model is not None:
        need_model(a.model, FINETUNE.format(a.model))
    torch.set_num_threads(os.cpu_count() or 2)
    import transformers as T

    from oztune.data.readers import read_examples
    from oztune.models import kernels
    from oztune.models.hub import load_classifier, resolve_model

    dev = read_examples(ROOT / "data" / "sst2" / "dev.tsv")[: 128 if a.quick else None]
    texts, gold = [e.text for e in dev], np.array([int(e.label) for e in dev])
    path = resolve_model(a.model)
    model, enc, _ = load_classifier(path, num_labels=2, max_length=128)
    kernels.freeze_(model)  # as oztune.Classifier loads it
    mkl = load_classifier(path, num_labels=2, max_length=128)[0]  # not frozen: F.linear (MKL)
    hf = T.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    tok = T.AutoTokenizer.from_pretrained(path)
    lengths = [len(ids) for ids, _ in enc.encode(texts)]

    def oz(idx_batches, net=model):
        out = np.zeros(len(texts), dtype=np.int64)
        with torch.inference_mode():
            for idx in idx_batches:
                b = enc([texts[i] for i in idx])
                out[idx] = net(b["input_ids"], b["attention_mask"], b["token_type_ids"]).softmax(-1).argmax(-1).numpy()
        return out

    def hf_run(idx_batches):
        out = np.zeros(len(texts), dtype=np.int64)
        with torch.inference_mode():
            for idx in idx_batches:
                b = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=128, return_tensors="pt")
                out[idx] = hf(**b).logits.softmax(-1).argmax(-1).numpy()
        return out

    rows = {}
    watch = Contention(torch.get_num_threads()).start()
    for mode, size, sort in (("batch 64 unsorted", 64, False), ("batch 64 sorted", 64, True), ("batch 1", 1, False)):
        bs = batches(texts, lengths, size, sort)
        reps = max(1, a.repeats - 1) if size == 1 else a.repeats
        (t_hf, p_hf), (t_mkl, p_mkl), (t_oz, p_oz) = timed(
            [lambda: hf_run(bs), lambda: oz(bs, mkl), lambda: oz(bs)], reps)
        rows[mode] = {"hf_s": t_hf, "oztune_s": t_oz, "speedup": t_hf / t_oz, "oztune_mkl_s": t_mkl,
                      "speedup_mkl": t_hf / t_mkl, "hf_accuracy": float((p_hf == gold).mean()),
                      "oztune_accuracy": float((p_oz == gold).mean()), "agreement": float((p_hf == p_oz).mean()),
                      "agreement_mkl": float((p_mkl == p_oz).mean())}
    watch.stop()
    print(f"\nfp32 inference, SST-2 dev ({len(texts)} sentences), end to end, {torch.get_num_threads()} threads, model {a.model or 'bundled MiniLM'}")
    print(load_words(watch))
    print(f"oztune's Linear kernel: {'oneDNN' if kernels.ONEDNN_LINEAR else 'MKL (turned off)'}; "
          "MKL: the same with F.linear")
    print(f"{'batches':<20} {'HF s':>8} {'MKL s':>8} {'x HF':>6} {'oztune s':>9} {'x HF':>6} {'x MKL':>6} {'agree':>7}")
    for mode, r in rows.items():
        print(f"{mode:<20} {r['hf_s']:>8.2f} {r['oztune_mkl_s']:>8.2f} {r['speedup_mkl']:>5.2f}x {r['oztune_s']:>9.2f} "
              f"{r['speedup']:>5.2f}x {r['oztune_mkl_s'] / r['oztune_s']:>5.2f}x {100 * r['agreement']:>6.1f}%")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"sentences": len(texts), "model": a.model, "rows": rows,
                                       "other_cores": watch.others, "busy_machine": watch.busy}, indent=2) + "\n")


if __name__ == "__main__":
    main()
