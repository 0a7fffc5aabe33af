"""How far fine-tuned models of one checkpoint are from each other: their ensembles and their shared mistakes.

A question behind the full-SST-2 target: is the gap to it a matter of recipe (another schedule, seed or
pooling would close it) or of the checkpoint? Given several models fine-tuned from the same pre-trained
weights with different recipes, this script evaluates each on the dev file, then every ensemble of k of
them (average of the softmax probabilities): the best subset of each size and the mean over all subsets,
and counts the sentences every model gets wrong and those at least one gets right (an oracle's ceiling).
If ensembles gain little and most mistakes are shared, more recipes of the same kind will not gain much.

    python bench/ensemble.py runs/sst2-full runs/sst2-full-mean ... [--data data/sst2/dev.tsv]

Prints a table and writes bench/results/ensemble.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
import torch
from peers import need_model

from oztune import Classifier
from oztune.data.labels import gold_label2id
from oztune.data.load import Columns, read_labelled

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="+", type=Path, help="fine-tuned model directories (two or more, same labels)")
    ap.add_argument("--data", type=Path, default=ROOT / "data/sst2/dev.tsv")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/ensemble.json")
    a = ap.parse_args()
    if len(a.models) < 2:
        ap.error("give two models or more")
    for d in a.models:  # each is a run of BENCHMARKS.md's Full SST-2 section, made by the config of its name
        config = ROOT / "configs" / f"{d.name}.yaml"
        need_model(d, f"oztune finetune --config {config.relative_to(ROOT)} --output {d}" if config.is_file() else
                   f"oztune finetune --config configs/<recipe>.yaml --output {d} (BENCHMARKS.md, Full SST-2, "
                   "names each run's config)")
    torch.set_num_threads(2)

    examples = read_labelled(str(a.data), Columns())
    texts = [e.text for e in examples]
    pairs = [e.text_pair for e in examples] if examples and examples[0].text_pair is not None else None
    labels = [e.label for e in examples]
    probs, names, golds = [], [], []
    for d in a.models:
        clf = Classifier.from_pretrained(d)
        label2id = gold_label2id(clf.id2label, labels)  # label names, or class ids (as the CLI reads them)
        golds.append(np.array([label2id[str(y).strip()] for y in labels], dtype=np.int64))
        probs.append(torch.from_numpy(clf.logits(texts, pairs)).float().softmax(-1).numpy())
        names.append(d.name)
    if any((g != golds[0]).any() for g in golds):
        ap.error("the models do not share their labels' order")
    gold = golds[0]
    P = np.stack(probs)  # (models, N, labels)
    right = P.argmax(-1) == gold  # (models, N)

    def acc(subset) -> float:
        return float((P[list(subset)].mean(0).argmax(-1) == gold).mean() * 100)

    rows = [{"model": n, "accuracy": round(float(r.mean() * 100), 2)} for n, r in zip(names, right)]
    sizes = []
    for k in range(2, len(names) + 1):
        scored = [(acc(s), s) for s in itertools.combinations(range(len(names)), k)]
        best, s = max(scored)
        sizes.append({"k": k, "subsets": len(scored), "mean": round(float(np.mean([x for x, _ in scored])), 2),
                      "best": round(best, 2), "best_subset": [names[i] for i in s]})
    result = {
        "data": str(a.data), "sentences": int(len(gold)), "models": rows, "ensembles": sizes,
        "all_wrong": int((~right).all(0).sum()), "some_right": round(float(right.any(0).mean() * 100), 2),
        "all_right": int(right.all(0).sum()),
    }

    print(f"{'model':<28} {'accuracy':>8}")
    for r in rows:
        print(f"{r['model']:<28} {r['accuracy']:>8.2f}")
    print(f"\n{'ensemble of k':<14} {'subsets':>7} {'mean':>6} {'best':>6}  best subset")
    for s in sizes:
        print(f"{s['k']:<14} {s['subsets']:>7} {s['mean']:>6.2f} {s['best']:>6.2f}  {', '.join(s['best_subset'])}")
    print(f"\n{result['all_wrong']} of {len(gold)} sentences are wrong in every model; "
          f"{result['all_right']} right in every one; at least one model is right on {result['some_right']:.2f}%.")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
