"""LoRA against full fine-tuning: bundled MiniLM on N SST-2 train examples, accuracy on SST-2 dev.

Both runs use ``oztune finetune`` with the same data, seed, epochs and batch; each with its default
learning rate (1e-4 full, 5e-4 LoRA) unless given. Reports dev accuracy, trainable parameters, training
examples/s and time. The issue's target: LoRA within 1.5 points of full fine-tuning on 8,000 examples.

    python bench/lora.py                 # 8,000 examples, 2 epochs, full dev set (872)
    python bench/lora.py --quick         # 200 examples, 1 epoch, 200 dev examples (< 1 minute on a quiet machine)
Prints a table and writes bench/results/lora.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SST2 = ROOT / "data" / "sst2"


def finetune(out: Path, dev: Path, a: argparse.Namespace, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "oztune", "finetune", "--train", str(SST2 / "train.tsv"), "--eval", str(dev),
           "--output", str(out), "--max-train-examples", str(a.examples), "--epochs", str(a.epochs),
           "--batch-size", "32", "--checkpoint-every", "0", "--no-progress", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    if r.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return json.loads((out / "run.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="200 examples, 1 epoch, 200 dev examples")
    ap.add_argument("--examples", type=int, default=8000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank (16: within the issue's 1.5 points here; 8 was 1.83 under, session 4)")
    ap.add_argument("--lora-lr", type=float, default=None, help="LoRA learning rate (default: oztune's)")
    ap.add_argument("--full-lr", type=float, default=None, help="full fine-tuning learning rate (default: oztune's)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "lora.json"))
    a = ap.parse_args()
    if a.quick:
        a.examples, a.epochs = 200, 1
    lines = (SST2 / "dev.tsv").read_text().splitlines(keepends=True)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        dev = Path(tmp) / "dev.tsv"
        dev.write_text("".join(lines[:201] if a.quick else lines))
        runs = {"full": ["--lr", str(a.full_lr)] if a.full_lr else [],
                "lora": ["--lora-rank", str(a.rank)] + (["--lr", str(a.lora_lr)] if a.lora_lr else [])}
        for name, extra in runs.items():
            run = finetune(Path(tmp) / name, dev, a, extra)
            rows[name] = {"accuracy": run["metrics"]["accuracy"], "best_epoch": run["metrics"]["epoch"],
                          "lr": run["args"]["lr"], "trainable_parameters": run["trainable_parameters"],
                          "parameters": run["parameters"], "train_examples_per_s": run["train_examples_per_s"],
                          "train_seconds": run["train_seconds"]}
    gap = 100 * (rows["full"]["accuracy"] - rows["lora"]["accuracy"])
    result = {"examples": a.examples, "epochs": a.epochs, "dev_examples": 200 if a.quick else len(lines) - 1,
              "lora_rank": a.rank, "torch": torch.__version__, "runs": rows, "accuracy_gap_points": round(gap, 2)}
    print(f"SST-2: {a.examples:,} train examples, {a.epochs} epoch(s), dev {result['dev_examples']} examples")
    print(f"{'run':<6} {'accuracy':>8} {'lr':>8} {'trainable':>12} {'train ex/s':>10} {'train s':>8}")
    for name, r in rows.items():
        print(f"{name:<6} {r['accuracy']:>8.4f} {r['lr']:>8.0e} {r['trainable_parameters']:>12,} "
              f"{r['train_examples_per_s']:>10.1f} {r['train_seconds']:>8.1f}")
    print(f"accuracy gap, full minus LoRA: {gap:+.2f} points")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
