"""``oztune compress`` end to end on a tiny model, the pruning plan, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import pytest

from oztune.cli import main
from oztune.compress.search import plan
from oztune.config import ModelConfig
from oztune.models.hub import load_classifier

pytestmark = pytest.mark.usefixtures("one_thread")


def test_plan_splits_the_cut_between_depth_and_width():
    cfg = ModelConfig(num_layers=6)
    p = plan(cfg, 0.5)
    assert p.layers == 2 and p.heads == pytest.approx(0.25) and p.ffn == pytest.approx(0.25)
    p = plan(cfg, 0.33)
    assert p.layers == 3 and p.heads == pytest.approx(0.34)
    for keep in (0.2, 0.5, 0.8):  # the encoder weights kept come out near the share asked for
        p = plan(cfg, keep)
        assert (6 - p.layers) / 6 * (1 - p.heads) == pytest.approx(keep, abs=1e-9)
    assert plan(ModelConfig(num_layers=2), 0.5).layers == 1


def test_compress_end_to_end(tiny_finetuned, sentiment_files, tmp_path, capsys):
    train, dev = sentiment_files
    out = tmp_path / "small"
    code = main(["compress", "--model", str(tiny_finetuned), "--train", str(train), "--eval", str(dev), "--output", str(out),
                 "--recipes", "int8,prune-int8", "--sizes", "0.5", "--epochs", "2", "--lr", "3e-3",
                 "--max-train-examples", "200", "--max-drop", "5", "--no-progress", "--precision", "fp32"])
    assert code == 0
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "report.md", "report.json", "pareto.png",
            "variants"} <= names
    report = json.loads((out / "report.json").read_text())
    variants = {v["name"]: v for v in report["variants"]}
    assert list(variants) == ["fp32", "int8", "prune50-int8"]
    assert {p.name for p in (out / "variants").iterdir()} == {"int8", "prune50-int8"}
    chosen = variants[report["chosen"]]
    assert chosen["within_budget"] and chosen["throughput"] == max(v["throughput"] for v in variants.values()
                                                                   if v["within_budget"])
    small = variants["prune50-int8"]
    assert small["shape"].startswith("L1 H4 F64 V") and small["parameters"] < variants["fp32"]["parameters"]
    assert variants["int8"]["shape"] == "L2 H8 F128 V64"  # int8 alone keeps the whole vocabulary
    assert variants["int8"]["parameters"] == variants["fp32"]["parameters"]
    assert variants["int8"]["file_mb"] < variants["fp32"]["file_mb"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary directory left behind"
    shown = capsys.readouterr().out  # a tiny model's sizes in kB (one decimal in MB: 0.1 MB for each)
    for v in variants.values():
        assert f"{v['name']}: accuracy {v['score']:.2f}, {v['file_mb'] * 1e3:.3g} kB, " in shown
    assert f"({chosen['change']:+.2f} pt), ECE {chosen['ece']:.3f}, {chosen['file_mb'] * 1e3:.3g} kB, " in shown

    r = subprocess.run([sys.executable, "-m", "oztune", "evaluate", "--model", str(out), "--data", str(dev), "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert 100 * json.loads(r.stdout)["accuracy"] == pytest.approx(chosen["score"])
    r = subprocess.run([sys.executable, "-m", "oztune", "predict", "--model", str(out), "great film", "awful plot"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert [json.loads(line)["label"] for line in r.stdout.splitlines()] == ["pos", "neg"]


@pytest.mark.parametrize("args, message", [
    (["--max-drop", "-0.5"], "--max-drop must be 0 or more"),
    (["--recipes", "int4"], "--recipes: unknown int4"),
    (["--sizes", "1.5"], "--sizes must be shares"),
])
def test_compress_bad_options_exit_2(tiny_finetuned, sentiment_files, tmp_path, args, message, capsys):
    train, dev = sentiment_files
    code = main(["compress", "--model", str(tiny_finetuned), "--train", str(train), "--eval", str(dev),
                 "--output", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_compress_bad_model_or_data_exit_2(tiny_finetuned, tiny_base, sentiment_files, tmp_path, capsys):
    train, dev = sentiment_files
    common = ["--train", str(train), "--output", str(tmp_path / "o"), "--no-progress", "--precision", "fp32"]
    assert main(["compress", "--model", str(tiny_base), "--eval", str(dev), *common]) == 2
    assert "not a fine-tuned classifier" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["compress", "--model", str(tmp_path / "empty"), "--eval", str(dev), *common]) == 2
    assert "not a model directory" in capsys.readouterr().err
    bad = tmp_path / "bad.tsv"
    bad.write_text("sentence\tlabel\ngood movie\tpos\nso so\tmixed\n")
    assert main(["compress", "--model", str(tiny_finetuned), "--eval", str(bad), *common]) == 2
    err = capsys.readouterr().err
    assert "mixed" in err and str(bad) in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_nothing_in_budget_keeps_the_fp32_model(tiny_finetuned, sentiment_files, tmp_path, monkeypatch):
    """With every variant scored below budget, the output is the input model, still a loadable classifier."""
    from oztune.compress import search

    real = search.measure

    def worse(model, encoder, eval_data, texts, pairs, saved_in, *rest):
        m = real(model, encoder, eval_data, texts, pairs, saved_in, *rest)
        if "variants" in Path(saved_in).parts:  # every variant but fp32 (the input model, saved as work/fp32)
            m["score"] -= 50
        return m

    monkeypatch.setattr(search, "measure", worse)
    train, dev = sentiment_files
    out = tmp_path / "o"
    assert main(["compress", "--model", str(tiny_finetuned), "--train", str(train), "--eval", str(dev), "--output", str(out),
                 "--recipes", "int8", "--max-drop", "0.5", "--no-progress", "--precision", "fp32"]) == 0
    assert json.loads((out / "report.json").read_text())["chosen"] == "fp32"
    model, _, meta = load_classifier(out)
    assert meta["id2label"] == {0: "neg", 1: "pos"} and model.cfg.num_layers == 2


def test_compress_times_batch_1_on_at_most_latency_texts(tiny_finetuned, sentiment_files, tmp_path, monkeypatch):
    """Batch 1 over every eval text took minutes on a large eval file: it runs on LATENCY_TEXTS of them, spread
    over the file, and the report says how many."""
    monkeypatch.setattr("oztune.compress.report.LATENCY_TEXTS", 7)
    train, dev = sentiment_files
    out = tmp_path / "o"
    assert main(["compress", "--model", str(tiny_finetuned), "--train", str(train), "--eval", str(dev), "--output",
                 str(out), "--recipes", "int8", "--max-drop", "100", "--no-progress", "--precision", "fp32"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [v["latency_texts"] for v in report["variants"]] == [7, 7]
    assert "batch 1 over 7 of the 100 eval texts (spread evenly over the file)" in " ".join(
        (out / "report.md").read_text().split())


def test_fastest_picks_by_batch_64_throughput_or_batch_1_latency_within_the_budget():
    from oztune.compress.report import pick_fastest

    def r(name, tp, ms, mb=1.0, within=True):
        return {"name": name, "throughput": tp, "latency_p50_ms": ms, "file_mb": mb, "within_budget": within}

    rows = [r("fp32", 100, 10), r("int8", 150, 12), r("pruned", 140, 6, within=False), r("small", 150, 12, mb=0.5)]
    assert pick_fastest(rows) == pick_fastest(rows, "throughput") == "small"  # (a tie: the smaller file)
    assert pick_fastest(rows, "latency") == "fp32"  # pruned is faster still, but outside the budget
    rows.append(r("tied", 90, 10, mb=0.25))
    assert pick_fastest(rows, "latency") == "tied"  # as fast at batch 1 as fp32, and the smaller file


def test_compress_keeps_the_fastest_by_latency_when_asked(tiny_finetuned, sentiment_files, tmp_path, monkeypatch,
                                                          capsys):
    """int8 on a CPU without VNNI can be faster than fp32 at batch 64 and slower at batch 1: --fastest latency
    keeps what one text at a time runs fastest, and the report, card and last line say by what it was kept."""
    from oztune.compress import search

    real = search.measure

    def int8_batches_fp32_single(model, encoder, eval_data, texts, pairs, saved_in, *rest):
        m = real(model, encoder, eval_data, texts, pairs, saved_in, *rest)
        fp32 = "variants" not in Path(saved_in).parts  # (timing noise decides these for real)
        m["throughput"], m["latency_p50_ms"] = (100.0, 5.0) if fp32 else (150.0, 8.0)
        return m

    monkeypatch.setattr(search, "measure", int8_batches_fp32_single)
    train, dev = sentiment_files
    args = ["compress", "--model", str(tiny_finetuned), "--train", str(train), "--eval", str(dev), "--recipes",
            "int8", "--max-drop", "100", "--no-progress", "--precision", "fp32"]
    chosen = {}
    for fastest in ("throughput", "latency"):
        out = tmp_path / fastest
        assert main([*args, "--output", str(out), "--fastest", fastest]) == 0
        chosen[fastest] = json.loads((out / "report.json").read_text())["chosen"]
        words = "batch-1 p50 latency" if fastest == "latency" else "batch-64 throughput"
        assert f"(the fastest within the budget by {words})" in (out / "report.md").read_text()
        assert f"kept as the fastest by {words}" in " ".join((out / "README.md").read_text().split())
    assert chosen == {"throughput": "int8", "latency": "fp32"}
    assert "kept fp32: accuracy" in capsys.readouterr().out.splitlines()[-1]
    assert main([*args, "--output", str(tmp_path / "bad"), "--fastest", "speed"]) == 2
    assert "--fastest must be one of throughput, latency, not 'speed'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


class BusyFor:
    """Stands in for oztune.runtime.Contention: the machine is busy (1.7 cores of others) for the timings whose
    number is in ``busy`` (0: the first one timed), quiet for the others."""

    def __init__(self, busy: set[int]):
        self.busy_ones, self.count = busy, 0

    def __call__(self, threads):
        n, self.count = self.count, self.count + 1
        load = SimpleNamespace(others=1.7 if n in self.busy_ones else 0.1, busy=n in self.busy_ones)
        return nullcontext(load)


def test_compress_says_which_variants_were_timed_on_a_busy_machine(tiny_finetuned, sentiment_files, tmp_path,
                                                                   monkeypatch, capsys):
    """compress times the variants one after another: one timed while other processes took the cores can lose the
    choice to a busier spell, so the report, the progress lines and the last line say which were."""
    train, dev = sentiment_files
    args = ["compress", "--model", str(tiny_finetuned), "--train", str(train), "--eval", str(dev), "--recipes",
            "int8", "--max-drop", "100", "--no-progress", "--precision", "fp32"]
    monkeypatch.setattr("oztune.compress.report.Contention", BusyFor({1}))  # fp32 quiet, int8 busy
    assert main([*args, "--output", str(tmp_path / "busy")]) == 0
    out = capsys.readouterr().out
    rows = json.loads((tmp_path / "busy" / "report.json").read_text())["variants"]
    assert [(r["name"], r["other_cores"], r["busy_machine"]) for r in rows] == [("fp32", 0.1, False),
                                                                               ("int8", 1.7, True)]
    said = "the machine was busy: other processes took up to 1.7 cores while int8 was timed"
    assert f"note: {said}" in out and "(machine busy: other processes took 1.7 cores)" in out
    assert said in " ".join((tmp_path / "busy" / "report.md").read_text().split())
    monkeypatch.setattr("oztune.compress.report.Contention", BusyFor(set()))  # quiet: no note anywhere
    assert main([*args, "--output", str(tmp_path / "quiet")]) == 0
    assert "busy" not in capsys.readouterr().out and "busy" not in (tmp_path / "quiet" / "report.md").read_text()


def test_compress_writes_a_model_card_for_the_model_it_keeps(tiny_finetuned, sentiment_files, tmp_path):
    """quantize, prune and distill write a README.md model card; compress wrote none for the model it keeps."""
    train, dev = sentiment_files
    out = tmp_path / "o"
    assert main(["compress", "--model", str(tiny_finetuned), "--train", str(train), "--eval", str(dev), "--output",
                 str(out), "--recipes", "int8", "--max-drop", "100", "--no-progress", "--precision", "fp32"]) == 0
    report = json.loads((out / "report.json").read_text())
    kept = next(v for v in report["variants"] if v["name"] == report["chosen"])
    card = (out / "README.md").read_text()
    assert card.startswith("# compressed classifier (oztune compress)")
    said = ("`int8` (recipe int8, L2 H8 F128 V64)" if kept["name"] == "int8"  # (timing decides: fp32 may be faster)
            else "fp32, the source model as it was measured (no other variant within the budget was faster)")
    assert f"Source: `{tiny_finetuned}`; recipes tried: int8; kept: {said}\n" in card
    assert f"accuracy {kept['score']:.2f} against fp32's {report['variants'][0]['score']:.2f} " \
           f"({kept['change']:+.2f} pt; budget: at most 100 point(s) of accuracy below)" in card
    assert f"| metric | fp32 | kept: {kept['name']} |" in card
    assert f'oztune predict --model {out} "a charming and often affecting journey"' in card
