"""`oztune compress` on the fine-tuned SST-2 model against ONNX Runtime int8, same sorted batches, one run.

Runs the accuracy-budget search (or reads an earlier output with --compressed), then times on SST-2 dev,
end to end (tokenization included): fp32 oztune, every compressed variant, and the peers: the HF model
exported to ONNX, fp32 and ``onnxruntime.quantization.quantize_dynamic`` int8. Throughput: the dev
sentences sorted by token length, batches of 64, the same batches for everyone; latency: batch 1.
Checks the issue's targets for the best pruned + int8 variant within 1 point of fp32: >= 2x ORT int8
throughput at batch 64 and <= 15 MB; and that structured pruning makes fp32 CPU time drop.

    python bench/compress.py --model /work/models/sst2-minilm-8k          # runs compress (see its time)
    python bench/compress.py --compressed runs/sst2-compressed           # only the timings
    python bench/compress.py --quick                                     # < 1 minute: tiny search, 128 sentences
Prints a table and writes bench/results/compress.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from peers import FINETUNE, best_time, export_hf_onnx, file_mb, need_model, ort_runner

from oztune.runtime import Contention

ROOT = Path(__file__).resolve().parents[1]


def time_one(name: str, run, texts: list[str], gold: np.ndarray, batches: list, repeats: int, mb: float) -> dict:
    """Accuracy, batch-64 sorted seconds, batch-1 seconds and p50 of one runner."""
    pred = np.zeros(len(texts), dtype=np.int64)
    for idx in batches:
        pred[idx] = np.asarray(run([texts[i] for i in idx])).argmax(-1)
    run([texts[0]])
    with Contention(torch.get_num_threads()) as load:  # (each peer timed on its own: its own load)
        sorted_s = best_time(lambda: [run([texts[i] for i in idx]) for idx in batches], repeats)
        one = []
        for t in texts:
            t0 = time.perf_counter()
            run([t])
            one.append(time.perf_counter() - t0)
    return {"name": name, "accuracy": 100 * float((pred == gold).mean()), "file_mb": mb, "sorted_b64_s": sorted_s,
            "batch1_s": float(np.sum(one)), "batch1_p50_ms": 1e3 * float(np.median(one)),
            "other_cores": load.others, "busy_machine": load.busy}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="/work/models/sst2-minilm-8k", help="fine-tuned SST-2 model (HF format)")
    ap.add_argument("--compressed", default=None, help="output of an earlier oztune compress (skip the search)")
    ap.add_argument("--output", default=str(ROOT / "runs" / "bench-compress"), help="where compress writes")
    ap.add_argument("--quick", action="store_true", help="tiny search and 128 dev sentences (checks the script)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "compress.json"))
    a = ap.parse_args()
    need_model(a.model, FINETUNE.format(a.model))
    if a.compressed and not (Path(a.compressed) / "report.json").is_file():
        sys.exit(f"{sys.argv[0]}: {a.compressed}/report.json: no such file (--compressed takes the output of "
                 f"oztune compress). Make it with: python bench/compress.py --model {a.model} --output "
                 f"{a.compressed} (runs oztune compress's search, about 16 minutes on 2 cores)")
    from oztune.compress.search import CompressArgs, compress
    from oztune.data.readers import read_examples
    from oztune.models.hub import load_classifier

    model_dir, data = Path(a.model), ROOT / "data" / "sst2"
    dev = read_examples(data / "dev.tsv")[: 128 if a.quick else None]
    texts, gold = [e.text for e in dev], np.array([int(e.label) for e in dev])
    work = Path(tempfile.mkdtemp(prefix="bench-compress-"))
    search_s = None
    if a.compressed:
        out = Path(a.compressed)
    else:
        out = Path(a.output) if not a.quick else work / "compressed"
        eval_file = data / "dev.tsv"
        if a.quick:
            eval_file = work / "dev.tsv"
            eval_file.write_text("sentence\tlabel\n" + "".join(f"{e.text}\t{e.label}\n" for e in dev))
        args = CompressArgs(model=str(model_dir), train=str(data / "train.tsv"), eval=str(eval_file), output=str(out))
        if a.quick:
            args.recipes, args.sizes, args.epochs, args.max_train_examples = ["prune", "prune-int8"], [0.33], 1, 256
            args.importance_batches = 2
        t = time.perf_counter()
        compress(args)
        search_s = time.perf_counter() - t
    report = json.loads((out / "report.json").read_text())
    variants = {v["name"]: v for v in report["variants"]}

    enc_model, enc, _ = load_classifier(model_dir, max_length=128)
    lengths = np.array([len(ids) for ids, _ in enc.encode(texts)])
    order = np.argsort(-lengths, kind="stable")
    batches = [order[i:i + 64] for i in range(0, len(order), 64)]
    from oztune.compress.report import model_runner, weights_mb

    rows = []
    reps = 1 if a.quick else a.repeats
    rows.append(time_one("oztune fp32", model_runner(enc_model, enc), texts, gold, batches, reps,
                         weights_mb(model_dir)))
    for name in variants:
        if name == "fp32":
            continue
        d = out / "variants" / name
        if not d.is_dir():
            continue
        m, e, _ = load_classifier(d, max_length=128)
        rows.append(time_one(f"oztune {name}", model_runner(m, e), texts, gold, batches, reps, weights_mb(d)))
    import transformers as T

    hf = T.AutoModelForSequenceClassification.from_pretrained(model_dir, attn_implementation="eager").eval()
    tok, threads = T.AutoTokenizer.from_pretrained(model_dir), torch.get_num_threads()
    fp32_onnx, int8_onnx = export_hf_onnx(hf, work)
    rows.append(time_one("ORT fp32", ort_runner(fp32_onnx, tok, threads), texts, gold, batches, reps, file_mb(fp32_onnx)))
    rows.append(time_one("ORT int8", ort_runner(int8_onnx, tok, threads), texts, gold, batches, reps, file_mb(int8_onnx)))
    by = {r["name"]: r for r in rows}
    ort8, fp32 = by["ORT int8"], by["oztune fp32"]
    for r in rows:
        r["drop_pt"] = r["accuracy"] - fp32["accuracy"]
        r["x_ort_int8_b64"] = ort8["sorted_b64_s"] / r["sorted_b64_s"]
        r["x_ort_int8_b1"] = ort8["batch1_s"] / r["batch1_s"]

    pruned_int8 = [r for r in rows if r["name"].startswith("oztune prune") and r["name"].endswith("-int8")
                   and r["drop_pt"] >= -1.0]
    best = max(pruned_int8, key=lambda r: r["x_ort_int8_b64"], default=None)
    pruned_fp32 = [r for r in rows if r["name"].startswith("oztune prune") and not r["name"].endswith("-int8")]
    targets = {
        "best_pruned_int8": best and best["name"],
        "b64_ge_2x_ort_int8": bool(best and best["x_ort_int8_b64"] >= 2.0),
        "file_le_15mb": bool(best and best["file_mb"] <= 15.0),
        "structured_pruning_cuts_fp32_time": all(r["sorted_b64_s"] < fp32["sorted_b64_s"] for r in pruned_fp32)
        if pruned_fp32 else None,
    }
    print(f"\ncompress vs ONNX Runtime, SST-2 dev ({len(texts)} sentences), end to end, {torch.get_num_threads()} "
          f"threads; model {model_dir}" + (f"; search took {search_s:.0f} s" if search_s else ""))
    print(f"{'variant':<24} {'acc':>6} {'drop':>6} {'MB':>6} {'b64 sorted s':>13} {'x ORT8':>7} {'b1 s':>6} "
          f"{'x ORT8':>7} {'b1 p50 ms':>10} {'others':>7}")
    for r in rows:
        others = "?" if r["other_cores"] is None else f"{r['other_cores']:.2f}" + ("!" if r["busy_machine"] else "")
        print(f"{r['name']:<24} {r['accuracy']:>6.2f} {r['drop_pt']:>+6.2f} {r['file_mb']:>6.1f} "
              f"{r['sorted_b64_s']:>13.3f} {r['x_ort_int8_b64']:>6.2f}x {r['batch1_s']:>6.2f} "
              f"{r['x_ort_int8_b1']:>6.2f}x {r['batch1_p50_ms']:>10.2f} {others:>7}")
    print("others: cores other processes took while that row was timed (!: a busy machine; rows are timed one "
          "after another, so a busy row's ratios are off)")
    print("targets:", json.dumps(targets))
    shutil.rmtree(work, ignore_errors=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"sentences": len(texts), "model": str(model_dir), "quick": a.quick,
                                       "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                                       "search_seconds": search_s, "compressed": str(out), "rows": rows,
                                       "targets": targets, "report": report}, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
