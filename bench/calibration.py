"""Calibration on SST-2 dev: what temperature scaling and label smoothing do to how far the scores can be trusted.

Temperature scaling (what ``oztune calibrate`` runs: ``fit_temperature`` on a model's logits): dev is cut into two
seeded halves; the temperature is fitted on one half and the model measured on the other, then the other way round
(two folds, so that no score is measured on the data its temperature was fitted on). For each model given (fp32,
int8, ...): accuracy, log loss and ECE before and after, the mean over the two folds, and each fold's temperature.

Label smoothing (``--label-smoothing E``, optional, a few minutes): two models fine-tuned the same way (``oztune
finetune`` on N shuffled SST-2 train examples, seed 0), one with ``--label-smoothing E``, both measured on all of
dev.

    python bench/calibration.py --model runs/sst2-8k --model runs/sst2-8k-int8
    python bench/calibration.py --model runs/sst2-8k --label-smoothing 0.1      # + two 8,000-example fine-tunes
Prints a table and writes bench/results/calibration.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
from peers import FINETUNE, need_model

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("accuracy", "log_loss", "ece")


def folds(n: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The two (fit, measure) index pairs of a seeded half split of ``n`` rows."""
    order = np.random.default_rng(seed).permutation(n)
    a, b = np.sort(order[: n // 2]), np.sort(order[n // 2:])
    return [(a, b), (b, a)]


def temperature_rows(path: str, data: str, seed: int) -> dict:
    """One model's metrics on the measuring halves, before and after the temperature fitted on the other half."""
    from oztune import Classifier
    from oztune.data.load import Columns, encode_examples, read_labelled
    from oztune.train.calibrate import fit_temperature
    from oztune.train.metrics import evaluation_metrics

    clf = Classifier.from_pretrained(path)
    examples = read_labelled(data, Columns(), problem_type=clf.problem_type, text_pairs=clf.text_pairs)
    encoded = encode_examples(examples, clf.encoder, clf.gold_label_ids([e.label for e in examples]),
                              clf.problem_type, data)
    logits, gold = clf.encoded_logits(encoded), encoded.labels.numpy()
    temps, before, after = [], [], []
    for fit_on, measure_on in folds(len(gold), seed):
        t = fit_temperature(logits[fit_on], gold[fit_on])
        temps.append(t)
        before.append(evaluation_metrics("single_label", logits[measure_on], gold[measure_on]))
        after.append(evaluation_metrics("single_label", logits[measure_on] / t, gold[measure_on]))
    mean = lambda ms: {k: float(np.mean([m[k] for m in ms])) for k in KEYS}  # noqa: E731
    return {"model": path, "temperatures": temps, "before": mean(before), "after": mean(after)}


def smoothing_rows(eps: float, examples: int, data: str) -> list[dict]:
    """Two fine-tunes, without and with label smoothing ``eps``, measured on all of ``data``."""
    from oztune import Classifier
    from oztune.cli import main as oztune

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for e in (0.0, eps):
            out = Path(tmp) / f"ls{e:g}"
            argv = ["finetune", "--train", str(ROOT / "data" / "sst2" / "train.tsv"), "--output", str(out),
                    "--epochs", "1", "--max-train-examples", str(examples), "--lr", "1e-4", "--seed", "0",
                    "--label-smoothing", str(e), "--no-progress"]
            if oztune(argv) != 0:
                raise SystemExit(f"oztune {' '.join(argv)} failed")
            m = Classifier.from_pretrained(out).evaluate(data)
            rows.append({"label_smoothing": e, **{k: m[k] for k in KEYS}})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", required=True, help="a fine-tuned SST-2 model (repeatable)")
    p.add_argument("--data", default=str(ROOT / "data" / "sst2" / "dev.tsv"))
    p.add_argument("--seed", type=int, default=0, help="of the half split")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="also fine-tune with and without it")
    p.add_argument("--examples", type=int, default=8000, help="training examples of those fine-tunes")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "calibration.json"))
    a = p.parse_args()
    for m in a.model:
        need_model(m, FINETUNE.format(m))

    rows = [temperature_rows(m, a.data, a.seed) for m in a.model]
    print(f"\nTemperature scaling on {a.data}: fitted on one half, measured on the other (two folds, means)")
    print(f"{'model':<40} {'accuracy':>8} {'log loss':>16} {'ECE':>16} temperatures")
    for r in rows:
        b, t = r["before"], r["after"]
        print(f"{Path(r['model']).name:<40} {100 * b['accuracy']:>7.2f}% "
              f"{b['log_loss']:>6.4f} -> {t['log_loss']:<6.4f} "
              f"{b['ece']:>6.4f} -> {t['ece']:<6.4f} {', '.join(f'{x:.3f}' for x in r['temperatures'])}")
    smooth = smoothing_rows(a.label_smoothing, a.examples, a.data) if a.label_smoothing else []
    if smooth:
        print(f"\nLabel smoothing: two fine-tunes on {a.examples:,} SST-2 train examples (1 epoch, lr 1e-4, seed 0), "
              f"measured on {a.data}")
        print(f"{'label smoothing':<16} {'accuracy':>8} {'log loss':>9} {'ECE':>7}")
        for r in smooth:
            print(f"{r['label_smoothing']:<16g} {100 * r['accuracy']:>7.2f}% {r['log_loss']:>9.4f} {r['ece']:>7.4f}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"data": a.data, "seed": a.seed, "temperature_scaling": rows,
                                       "label_smoothing": smooth}, indent=2) + "\n")
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
