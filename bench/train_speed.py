"""Training speed and accuracy: oztune against Hugging Face Trainer on the same work, in one run.

Work: the bundled all-MiniLM-L6-v2, N shuffled SST-2 train examples (default 8,000), 1 epoch, batch 32,
max length 128, lr 1e-4, linear schedule with 6% warm-up, then SST-2 dev accuracy.
Peer: HF Trainer with its best CPU options (bf16, group_by_length sampling, fused AdamW, dynamic padding; on a
CPU without native bf16, where autocast emulates it and runs slower than fp32, the Trainer runs fp32, as oztune's
``--precision auto`` does there).
Both train the whole network; oztune's default (frozen token embeddings) is another row. The Trainer
runs twice: as its users get it, and with the allocator settings oztune applies (oztune.runtime).

    python bench/train_speed.py            # full (about 3 x 1-2 minutes of training on 2 cores)
    python bench/train_speed.py --quick    # 1,000 examples
    python bench/train_speed.py --pairs 3  # + 3 pairs of fresh processes, Trainer then oztune's default
Prints a table and writes bench/results/train_speed.json.

On this shared VM a slow spell that hits one side of a run moves the ratio by 10-20%. ``--pairs N`` then
runs N more pairs, each run in a fresh process (so the Trainer runs as its users get it, without the settings
oztune applied to this one), alternating, and reports each pair's ratio and their median.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from peers import load_words

from oztune.runtime import Contention

ROOT = Path(__file__).resolve().parents[1]


def _native_bf16() -> bool:
    from oztune.train.loop import bf16_supported  # (what oztune's --precision auto goes by)

    return bf16_supported()


HF_BF16 = _native_bf16()
HF_ROW = f"HF Trainer ({'bf16' if HF_BF16 else 'fp32: no native bf16'}, group_by_length, fused AdamW)"
SST2 = ROOT / "data" / "sst2"


def sst2(n: int, seed: int = 0):
    from oztune.data.readers import read_examples

    train = read_examples(SST2 / "train.tsv")
    dev = read_examples(SST2 / "dev.tsv")
    idx = np.random.default_rng(seed).permutation(len(train))[:n]
    return [train[i] for i in idx], dev


def run_oztune(train, dev, freeze: bool) -> dict:
    from oztune.data.dataset import encode_data
    from oztune.models.hub import load_classifier
    from oztune.train.loop import TrainConfig, evaluate, fit, seed_everything

    seed_everything(0)
    model, enc, _ = load_classifier(None, num_labels=2, max_length=128)
    tr = encode_data(enc, [e.text for e in train], None, [int(e.label) for e in train])
    dv = encode_data(enc, [e.text for e in dev], None, [int(e.label) for e in dev])
    cfg = TrainConfig(epochs=1, batch_size=32, lr=1e-4, warmup_ratio=0.06, freeze_embeddings=freeze, progress=False, seed=0)
    result = fit(model, tr, cfg)
    return {"examples_per_s": result.examples_per_s, "train_s": result.seconds, "dev_accuracy": evaluate(model, dv)["accuracy"]}


def run_hf_trainer(train, dev, out_dir: str) -> dict:
    import transformers as T

    from oztune.models.hub import resolve_model

    T.set_seed(0)
    path = resolve_model(None)
    tok = T.AutoTokenizer.from_pretrained(path)
    model = T.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)

    def enc(examples):
        b = tok([e.text for e in examples], truncation=True, max_length=128)
        return [{"input_ids": b["input_ids"][i], "attention_mask": b["attention_mask"][i],
                 "token_type_ids": b["token_type_ids"][i], "labels": int(e.label)} for i, e in enumerate(examples)]

    tr, dv = enc(train), enc(dev)
    args = T.TrainingArguments(
        output_dir=out_dir, num_train_epochs=1, per_device_train_batch_size=32, per_device_eval_batch_size=64,
        learning_rate=1e-4, lr_scheduler_type="linear", warmup_steps=int(0.06 * (len(tr) // 32 + 1)),
        bf16=HF_BF16, train_sampling_strategy="group_by_length", optim="adamw_torch_fused", use_cpu=True,
        report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0,
    )
    trainer = T.Trainer(model=model, args=args, train_dataset=tr, data_collator=T.DataCollatorWithPadding(tok))
    t = time.perf_counter()
    trainer.train()
    secs = time.perf_counter() - t
    preds = trainer.predict(dv)
    # label_ids come back in the order the Trainer evaluated (it may not be the dataset's order)
    acc = float((preds.predictions.argmax(-1) == preds.label_ids).mean())
    return {"examples_per_s": len(tr) / secs, "train_s": secs, "dev_accuracy": acc}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=8000)
    ap.add_argument("--quick", action="store_true", help="1,000 examples")
    ap.add_argument("--no-hf-malloc", action="store_true", help="skip the Trainer run with oztune's allocator settings")
    ap.add_argument("--pairs", type=int, default=0, help="then N pairs of fresh processes: Trainer, oztune default")
    ap.add_argument("--one", choices=["hf", "oztune"], help=argparse.SUPPRESS)  # (a pair's run: JSON on stdout)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "train_speed.json"))
    a = ap.parse_args()
    n = 1000 if a.quick else a.examples
    torch.set_num_threads(os.cpu_count() or 2)
    train, dev = sst2(n)
    import tempfile

    if a.one:
        with tempfile.TemporaryDirectory() as tmp:
            r = run_hf_trainer(train, dev, tmp) if a.one == "hf" else run_oztune(train, dev, freeze=True)
        print("RESULT " + json.dumps(r))
        return

    rows = {}
    watch = Contention(torch.get_num_threads()).start()
    with tempfile.TemporaryDirectory() as tmp:
        rows[HF_ROW] = run_hf_trainer(train, dev, tmp)
    # oztune keeps freed memory in the process (oztune.runtime.tune_malloc, process-wide and for good):
    # the Trainer once more with the same allocator settings shows what is the allocator and what is oztune
    from oztune.runtime import tune_malloc

    if not a.no_hf_malloc and tune_malloc():
        with tempfile.TemporaryDirectory() as tmp:
            rows["HF Trainer, same allocator settings as oztune"] = run_hf_trainer(train, dev, tmp)
    rows["oztune, all weights trained"] = run_oztune(train, dev, freeze=False)
    rows["oztune default (token embeddings frozen)"] = run_oztune(train, dev, freeze=True)
    base = rows[HF_ROW]["examples_per_s"]
    print(f"\nSST-2, {n:,} train examples, 1 epoch, batch 32, lr 1e-4, all-MiniLM-L6-v2, {torch.get_num_threads()} threads")
    print(f"{'run':<50} {'examples/s':>10} {'vs HF':>6} {'train s':>8} {'dev acc':>8}")
    for name, r in rows.items():
        r["speedup_vs_hf_trainer"] = r["examples_per_s"] / base
        print(f"{name:<50} {r['examples_per_s']:>10.1f} {r['speedup_vs_hf_trainer']:>5.2f}x {r['train_s']:>8.1f} {100 * r['dev_accuracy']:>7.1f}%")
    pairs = [{"hf": one_process("hf", n), "oztune": one_process("oztune", n)} for _ in range(a.pairs)]
    if pairs:
        print(f"\n{'pair (fresh processes)':<24} {'Trainer ex/s':>12} {'oztune ex/s':>12} {'ratio':>6} {'dev acc':>14}")
        for i, p in enumerate(pairs, 1):
            p["ratio"] = p["oztune"]["examples_per_s"] / p["hf"]["examples_per_s"]
            print(f"{i:<24} {p['hf']['examples_per_s']:>12.1f} {p['oztune']['examples_per_s']:>12.1f} {p['ratio']:>5.2f}x "
                  f"{100 * p['hf']['dev_accuracy']:>6.1f}/{100 * p['oztune']['dev_accuracy']:.1f}%")
        print(f"median ratio of the {len(pairs)} pairs: {float(np.median([p['ratio'] for p in pairs])):.2f}x")
    watch.stop()
    print(load_words(watch))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"examples": n, "threads": torch.get_num_threads(), "torch": torch.__version__,
                                       "rows": rows, "pairs": pairs, "other_cores": watch.others,
                                       "busy_machine": watch.busy}, indent=2) + "\n")


def one_process(which: str, n: int) -> dict:
    """One training run ("hf" or "oztune", the default) in a fresh Python process: its result."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, __file__, "--one", which, "--examples", str(n)], capture_output=True,
                         text=True, check=True).stdout
    return json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[len("RESULT "):])


if __name__ == "__main__":
    main()
