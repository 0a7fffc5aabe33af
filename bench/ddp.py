"""Data-parallel fine-tuning: 2 processes (torchrun, gloo) x batch 16 against 1 process x batch 32.

Same data, seed and global batch, bundled MiniLM on SST-2 train examples. Reports training examples/s
(tokenization and evaluation excluded, as ``oztune finetune`` measures them) and the wall time of the
whole command. On a 2-core machine there is nothing to gain: each process gets one core. That the two
give the same model (without dropout) is checked by tests/train/test_ddp.py, not here.

    python bench/ddp.py            # 2,000 examples, 1 epoch
    python bench/ddp.py --quick    # 256 examples (< 1 minute)
Prints a table and writes bench/results/ddp.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def finetune(out: Path, examples: int, epochs: int, batch_size: int, processes: int) -> tuple[dict, float]:
    """Run ``oztune finetune`` (under torchrun when processes > 1); returns run.json and the wall time."""
    launcher = [sys.executable, "-m", "oztune"]
    if processes > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
                    "-m", "oztune"]
    cmd = [*launcher, "finetune", "--train", str(ROOT / "data" / "sst2" / "train.tsv"), "--output", str(out),
           "--max-train-examples", str(examples), "--epochs", str(epochs), "--batch-size", str(batch_size),
           "--max-length", "64", "--checkpoint-every", "0", "--no-progress"]
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    wall = time.perf_counter() - t
    if r.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return json.loads((out / "run.json").read_text()), wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="256 examples")
    ap.add_argument("--examples", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "ddp.json"))
    a = ap.parse_args()
    examples = 256 if a.quick else a.examples
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for processes, batch in ((1, 32), (2, 16)):
            out = Path(tmp) / f"p{processes}"
            run, wall = finetune(out, examples, a.epochs, batch, processes)
            rows.append({"processes": processes, "batch_per_process": batch, "global_batch": processes * batch,
                         "train_examples_per_s": run["train_examples_per_s"], "train_seconds": run["train_seconds"],
                         "wall_seconds": round(wall, 1)})
    result = {"examples": examples, "epochs": a.epochs, "cpu_cores": os.cpu_count(), "torch": torch.__version__,
              "rows": rows}
    print(f"DDP on {examples:,} SST-2 examples, {a.epochs} epoch(s), {os.cpu_count()} cores")
    print(f"{'processes':>9} {'batch':>11} {'train ex/s':>10} {'train s':>8} {'wall s':>7}")
    for r in rows:
        print(f"{r['processes']:>9} {r['batch_per_process']:>5} x {r['processes']:<3} {r['train_examples_per_s']:>10.1f} "
              f"{r['train_seconds']:>8.1f} {r['wall_seconds']:>7.1f}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
