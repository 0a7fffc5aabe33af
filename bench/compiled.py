"""Compiled against eager inference for an int8 (or fp32) model, and the settings of oztune.models.compiled.

Variants, each a ``Classifier`` over its own copy of the model, timed round robin in one process (best of
``--repeats``), end to end with tokenization:

- eager: the default (packing on padded batches);
- compiled: ``Classifier.from_pretrained(dir, compile=True)`` (``oztune.models.compiled.OPTIONS``);
- compiled, dynamo's guards: the same with ``guard_filter_fn`` dropped (guards on module attributes too);
- compiled, pattern passes: the same with inductor's pattern passes on (explicit attention -> SDPA).

Workloads (SST-2 dev): batch 1 (``--batch1-texts`` sentences), batches of 16 in file order and sorted by
length (the first 512 sentences; a server's replica sees batches of ~15), batches of 64 sorted (all 872).
Also ``torch._int_mm`` per call at 16-64 rows for the three matmul shapes of MiniLM (the batch-1 floor).

    python bench/compiled.py --model runs/sst2-8k-int8 [--threads 2] [--quick]
Prints a table and writes bench/results/compiled.json. Compiling the variants takes a few minutes.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
from peers import QUANTIZE, best_time, need_model

ROOT = Path(__file__).resolve().parents[1]


def int_mm_us(rows: int, k: int, n: int, calls: int = 1000) -> float:
    """Microseconds per ``torch._int_mm`` of (rows, k) int8 by a transposed (n, k) int8 weight."""
    x = torch.randint(-127, 128, (rows, k), dtype=torch.int8)
    wt = torch.randint(-127, 128, (n, k), dtype=torch.int8).t()
    loop = lambda: [torch._int_mm(x, wt) for _ in range(calls)]  # noqa: E731
    loop()  # warm-up: oneDNN primitive creation
    return best_time(loop, 3) / calls * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(ROOT / "runs" / "sst2-8k-int8"), help="model directory (int8 or fp32)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch1-texts", type=int, default=300)
    ap.add_argument("--quick", action="store_true", help="one repeat, 64 texts at batch 1, no variants")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "compiled.json"))
    a = ap.parse_args()
    need_model(a.model, QUANTIZE.format(a.model))
    torch.set_num_threads(a.threads)
    from oztune.api import Classifier
    from oztune.data.readers import read_examples
    from oztune.models.compiled import compile_for_inference

    texts = [e.text for e in read_examples(ROOT / "data" / "sst2" / "dev.tsv")]
    base = Classifier.from_pretrained(a.model)
    lengths = np.array([len(ids) for ids, _ in base.encoder.encode(texts)])
    def batches(idx: list[int], size: int) -> list[list[str]]:
        return [[texts[i] for i in idx[j:j + size]] for j in range(0, len(idx), size)]

    by_len = sorted(range(len(texts)), key=lambda i: -lengths[i])  # longest first
    workloads = {  # name -> list of batches
        "batch 1": batches(list(range(64 if a.quick else a.batch1_texts)), 1),
        "batch 16, file order": batches(list(range(512)), 16),
        "batch 16, sorted": batches([i for i in by_len if i < 512], 16),
        "batch 64, sorted": batches(by_len, 64),
    }
    variants = {"eager": None, "compiled": {}}
    if not a.quick:
        variants |= {"compiled, dynamo's guards": {"guard_filter_fn": None},
                     "compiled, pattern passes": {"pattern_matcher": True}}
    clfs, warm = {}, {}
    for name, options in variants.items():
        model = copy.deepcopy(base.model)
        if options is not None:
            model = compile_for_inference(model, options)
        clf = clfs[name] = Classifier(model, base.encoder, base.id2label)
        t = time.perf_counter()
        with torch.no_grad():
            for batches in workloads.values():  # every graph compiles here, outside the timings
                clf.logits(batches[0])
                clf.logits(batches[-1])
        warm[name] = time.perf_counter() - t
    want = {w: np.concatenate([base.logits(b) for b in batches]) for w, batches in workloads.items()}
    best = {(v, w): float("inf") for v in clfs for w in workloads}
    agree = {}
    with torch.no_grad():
        for _ in range(1 if a.quick else a.repeats):
            for w, batches in workloads.items():
                for v, clf in clfs.items():  # round robin: a noisy spell hits every variant
                    t = time.perf_counter()
                    out = [clf.logits(b) for b in batches]
                    best[(v, w)] = min(best[(v, w)], time.perf_counter() - t)
                    agree[(v, w)] = float((np.concatenate(out).argmax(1) == want[w].argmax(1)).mean())
    mm = [{"rows": r, "k": k, "n": n, "us": round(int_mm_us(r, k, n), 1)}
          for k, n in ((384, 1152), (384, 1536), (1536, 384)) for r in (16, 25, 32, 48, 64)]

    n_texts = {w: sum(len(b) for b in batches) for w, batches in workloads.items()}
    rows = [{"variant": v, "workload": w, "texts_per_s": round(n_texts[w] / best[(v, w)], 1),
             "ms_per_batch": round(1e3 * best[(v, w)] / len(workloads[w]), 3),
             "vs_eager": round(best[("eager", w)] / best[(v, w)], 3), "same_labels": agree[(v, w)]}
            for w in workloads for v in clfs]
    print(f"{a.model}, {a.threads} threads; compile + first calls: "
          + ", ".join(f"{v} {warm[v]:.0f} s" for v in clfs))
    print(f"{'workload':<22}{'variant':<28}{'texts/s':>9}{'ms/batch':>10}{'vs eager':>10}{'labels':>8}")
    for r in rows:
        print(f"{r['workload']:<22}{r['variant']:<28}{r['texts_per_s']:>9.0f}{r['ms_per_batch']:>10.2f}"
              f"{r['vs_eager']:>9.2f}x{r['same_labels']:>8.1%}")
    print("\ntorch._int_mm, microseconds per call (rows x k @ k x n):")
    for k, n in ((384, 1152), (384, 1536), (1536, 384)):
        print(f"  {k}x{n}: " + "  ".join(f"{m['rows']} rows {m['us']:.0f}" for m in mm if (m["k"], m["n"]) == (k, n)))
    result = {"model": a.model, "threads": a.threads, "warmup_s": {v: round(s, 1) for v, s in warm.items()},
              "rows": rows, "int_mm": mm}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
