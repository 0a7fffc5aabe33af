"""The units of the main metric in compare's and compress's reports, for each problem type.

Scores, drops and the --max-drop budget are points: the main metric x100. For accuracy these are percent, as
before; a Pearson correlation or a micro-F1 x100 is no percentage, and the reports say "pearson x100" or
"micro_f1 x100" where they said "pearson" beside a number a hundred times the one oztune evaluate prints.
"""

from __future__ import annotations

import json
import random
import re

import pytest
import torch

from oztune.cli import main
from oztune.compress.report import pareto_png, points_of

pytestmark = pytest.mark.usefixtures("one_thread")

FILLER = ["movie", "film", "the", "is", "it", "a"]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows(kind: str, n: int, seed: int) -> list[dict]:
    """Texts whose score (regression: how many "good") or labels (multi-label: "good" -> pos, "plot" -> story)
    their words decide."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(FILLER) for _ in range(3)]
        if kind == "regression":
            k = rng.randint(0, 3)
            rows.append({"text": " ".join(["good"] * k + words), "score": k + 0.5})
        else:
            labels = [name for name, word in (("pos", "good"), ("story", "plot")) if rng.random() < 0.5]
            rows.append({"text": " ".join(words + [w for w, name in (("good", "pos"), ("plot", "story"))
                                                   if name in labels]), "labels": labels})
    return rows


@pytest.fixture(scope="module", params=["regression", "multi_label"])
def task(request, tiny_base, tmp_path_factory):
    """(kind, fp32 model, its int8 model, train file, eval file): a tiny model of the problem type, briefly
    fine-tuned, and its int8 copy."""
    from oztune.compress.quantize import QuantConfig, quantization_record, quantize_
    from oztune.data.load import Columns, encode_examples, read_labelled
    from oztune.models.hub import load_classifier, save_classifier
    from oztune.train.loop import TrainConfig, fit

    kind = request.param
    d = tmp_path_factory.mktemp(kind)
    train, dev = _jsonl(d / "train.jsonl", _rows(kind, 160, 0)), _jsonl(d / "dev.jsonl", _rows(kind, 40, 1))
    torch.manual_seed(0)
    id2label = {0: "score"} if kind == "regression" else {0: "pos", 1: "story"}
    model, enc, _ = load_classifier(tiny_base, num_labels=len(id2label), problem_type=kind)
    label2id = None if kind == "regression" else {"pos": 0, "story": 1}
    data = encode_examples(read_labelled(str(train), Columns(), problem_type=kind), enc, label2id, kind, str(train))
    fit(model, data, TrainConfig(epochs=2, batch_size=16, lr=3e-3, progress=False, precision="fp32"))
    fp32 = save_classifier(model, enc, d / "fp32", id2label)
    q = QuantConfig()
    int8 = save_classifier(quantize_(model, q), enc, d / "int8", id2label, quantization=quantization_record(q))
    return kind, fp32, int8, train, dev


METRIC = {"regression": "pearson", "multi_label": "micro_f1"}


def test_points_are_percent_of_accuracy_and_the_metric_x100_otherwise():
    assert points_of("accuracy") == "accuracy"
    assert points_of("pearson") == "pearson x100" and points_of("micro_f1") == "micro_f1 x100"


def test_compare_says_the_score_is_the_metric_x100(task, tmp_path, capsys):
    kind, fp32, int8, _, dev = task
    metric, out = METRIC[kind], tmp_path / "r"
    assert main(["compare", str(fp32), str(int8), "--eval", str(dev), "--output", str(out), "--max-drop", "2"]) == 0
    header, *lines = capsys.readouterr().out.splitlines()
    assert f"{metric} x100" in header, header
    report = json.loads((out / "report.json").read_text())
    base = report["variants"][0]
    assert base["metric"] == metric and base["score"] == pytest.approx(100 * base["metrics"][metric])
    assert f"{base['score']:.2f}" in lines[0]
    assert report["units"].startswith("points: the main metric x100")
    md = (out / "report.md").read_text()
    assert f"| model | runtime | {metric} x100 | change (pt) |" in md
    assert f"budget: at most 2 point(s) of {metric} x100 (0.02 of {metric}) below `fp32`" in " ".join(md.split())
    assert f"- Scores in points: {metric} x100" in md and "(percent)" not in md
    assert f"**Fastest within the budget (by batch-64 throughput): `{report['chosen']}`**: {metric} x100 " in md


def test_compress_says_the_score_is_the_metric_x100(task, tmp_path, capsys):
    kind, fp32, _, train, dev = task
    metric, out = METRIC[kind], tmp_path / "o"
    assert main(["compress", "--model", str(fp32), "--train", str(train), "--eval", str(dev), "--output", str(out),
                 "--recipes", "int8", "--max-drop", "100", "--no-progress", "--precision", "fp32"]) == 0
    shown = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    base = report["variants"][0]
    assert base["score"] == pytest.approx(100 * base["metrics"][metric])
    assert f"fp32: {metric} x100 {base['score']:.2f}, " in shown and f"kept {report['chosen']}: {metric} x100 " in shown
    kept = next(v for v in report["variants"] if v["name"] == report["chosen"])
    if kind == "regression":  # a classifier's calibration beside its score; a regression model has none
        assert kept["ece"] is None and "ECE" not in shown
    else:
        assert f"pt), ECE {kept['ece']:.3f}, " in shown
    # the last line names every report file it wrote (report.json was left out)
    files = "report.md, report.json, pareto.png" + ("" if kind == "regression" else ", reliability.png")
    assert shown.rstrip().endswith(f"saved to {out} ({files})"), shown
    assert sorted(p.name for p in out.glob("*.png")) == sorted(f for f in files.split(", ") if f.endswith(".png"))
    assert report["units"].startswith("points: the main metric x100")
    md = " ".join((out / "report.md").read_text().split())
    assert f"| variant | layers heads FFN vocab | {metric} x100 | change (pt) |" in md
    assert f"budget: at most 100 point(s) of {metric} x100 (1 of {metric}) below fp32" in md
    assert f"- Scores in points: {metric} x100" in md and "(percent)" not in md


@pytest.mark.parametrize("metric, ylabel, unit", [("accuracy", "accuracy (%)", "%"), ("pearson", "pearson x100", ""),
                                                  ("micro_f1", "micro_f1 x100", "")])
def test_the_plot_calls_only_accuracy_a_percentage(metric, ylabel, unit, monkeypatch, tmp_path):
    from matplotlib.figure import Figure

    saved = []
    monkeypatch.setattr(Figure, "savefig", lambda self, path, **kw: saved.append(self))
    rows = [{"name": n, "score": s, "metric": metric, "file_mb": 1.0, "latency_p50_ms": ms}
            for n, s, ms in (("fp32", 82.5, 4.0), ("int8", 82.0, 2.0))]
    pareto_png(rows, "int8", 1.0, tmp_path / "p.png")
    ax = saved[0].axes[0]
    assert ax.get_ylabel() == ylabel
    assert sorted(re.match(r"[^\n]*\n([^,]*),", t.get_text()).group(1) for t in ax.texts) == [f"82.00{unit}",
                                                                                             f"82.50{unit}"]


@pytest.mark.parametrize("command", ["compare", "compress"])
def test_max_drop_help_says_the_unit_of_each_problem_type(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    said = text[text.rindex("--max-drop MAX_DROP"):][:400]  # (the option, not the usage line)
    assert "percent of accuracy (single-label)" in said and "micro-F1 x100 (multi-label)" in said
    assert "Pearson x100 (regression)" in said and "1 point = 0.01" in said
