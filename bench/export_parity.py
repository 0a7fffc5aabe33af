"""ONNX export parity on SST-2 dev: fp32 logits against oztune's, int8 labels against oztune's int8 model.

For a float model: export fp32 and int8 (both, always), and compare with the model and with the model
quantized in memory by ``quantize_(model, QuantConfig())`` (what ``oztune quantize`` does by default).
For a quantized model directory: export it and compare with it. Also reports dev accuracy and the
offline speed (texts/s, batches of 64 sorted by length) of each.

    python bench/export_parity.py --model /work/models/sst2-minilm-8k           # 872 dev sentences
    python bench/export_parity.py --model /work/models/sst2-minilm-8k --quick   # 200 of them
Prints a table and writes bench/results/export_parity.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from peers import FINETUNE, need_model

ROOT = Path(__file__).resolve().parents[1]


def timed_logits(clf, texts: list[str]) -> tuple[np.ndarray, float]:
    clf.logits(texts[:64])  # warm-up
    t0 = time.perf_counter()
    logits = clf.logits(texts)
    return logits, len(texts) / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", default=str(ROOT / "data" / "sst2" / "dev.tsv"))
    p.add_argument("--threads", type=int, default=0, help="compute threads (0: every core)")
    p.add_argument("--quick", action="store_true", help="200 dev sentences")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "export_parity.json"))
    a = p.parse_args()
    need_model(a.model, FINETUNE.format(a.model))

    import torch

    from oztune import Classifier
    from oztune.compress.quantize import QuantConfig, quantize_
    from oztune.data.readers import read_examples
    from oztune.models.hub import read_config, resolve_model
    from oztune.serve.backends import OnnxClassifier, default_threads
    from oztune.serve.export import export_onnx

    threads = a.threads or default_threads()
    torch.set_num_threads(threads)
    examples = read_examples(Path(a.data))[:200 if a.quick else None]
    texts, gold = [e.text for e in examples], np.array([int(e.label) for e in examples])
    quantized = bool(read_config(resolve_model(a.model)).get("oztune", {}).get("quantization"))
    clf = Classifier.from_pretrained(a.model)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        pairs = [(False, "int8 model" if quantized else "fp32 model")]
        if not quantized:
            pairs.append((True, "int8 model (quantize_ in memory)"))
        for int8, ref_name in pairs:
            if int8:
                quantize_(clf.model, QuantConfig())
            ref, ref_speed = timed_logits(clf, texts)
            onnx = OnnxClassifier(export_onnx(a.model, Path(tmp) / f"onnx-{int8}", int8=int8), threads)
            got, onnx_speed = timed_logits(onnx, texts)
            rows.append({"export": "int8" if int8 or quantized else "fp32", "reference": ref_name,
                         "max_logit_diff": float(np.abs(got - ref).max()),
                         "label_agreement": float((got.argmax(1) == ref.argmax(1)).mean()),
                         "onnx_accuracy": float((got.argmax(1) == gold).mean()),
                         "reference_accuracy": float((ref.argmax(1) == gold).mean()),
                         "onnx_texts_per_s": onnx_speed, "torch_texts_per_s": ref_speed})
    print(f"\n{a.model} on {len(texts)} sentences of {a.data}, {threads} threads\n")
    print("| export | against | max logit diff | label agreement | accuracy onnx / torch | texts/s onnx / torch |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['export']} | {r['reference']} | {r['max_logit_diff']:.2e} | {r['label_agreement']:.4f} | "
              f"{r['onnx_accuracy']:.4f} / {r['reference_accuracy']:.4f} | "
              f"{r['onnx_texts_per_s']:.0f} / {r['torch_texts_per_s']:.0f} |")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"model": a.model, "examples": len(texts), "threads": threads, "rows": rows}
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
