"""Where a training step's time goes: torch.profiler over oztune's training steps on SST-2.

The same work as bench/train_speed.py (bundled MiniLM, batch 32, max length 128, the training loop's default
precision: bf16 autocast where the CPU has native bf16, else fp32; length-bucketed batches, fused AdamW), run for
a few warm-up steps and then profiled.

    python bench/profile_step.py [--steps 30] [--warmup 5] [--no-freeze] [--rows 25]
Prints the operators that take the most self CPU time and writes bench/results/profile_step.json. Also
the rate of the step's matrix products (their FLOPs, counted by ``torch.utils.flop_counter``, over the
profiled time of ``mm`` + ``addmm``) next to a large matmul's (2048^3, in the same dtype) in the same run: the GEMMs'
share of the machine's ceiling, which the peers' GEMMs share too.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from peers import best_time, ops_by_self_time

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--no-freeze", action="store_true", help="train the token embeddings too")
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "profile_step.json"))
    a = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 2)

    from oztune.data.dataset import encode_data, train_batches
    from oztune.data.readers import read_examples
    from oztune.models.hub import load_classifier
    from oztune.train.loop import (TrainConfig, autocast_dtype, clipped_step, default_loss, make_optimizer,
                                   seed_everything)

    seed_everything(0)
    train = read_examples(ROOT / "data" / "sst2" / "train.tsv")
    idx = np.random.default_rng(0).permutation(len(train))[:8000]
    train = [train[i] for i in idx]
    model, enc, _ = load_classifier(None, num_labels=2, max_length=128)
    data = encode_data(enc, [e.text for e in train], None, [int(e.label) for e in train])
    if not a.no_freeze:
        model.backbone.embed.word.weight.requires_grad_(False)
    cfg = TrainConfig(epochs=1, batch_size=32, lr=1e-4)
    opt, sched = make_optimizer(model, cfg, 250)
    params = [p for p in model.parameters() if p.requires_grad]
    batches = train_batches(data.lengths, 32, 0)
    model.train()

    dtype = autocast_dtype(cfg.precision)  # as fit: bf16 where the CPU has it natively, else None (fp32)

    def step(b):
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = default_loss(model, data.batch(b))
        loss.backward()
        clipped_step(opt, params, 1.0)  # as the training loop does
        sched.step()
        opt.zero_grad(set_to_none=True)

    for b in batches[: a.warmup]:
        step(b)
    work = batches[a.warmup: a.warmup + a.steps]
    t = time.perf_counter()
    for b in work:
        step(b)
    plain = (time.perf_counter() - t) / len(work)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for b in work:
            step(b)
    tokens = float(np.mean([data.lengths[b].max() for b in work]))
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        for b in work:
            step(b)
    flops = counter.get_flop_counts()["Global"]
    gemm_flops = sum(n for op, n in flops.items() if str(op).split(".")[-1] in ("mm", "addmm")) / len(work)
    gemm_s = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm")) / 1e6
    x = torch.randn(2048, 2048, dtype=dtype or torch.float32)
    x @ x
    ceiling = 2 * 2048 ** 3 / best_time(lambda: x @ x, 10) / 1e9
    gemm_rate = gemm_flops * len(work) / gemm_s / 1e9
    print(f"{len(work)} steps of 32, mean padded length {tokens:.1f}: {1000 * plain:.1f} ms per step "
          f"({32 / plain:.0f} examples/s) without the profiler, {'bf16 autocast' if dtype else 'fp32'}")
    print(f"GEMMs (mm + addmm): {gemm_flops / 1e9:.1f} GFLOP per step at {gemm_rate:.0f} GFLOP/s; a 2048^3 "
          f"{'bf16' if dtype else 'fp32'} matmul here: {ceiling:.0f} GFLOP/s ({100 * gemm_rate / ceiling:.0f}% of it)")
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.rows)
    print(table)
    top = [{"op": e.key, "self_ms_per_step": e.self_cpu_time_total / 1000 / len(work), "share": share,
            "calls_per_step": e.count / len(work)} for e, share in ops_by_self_time(prof, a.rows)]
    Path(a.out).write_text(json.dumps({"ms_per_step": 1000 * plain, "mean_padded_length": tokens,
                                       "threads": torch.get_num_threads(), "precision": "bf16" if dtype else "fp32",
                                       "gemm_gflop_per_step": gemm_flops / 1e9, "gemm_gflops": gemm_rate,
                                       "matmul_ceiling_gflops": ceiling, "top": top}, indent=2) + "\n")


if __name__ == "__main__":
    main()
