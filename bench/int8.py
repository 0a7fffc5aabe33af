"""int8 inference on SST-2 dev: oztune int8 against ONNX Runtime int8 and the usual peers, in one run.

Peers (one fine-tuned model, the same length-sorted batches of 64, end to end with tokenization, 2 threads):
Hugging Face fp32 (transformers), HF + torch.ao ``quantize_dynamic``, ONNX Runtime fp32 and int8
(``onnxruntime.quantization.quantize_dynamic`` of a ``torch.onnx`` export of the HF model; and with its
``reduce_range=True``, 7-bit weights, ORT's option for CPUs without VNNI), oztune fp32 (and again with PyTorch's
``F.linear`` in place of oztune's oneDNN Linear, oztune.models.kernels) and oztune int8 (``quantize_``, saved,
reloaded from disk; on a CPU without VNNI its default 7-bit weights, and a second row with 8-bit ones). Columns:
batch-64 time on length-sorted batches and on batches in file order (padding: oztune packs the real tokens, see oztune.models.packing), batch-1
time, file MB, dev accuracy. Then the ``torch._int_mm`` ceiling on a large matrix, measured in the same run, and the
share of it the int8 model reaches on useful (non-padding) tokens. ``--profile`` adds the int8 model's operators by
self time. ``--kernels`` adds a per-layer
comparison of the matmul kernels, quantization and dequantization included (the measurements behind
oztune.compress.int8_ops: torch._int_mm for few rows, oneDNN's pre-packed kernel for many; and, in fp32,
behind oztune.models.kernels: F.linear against oneDNN's kernel on a packed weight), and both oneDNN kernels again
on one thread (what the second thread gives at each size).
``--compile`` adds oztune int8 under torch.compile; ``--aot`` the same graphs compiled ahead of time
(``oztune export --format aoti``), with their build and load times.

    python bench/int8.py --model /work/models/sst2-minilm-8k [--quick] [--compile] [--aot] [--kernels]

Peers take turns: batch-64 passes round robin (best of ``--repeats``); batch 1 round robin over chunks of
100 sentences (each chunk's best of ``--repeats``, summed). Prints tables and writes bench/results/int8.json.
--quick: 128 dev sentences, one repeat (< 1 minute).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from peers import (FINETUNE, best_time, export_hf_onnx, file_mb, load_words, need_model, ops_by_self_time,
                   ort_runner)

from oztune.runtime import Contention

ROOT = Path(__file__).resolve().parents[1]
THREADS = 2


# --- peers: each maps a list of texts to logits (B, L) -------------------------------------------------------

def hf_peers(path: Path, work: Path, threads: int) -> dict:
    """HF fp32, HF + torch.ao dynamic int8, ONNX Runtime fp32 and int8 on the same tokenizer."""
    import transformers as T

    tok = T.AutoTokenizer.from_pretrained(path)
    hf = T.AutoModelForSequenceClassification.from_pretrained(path, attn_implementation="eager").eval()

    def torch_fn(model):
        def run(texts):
            b = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
            with torch.inference_mode():
                return model(**b).logits.float().numpy()
        return run

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ao = torch.ao.quantization.quantize_dynamic(copy.deepcopy(hf), {torch.nn.Linear}, dtype=torch.qint8)
        torch.save(ao.state_dict(), work / "ao.pt")
    fp32_onnx, int8_onnx = export_hf_onnx(hf, work)
    from onnxruntime.quantization import QuantType, quantize_dynamic

    reduced = work / "hf_int8_reduce_range.onnx"  # ORT's option for CPUs without VNNI: 7-bit weights
    quantize_dynamic(str(fp32_onnx), str(reduced), weight_type=QuantType.QInt8, reduce_range=True)

    weights = path / "model.safetensors"
    return {"HF fp32": (torch_fn(hf), file_mb(weights)),
            "HF torch.ao dynamic int8": (torch_fn(ao), file_mb(work / "ao.pt")),
            "ORT fp32": (ort_runner(fp32_onnx, tok, threads), file_mb(fp32_onnx)),
            "ORT int8": (ort_runner(int8_onnx, tok, threads), file_mb(int8_onnx)),
            "ORT int8 reduce_range": (ort_runner(reduced, tok, threads), file_mb(reduced))}


def oztune_peers(path: Path, work: Path, compile: bool, aot: bool = False) -> tuple[dict, object, float, dict]:
    """oztune fp32 and oztune int8 (quantized, saved, reloaded from disk like `oztune predict` does; its weights in
    this CPU's default codes, and, where those are 7-bit (no VNNI), also one of 8-bit weights), with
    ``compile`` the int8 model under torch.compile, with ``aot`` the int8 model compiled ahead of time
    (`oztune export --format aoti`) and loaded from that directory; returns (peers, int8 Classifier,
    compile warm-up s, {"build_s", "load_s"} of the AOT package)."""
    from oztune.api import Classifier
    from oztune.compress.int8_ops import WEIGHT_BITS
    from oztune.compress.quantize import QuantConfig, quantization_record, quantize_
    from oztune.models import kernels as fp32_kernels
    from oztune.models.hub import load_classifier, save_classifier

    for bits in sorted({WEIGHT_BITS, 8}):
        model, enc, meta = load_classifier(path)
        cfg = QuantConfig(weight_bits=bits)
        save_classifier(quantize_(model, cfg), enc, work / f"oz-int8-{bits}", meta["id2label"],
                        quantization=quantization_record(cfg))
    fp32 = Classifier.from_pretrained(path)
    int8 = Classifier.from_pretrained(work / f"oz-int8-{WEIGHT_BITS}")
    mb = file_mb(work / f"oz-int8-{WEIGHT_BITS}" / "model.safetensors")
    peers = {"oztune fp32": (fp32.logits, file_mb(path / "model.safetensors")), "oztune int8": (int8.logits, mb)}
    if fp32_kernels.ONEDNN_LINEAR:  # and with PyTorch's F.linear (MKL), as before oneDNN's (oztune.models.kernels)
        mkl = Classifier.from_pretrained(path)
        fp32_kernels.thaw_(mkl.model)
        peers["oztune fp32, F.linear"] = (mkl.logits, file_mb(path / "model.safetensors"))
    if WEIGHT_BITS != 8:
        peers["oztune int8 8-bit weights"] = (Classifier.from_pretrained(work / "oz-int8-8").logits, mb)
    warm = 0.0
    if compile:
        compiled = Classifier.from_pretrained(work / f"oz-int8-{WEIGHT_BITS}", compile=True)
        t = time.perf_counter()
        compiled.logits(["a first sentence, to compile the graph for unpadded batches"] * 64)
        compiled.logits(["and one for the graph for one text"])
        warm = time.perf_counter() - t
        peers["oztune int8 compiled"] = (compiled.logits, mb)
    aot_times = {}
    if aot:
        from oztune.models.compiled import CompiledClassifier
        from oztune.serve.export import export_aoti

        t = time.perf_counter()
        export_aoti(work / f"oz-int8-{WEIGHT_BITS}", work / "oz-int8-aot")
        aot_times["build_s"] = time.perf_counter() - t
        t = time.perf_counter()
        packaged = Classifier.from_pretrained(work / "oz-int8-aot")
        aot_times["load_s"] = time.perf_counter() - t
        # and in a fresh process (torch imported first, as any caller has): what a server replica or CLI call pays
        code = ("import time, torch; t = time.perf_counter(); from oztune.api import Classifier; "
                f"Classifier.from_pretrained({str(work / 'oz-int8-aot')!r}); print(time.perf_counter() - t)")
        aot_times["fresh_load_s"] = float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                                         text=True).stdout.split()[-1])
        assert isinstance(packaged.model, CompiledClassifier), "the AOT package did not load"
        peers["oztune int8 AOT package"] = (packaged.logits, mb)
    return peers, int8, warm, aot_times


# --- the int8 ceiling and the kernels ---------------------------------------------------------------------------

def int_mm_ceiling(repeats: int = 20) -> float:
    """GOP/s of torch._int_mm on 1536x384 @ 384x1536 int8 (the large-matrix ceiling)."""
    a = torch.randint(-127, 128, (1536, 384), dtype=torch.int8)
    b = torch.randint(-127, 128, (384, 1536), dtype=torch.int8)
    torch._int_mm(a, b)
    t = min(best_time(lambda: torch._int_mm(a, b), 1) for _ in range(repeats))
    return 2 * 1536 * 384 * 1536 / t / 1e9


def linear_ops(model) -> tuple[int, int]:
    """(multiply-adds per token, multiply-adds per text) the Linear layers must do: every layer on every
    token, except that with cls/last pooling only the last layer's keys and values are needed for every
    token, and its query, output and feed-forward for the pooled one (oztune computes just that)."""
    def macs(module, prefix=""):
        return sum(m.in_features * m.out_features for n, m in module.named_modules()
                   if n.startswith(prefix) and hasattr(m, "in_features"))

    layers = list(model.backbone.layers)
    per_token = sum(macs(b) for b in layers)
    per_text = macs(model.head)
    if layers and model.head_cfg.pooling in ("cls", "last"):
        last = layers[-1]
        q_share = macs(last.attn.qkv) // 3
        rest = macs(last) - 3 * q_share  # o, up, down
        per_token -= q_share + rest
        per_text += q_share + rest
    return per_token, per_text


def one_thread(fn):
    """``fn`` run with one compute thread (the caller's thread count restored after)."""
    def run():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn()
        finally:
            torch.set_num_threads(threads)
    return run


def kernels(tokens: int) -> list[dict]:
    """ms per call of each matmul candidate for MiniLM's four Linear shapes, at a batch-64 and a batch-1 M."""
    from oztune.compress import int8_ops
    from oztune.models import kernels as fp32_kernels

    def onednn(x, wq, sw, b, packed):  # oztune's kernel above ONEDNN_MIN_ROWS rows, at any M
        rows, int8_ops.ONEDNN_MIN_ROWS = int8_ops.ONEDNN_MIN_ROWS, 0
        try:
            return int8_ops.int8_linear(x, wq, sw, b, lambda: packed)
        finally:
            int8_ops.ONEDNN_MIN_ROWS = rows

    rows = []
    for M in (tokens, 25):
        for name, K, N in (("qkv", 384, 1152), ("o", 384, 384), ("up", 384, 1536), ("down", 1536, 384)):
            x, w, b = torch.randn(M, K), torch.randn(N, K) * 0.05, torch.randn(N)
            wq, sw = int8_ops.quantize_per_channel(w, int8_ops.WEIGHT_BITS)  # (7-bit where only they are exact)
            packed, wb, bb = int8_ops.pack_weight(wq), w.bfloat16(), b.bfloat16()
            w_onednn = fp32_kernels._pack(w) if fp32_kernels.ONEDNN_LINEAR else None
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fb = torch.ao.nn.quantized.dynamic.Linear(K, N)
                fb.set_weight_bias(torch.quantize_per_channel(w, sw.double(), torch.zeros(N, dtype=torch.long), 0,
                                                              torch.qint8), b)
            cands = {"fp32": lambda: F.linear(x, w, b),
                     "fp32 oneDNN": lambda: torch.ops.mkldnn._linear_pointwise(x, w_onednn, b, "none", [], ""),
                     "bf16": lambda: F.linear(x.bfloat16(), wb, bb),
                     "fbgemm dynamic (torch.ao)": lambda: fb(x),
                     "int8 _int_mm": lambda: int8_ops.int8_linear(x, wq, sw, b, lambda: None),
                     "int8 oneDNN": lambda: onednn(x, wq, sw, b, packed)}
            if w_onednn is None:
                del cands["fp32 oneDNN"]
            # the same two kernels on one thread: how much the second thread gives at this M
            cands["int8 oneDNN, 1 thread"] = one_thread(cands["int8 oneDNN"])
            if w_onednn is not None:
                cands["fp32 oneDNN, 1 thread"] = one_thread(cands["fp32 oneDNN"])
            for f in cands.values():
                f()
            n = 20 if M < 100 else 5
            times = {k: best_time(lambda: [f() for _ in range(n)], 3) / n for k, f in cands.items()}
            rows.append({"M": M, "layer": name, "K": K, "N": N, **{k: round(v * 1e3, 4) for k, v in times.items()}})
    return rows


# --- main -------------------------------------------------------------------------------------------------------

def profile(fn, top: int = 14) -> list[dict]:
    """Operators by self CPU time over one call of ``fn`` (torch.profiler): op, ms, share, calls."""
    from torch.profiler import profile as torch_profile

    with torch_profile() as prof:
        fn()
    return [{"op": e.key, "ms": round(e.self_cpu_time_total / 1000, 1), "share": round(share, 3), "calls": e.count}
            for e, share in ops_by_self_time(prof, top)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="/work/models/sst2-minilm-8k", help="fine-tuned SST-2 model directory")
    ap.add_argument("--data", default=str(ROOT / "data" / "sst2" / "dev.tsv"))
    ap.add_argument("--quick", action="store_true", help="128 dev sentences, one repeat")
    ap.add_argument("--repeats", type=int, default=3, help="batch-64 passes per peer (best one counts)")
    ap.add_argument("--threads", type=int, default=THREADS, help="threads of every peer (torch and ONNX Runtime)")
    ap.add_argument("--compile", action="store_true", help="also time oztune int8 under torch.compile (warm-up ~1 min)")
    ap.add_argument("--aot", action="store_true",
                    help="also time oztune int8 compiled ahead of time (oztune export --format aoti; ~1 min to build)")
    ap.add_argument("--kernels", action="store_true", help="also compare the matmul kernels layer by layer")
    ap.add_argument("--profile", action="store_true",
                    help="also profile oztune int8 on the sorted batches of 64 and at batch 1 (operators by self time)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "int8.json"))
    a = ap.parse_args()
    need_model(a.model, FINETUNE.format(a.model))
    torch.set_num_threads(a.threads)
    from oztune.data.readers import read_examples

    dev = read_examples(a.data)[: 128 if a.quick else None]
    texts, gold = [e.text for e in dev], np.array([int(e.label) for e in dev])
    repeats = 1 if a.quick else a.repeats
    path = Path(a.model)
    load0 = os.getloadavg()[0]
    watch = Contention(a.threads).start()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        oz, int8, warm, aot_times = oztune_peers(path, work, a.compile, a.aot)
        peers = {**hf_peers(path, work, a.threads), **oz}
        lengths = np.array([len(ids) for ids, _ in int8.encoder.encode(texts)])
        order = np.argsort(-lengths, kind="stable")
        batches = [order[i:i + 64] for i in range(0, len(order), 64)]
        unsorted = [np.arange(i, min(i + 64, len(texts))) for i in range(0, len(texts), 64)]  # file order
        logits = {name: np.zeros((len(texts), 2), dtype=np.float32) for name in peers}

        def batch64(name, batches=batches):
            fn = peers[name][0]
            for idx in batches:
                logits[name][idx] = fn([texts[i] for i in idx])

        for name in peers:  # warm-up: first-call allocations, oneDNN primitive creation, weight packing
            peers[name][0](texts[:64])
        t64 = {name: float("inf") for name in peers}
        t64u = dict(t64)
        for _ in range(repeats):  # round robin, so that a noisy spell does not hit one peer only
            for name in peers:
                t64[name] = min(t64[name], best_time(lambda: batch64(name), 1))
                t64u[name] = min(t64u[name], best_time(lambda: batch64(name, unsorted), 1))
        # batch 1, round robin over chunks of ~100 sentences: each chunk's best time per peer over the repeats,
        # summed (a noisy spell of a few seconds would otherwise land on one peer's whole pass)
        chunks = [texts[i:i + 100] for i in range(0, len(texts), 100)]
        best1 = {name: [float("inf")] * len(chunks) for name in peers}
        for _ in range(repeats):
            for c, chunk in enumerate(chunks):
                for name in peers:
                    best1[name][c] = min(best1[name][c], best_time(lambda: [peers[name][0]([t]) for t in chunk], 1))
        t1 = {name: sum(best1[name]) for name in peers}
        ceiling = int_mm_ceiling()
        profiles = {"batch64_sorted": profile(lambda: batch64("oztune int8")),
                    "batch1": profile(lambda: [peers["oztune int8"][0]([t]) for t in texts])} if a.profile else {}
        kernel_rows = kernels(int(np.median([len(i) * lengths[i].max() for i in batches]))) if a.kernels else []
    watch.stop()
    load1 = os.getloadavg()[0]

    def same_as_fp32(name: str) -> float:  # % of sentences labelled as by the same model in fp32
        ref = logits["oztune fp32" if name.startswith("oztune") else "HF fp32"].argmax(1)
        return round(100 * float((logits[name].argmax(1) == ref).mean()), 2)

    rows = [{"peer": name, "batch64_s": round(t64[name], 4), "batch64_unsorted_s": round(t64u[name], 4),
             "batch1_s": round(t1[name], 4), "file_mb": round(peers[name][1], 1),
             "accuracy": round(100 * float((logits[name].argmax(1) == gold).mean()), 2),
             "same_label_as_fp32": same_as_fp32(name)} for name in peers]
    acc = {r["peer"]: r["accuracy"] for r in rows}
    token_ops, text_ops = linear_ops(int8.model)
    useful = 2 * (token_ops * int(lengths.sum()) + text_ops * len(texts)) / 1e9  # GOP on non-padding tokens
    padded = int(sum(len(i) * lengths[i].max() for i in batches))
    reached = useful / t64["oztune int8"]
    ort = t64["ORT int8"], t1["ORT int8"]
    result = {
        "sentences": len(texts), "threads": a.threads, "repeats": repeats, "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(), "load_average": [round(load0, 2), round(load1, 2)],
        "other_cores": None if watch.others is None else round(watch.others, 2), "busy_machine": watch.busy,
        "tokens": int(lengths.sum()), "padded_tokens": padded, "peers": rows,
        "int_mm_ceiling_gops": round(ceiling, 1), "int8_useful_gops": round(reached, 1),
        "fraction_of_ceiling": round(reached / ceiling, 3),
        "batch64_speedup_vs_ort_int8": round(ort[0] / t64["oztune int8"], 3),
        "batch1_speedup_vs_ort_int8": round(ort[1] / t1["oztune int8"], 3),
        "batch64_unsorted_speedup_vs_ort_int8": round(t64u["ORT int8"] / t64u["oztune int8"], 3),
        "batch64_speedup_vs_ort_int8_reduce_range": round(t64["ORT int8 reduce_range"] / t64["oztune int8"], 3),
        "batch1_speedup_vs_ort_int8_reduce_range": round(t1["ORT int8 reduce_range"] / t1["oztune int8"], 3),
        "batch64_speedup_vs_oztune_fp32": round(t64["oztune fp32"] / t64["oztune int8"], 3),
        "batch1_speedup_vs_oztune_fp32": round(t1["oztune fp32"] / t1["oztune int8"], 3),
        "compile_warmup_s": round(warm, 1) if a.compile else None,
        "batch64_speedup_vs_ort_int8_compiled": round(ort[0] / t64["oztune int8 compiled"], 3) if a.compile else None,
        "batch1_speedup_vs_ort_int8_compiled": round(ort[1] / t1["oztune int8 compiled"], 3) if a.compile else None,
        "aot_build_s": round(aot_times["build_s"], 1) if a.aot else None,
        "aot_load_s": round(aot_times["load_s"], 2) if a.aot else None,
        "aot_fresh_process_load_s": round(aot_times["fresh_load_s"], 2) if a.aot else None,
        "batch64_speedup_vs_ort_int8_aot": round(ort[0] / t64["oztune int8 AOT package"], 3) if a.aot else None,
        "batch1_speedup_vs_ort_int8_aot": round(ort[1] / t1["oztune int8 AOT package"], 3) if a.aot else None,
        "accuracy_drop_vs_fp32_pt": round(acc["oztune fp32"] - acc["oztune int8"], 2),
        "kernels": kernel_rows,
        "profile": profiles,
    }
    print(f"SST-2 dev, {len(texts)} sentences ({result['tokens']} tokens, {padded} with padding in sorted batches of 64), "
          f"{a.threads} threads, load average {load0:.1f} -> {load1:.1f}; {load_words(watch)}")
    print(f"{'peer':<26}{'batch 64 sorted':>16}{'batch 64 unsorted':>18}{'batch 1':>10}{'file MB':>9}{'accuracy':>10}"
          f"{'= fp32':>8}")
    for r in rows:
        print(f"{r['peer']:<26}{r['batch64_s']:>14.3f} s{r['batch64_unsorted_s']:>16.3f} s{r['batch1_s']:>8.3f} s"
              f"{r['file_mb']:>9.1f}{r['accuracy']:>10.2f}{r['same_label_as_fp32']:>8.2f}")
    print("(= fp32: % of sentences given the label the same model gives in fp32: oztune's own, HF's for the peers)")
    print(f"torch._int_mm ceiling (1536x384x1536): {ceiling:.0f} GOP/s; oztune int8 on useful tokens: {reached:.0f} GOP/s "
          f"= {reached / ceiling:.1%} of it")
    print(f"oztune int8 vs ORT int8: batch 64 {result['batch64_speedup_vs_ort_int8']:.2f}x faster "
          f"(unsorted {result['batch64_unsorted_speedup_vs_ort_int8']:.2f}x), "
          f"batch 1 {result['batch1_speedup_vs_ort_int8']:.2f}x; accuracy {-result['accuracy_drop_vs_fp32_pt']:+.2f} pt against oztune fp32")
    print(f"oztune int8 vs ORT int8 reduce_range (7-bit weights): batch 64 "
          f"{result['batch64_speedup_vs_ort_int8_reduce_range']:.2f}x, batch 1 {result['batch1_speedup_vs_ort_int8_reduce_range']:.2f}x; "
          f"vs oztune fp32: batch 64 {result['batch64_speedup_vs_oztune_fp32']:.2f}x, batch 1 {result['batch1_speedup_vs_oztune_fp32']:.2f}x")
    if a.compile:
        print(f"compiled (warm-up {warm:.0f} s): batch 64 {result['batch64_speedup_vs_ort_int8_compiled']:.2f}x, "
              f"batch 1 {result['batch1_speedup_vs_ort_int8_compiled']:.2f}x ORT int8")
    if a.aot:
        print(f"AOT package (built in {aot_times['build_s']:.0f} s, loaded in {aot_times['load_s']:.1f} s, "
              f"{aot_times['fresh_load_s']:.1f} s in a fresh process): batch 64 "
              f"{result['batch64_speedup_vs_ort_int8_aot']:.2f}x, batch 1 {result['batch1_speedup_vs_ort_int8_aot']:.2f}x ORT int8")
    if kernel_rows:
        names = [k for k in kernel_rows[0] if k not in ("M", "layer", "K", "N")]
        print("\nms per call" + "".join(f"{n:>27}" for n in names))
        for r in kernel_rows:
            print(f"M={r['M']:<5}{r['layer']:<6}" + "".join(f"{r[n]:>27.3f}" for n in names))
    for kind, ops in profiles.items():
        print(f"\noztune int8, {kind}: operators by self time")
        for op in ops:
            print(f"  {op['op']:<32}{op['ms']:>10.1f} ms{op['share']:>8.1%}{op['calls']:>9}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
