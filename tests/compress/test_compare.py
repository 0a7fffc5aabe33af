"""oztune compare: saved models (PyTorch and ONNX) measured the same way, side by side, with a report."""

from __future__ import annotations

import json

import numpy as np
import pytest

from oztune.cli import main
from oztune.compress.compare import CompareArgs, compare, variant_names
from oztune.models.hub import load_classifier, save_classifier
from oztune.serve.backends import OnnxClassifier
from oztune.serve.export import export_onnx

from conftest import QuietMachine

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def variants(tiny_finetuned, tmp_path_factory):
    """The tiny fine-tuned model, its int8 model and the int8 model's ONNX export."""
    from oztune.compress.quantize import QuantConfig, quantization_record, quantize_

    d = tmp_path_factory.mktemp("variants")
    model, enc, meta = load_classifier(tiny_finetuned)
    q = QuantConfig()
    int8 = save_classifier(quantize_(model, q), enc, d / "int8", meta["id2label"], quantization=quantization_record(q))
    return tiny_finetuned, int8, export_onnx(int8, d / "onnx")


def test_compare_scores_weighs_and_times_every_model_as_evaluate_does(variants, sentiment_files, tmp_path, capsys):
    fp32, int8, onnx = variants
    _, dev = sentiment_files
    out = tmp_path / "report"
    (out / "notes.txt").parent.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["compare", str(fp32), str(int8), str(onnx), "--eval", str(dev), "--output", str(out),
                 "--max-drop", "100"]) == 0
    table = capsys.readouterr().out.splitlines()
    report = json.loads((out / "report.json").read_text())
    rows = {r["name"]: r for r in report["variants"]}
    int8_line = next(line.split() for line in table if line.startswith("int8 "))  # the console table: ECE 4th
    assert table[0].split()[3] == "ECE" and int8_line[3] == f"{rows['int8']['ece']:.3f}"
    assert list(rows) == [fp32.name, "int8", "onnx"] and report["variants"][0]["change"] == 0
    assert [rows[n]["runtime"] for n in rows] == ["torch", "torch", "onnxruntime"]
    want = {n: main(["evaluate", "--model", str(p), "--data", str(dev), "--json"]) for n, p in
            ((fp32.name, fp32), ("int8", int8), ("onnx", onnx))}
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert all(v == 0 for v in want.values()) and len(printed) == 3
    for row, metrics in zip(rows.values(), printed):  # the scores oztune evaluate gives
        assert row["score"] == pytest.approx(100 * metrics["accuracy"])
        assert row["ece"] == pytest.approx(metrics["ece"], abs=1e-6)  # and their calibration, a column of its own
        assert row["throughput"] > 0 and 0 < row["latency_p50_ms"] <= row["latency_p95_ms"]
        assert row["latency_texts"] == 100  # no more eval texts than --latency-texts' 256: batch 1 on every one
    assert rows["int8"]["file_mb"] < rows[fp32.name]["file_mb"] / 2  # int8 weights: about a quarter
    assert rows["onnx"]["file_mb"] == pytest.approx((onnx / "model.onnx").stat().st_size / 1e6)
    assert rows["onnx"]["parameters"] is None and rows["int8"]["parameters"] == rows[fp32.name]["parameters"]
    fastest = max(rows.values(), key=lambda r: r["throughput"])["name"]  # budget 100: every model is within it
    assert report["chosen"] == fastest
    md = (out / "report.md").read_text()
    assert f"| {rows['int8']['ece']:.3f} |" in md and "| ECE |" in md
    assert f"**{fastest}** (fastest in budget)" in md and "| onnx | onnxruntime |" in md.replace(
        "**onnx** (fastest in budget)", "onnx")
    assert (out / "pareto.png").stat().st_size > 10_000 and (out / "notes.txt").read_text() == "mine"
    assert (out / "reliability.png").read_bytes()[:4] == b"\x89PNG" and "](reliability.png)" in md  # every model's
    assert [len(r["metrics"]["reliability"]["count"]) for r in report["variants"]] == [15, 15, 15]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary directory left


def test_compare_warns_when_other_processes_took_the_cores_while_it_timed(variants, sentiment_files, tmp_path,
                                                                          monkeypatch, capsys):
    """Timings taken while other processes compete for the cores are slow (a busy machine once gave nonsense
    ratios): compare says so, on its last lines and in report.md, and records the load in report.json."""
    from oztune.runtime import Contention
    from oztune.serve.backends import default_threads

    threads = []

    class Busy(Contention):
        def __exit__(self, *exc):
            threads.append(self.threads)
            self.others = 1.7 + max(0, len(self.cpus) - self.threads)  # more than the cores the timing left idle

    fp32, int8, onnx = variants
    _, dev = sentiment_files
    monkeypatch.setattr("oztune.compress.compare.Contention", Busy)
    assert main(["compare", str(fp32), str(onnx), "--eval", str(dev), "--output", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = json.loads((tmp_path / "o" / "report.json").read_text())["variants"]
    cores = rows[0]["other_cores"]
    assert [(r["other_cores"], r["busy_machine"]) for r in rows] == [(cores, True)] * 2
    said = (f"the machine was busy: other processes took up to {cores:.1f} cores while the models were timed, so the "
            "timings are slower than on a quiet machine (the models were timed in turns")
    assert out[-2].startswith(f"note: {said}") and out[-1].startswith("report:")
    assert said in " ".join((tmp_path / "o" / "report.md").read_text().split())
    assert threads == [default_threads()]  # the ONNX export's threads: every core, whatever torch has

    monkeypatch.setattr("oztune.compress.compare.Contention", QuietMachine)
    assert main(["compare", str(fp32), str(int8), "--eval", str(dev)]) == 0
    assert "busy" not in capsys.readouterr().out


def test_compare_marks_the_fastest_by_latency_when_asked(variants, sentiment_files, tmp_path, capsys):
    fp32, int8, onnx = variants
    _, dev = sentiment_files
    out = tmp_path / "o"
    assert main(["compare", str(fp32), str(int8), str(onnx), "--eval", str(dev), "--max-drop", "100",
                 "--fastest", "latency", "--output", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    quickest = min(report["variants"], key=lambda r: r["latency_p50_ms"])["name"]
    assert report["chosen"] == quickest and report["settings"]["fastest"] == "latency"
    assert f"**Fastest within the budget (by batch-1 p50 latency): `{quickest}`**" in (out / "report.md").read_text()
    assert any(line.startswith(quickest) and line.endswith("<- fastest in budget (batch 1)")
               for line in capsys.readouterr().out.splitlines())
    assert main(["compare", str(fp32), "--eval", str(dev), "--fastest", "p50"]) == 2
    assert "--fastest must be one of throughput, latency, not 'p50'" in capsys.readouterr().err


def test_the_budget_counts_from_the_first_model(variants, sentiment_files):
    fp32, int8, _ = variants
    _, dev = sentiment_files
    report = compare(CompareArgs(models=[str(int8), str(fp32)], eval=str(dev), max_drop=0))
    base, other = report["variants"]
    assert base["name"] == "int8" and base["change"] == 0 and other["change"] == pytest.approx(other["score"] - base["score"])
    assert other["within_budget"] == (other["score"] >= base["score"])
    assert report["chosen"] in ("int8", "m") and (report["chosen"] == "int8" or other["within_budget"])


def test_compare_refuses_what_it_cannot_measure(variants, sentiment_files, tmp_path, tiny_base, capsys):
    fp32, _, _ = variants
    _, dev = sentiment_files
    for argv, words in ((["--eval", str(dev)], "model directories"), ([str(fp32)], "--eval"),
                        ([str(fp32), "--eval", str(dev), "--max-drop", "-1"], "--max-drop"),
                        ([str(fp32), str(tmp_path / "nope"), "--eval", str(dev)], "nope"),
                        ([str(fp32), str(tiny_base), "--eval", str(dev)], "fine-tune"),
                        ([str(fp32), "--eval", str(dev), "--output", str(dev)], "not a directory"),
                        ([str(fp32), "--eval", str(dev), "--latency-texts", "0"],
                         "--latency-texts must be at least 1, not 0"),
                        ([str(fp32), "--eval", str(dev), "--latency-texts", "-3"], "at least 1, not -3")):
        assert main(["compare", *argv]) == 2 and words in capsys.readouterr().err, argv


def test_names_are_directory_names_unless_two_are_the_same():
    assert variant_names(["runs/a/model", "runs/b/", "c"]) == ["model", "b", "c"]
    assert variant_names(["x/model", "y/model", "z"]) == ["x/model", "y/model", "z"]


def test_onnx_sessions_can_leave_their_threads_idle_between_runs(variants):
    _, _, onnx = variants
    spin, still = OnnxClassifier(onnx), OnnxClassifier(onnx, spin=False)
    assert still.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert np.array_equal(spin.logits(["a good film"]), still.logits(["a good film"]))


def test_an_output_that_cannot_be_written_is_refused_before_any_model_is_measured(variants, sentiment_files,
                                                                                  monkeypatch, capsys):
    fp32, _, _ = variants
    _, dev = sentiment_files

    def measured(*args, **kw):
        raise AssertionError("a model was opened before --output was checked")

    monkeypatch.setattr("oztune.compress.compare.open_predictor", measured)
    assert main(["compare", str(fp32), "--eval", str(dev), "--output", str(dev / "report")]) == 2
    assert f"--output {dev / 'report'}: cannot be created, {dev} is not a directory" in capsys.readouterr().err


def test_an_output_that_is_one_of_the_models_is_refused(variants, sentiment_files, tmp_path, capsys):
    """oztune compress writes report.md, report.json and pareto.png into its model directory: a comparison
    written there would replace them."""
    import shutil

    fp32, int8, _ = variants
    _, dev = sentiment_files
    compressed = shutil.copytree(int8, tmp_path / "compressed")
    (compressed / "report.json").write_text('{"chosen": "int8"}\n')
    assert main(["compare", str(fp32), str(compressed), "--eval", str(dev), "--output", f"{compressed}/"]) == 2
    assert f"--output {compressed}/: is the model {compressed}" in capsys.readouterr().err
    assert (compressed / "report.json").read_text() == '{"chosen": "int8"}\n'


def test_a_model_given_twice_is_refused_before_any_model_is_measured(variants, sentiment_files, monkeypatch, capsys):
    """Twice the same name in the table, both rows marked the fastest in budget: refused instead."""
    fp32, int8, _ = variants
    _, dev = sentiment_files
    monkeypatch.setattr("oztune.compress.compare.open_predictor", lambda *a, **kw: pytest.fail("a model was opened"))
    for again in (str(fp32), f"{fp32}/"):
        assert main(["compare", str(fp32), str(int8), again, "--eval", str(dev)]) == 2
        assert f"{again}: given twice (as {fp32} too); give each model once" in capsys.readouterr().err


def test_a_model_that_refuses_the_eval_file_is_named(variants, sentiment_files, tmp_path, capsys):
    """Which of the models was fine-tuned on text pairs (and so refuses a file of single texts) is said."""
    import shutil

    fp32, _, _ = variants
    _, dev = sentiment_files
    pair = shutil.copytree(fp32, tmp_path / "pair")
    config = json.loads((pair / "config.json").read_text())
    config["oztune"]["text_pairs"] = True
    (pair / "config.json").write_text(json.dumps(config))
    assert main(["compare", str(fp32), str(pair), "--eval", str(dev)]) == 2
    err = capsys.readouterr().err
    assert f"error: {pair}: {dev}: single texts, but the model was fine-tuned on text pairs" in err


def test_the_printed_table_lines_up_under_its_header_with_short_names(variants, sentiment_files, capsys):
    fp32, int8, _ = variants  # "m" and "int8": shorter than the header "model"
    _, dev = sentiment_files
    assert main(["compare", str(fp32), str(int8), "--eval", str(dev)]) == 0
    header, *rows, timed = capsys.readouterr().out.splitlines()
    assert timed == "batch-1 ms: p50 over every eval text; texts/s: batch 64 over every eval text"
    for column in ("accuracy", "change", "ECE", "texts/s"):
        end = header.index(column) + len(column)  # right-aligned: each value ends where its header does
        assert all(r[end - 1].isdigit() and r[end] == " " for r in rows), (header, rows)


def test_the_runtime_column_tells_an_aoti_package_from_an_eager_model(variants, monkeypatch):
    from oztune import Classifier
    from oztune.compress.compare import runtime_of
    from oztune.models.compiled import CompiledClassifier

    fp32, _, onnx = variants
    eager = Classifier.from_pretrained(fp32)
    assert runtime_of(eager) == "torch" and runtime_of(OnnxClassifier(onnx)) == "onnxruntime"
    eager.model = CompiledClassifier(eager.model, graphs=(None, None))  # as an aoti package loads (not run here)
    assert runtime_of(eager) == "torch compiled"


def test_a_metrics_note_is_printed_and_in_the_report(variants, sentiment_files, tmp_path, monkeypatch, capsys):
    """A score that means nothing (pearson of constant predictions: 0, with a note) says so, as evaluate does."""
    from oztune import Classifier

    fp32, int8, _ = variants
    _, dev = sentiment_files
    evaluate = Classifier.evaluate

    def with_note(self, *args, **kwargs):
        return {**evaluate(self, *args, **kwargs), "note": "the predictions are all the same"}

    monkeypatch.setattr(Classifier, "evaluate", with_note)
    assert main(["compare", str(fp32), str(int8), "--eval", str(dev), "--output", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert f"note, {fp32.name}: the predictions are all the same" in out and "note, int8: the predictions" in out
    assert "- Note, `int8`: the predictions are all the same" in (tmp_path / "r" / "report.md").read_text()


def test_batch_1_latency_is_timed_on_latency_texts_spread_over_the_file(variants, sentiment_files, tmp_path,
                                                                        monkeypatch, capsys):
    """Batch 1 goes one text at a time: over a large eval file it took minutes. It is timed on --latency-texts of
    them, spread evenly over the file (the same ones for every model); batch 64 still runs on every text."""
    from oztune.compress import compare as module
    from oztune.compress.report import round_robin

    fp32, int8, _ = variants
    _, dev = sentiment_files
    seen = {}

    def spy(runs, texts, pairs, batches, *args, **kw):
        seen.update(texts=len(texts), batched=sum(len(b) for b in batches), latency=kw.get("latency"))
        return round_robin(runs, texts, pairs, batches, *args, **kw)

    monkeypatch.setattr(module, "round_robin", spy)
    out = tmp_path / "r"
    assert main(["compare", str(fp32), str(int8), "--eval", str(dev), "--latency-texts", "7",
                 "--output", str(out)]) == 0
    assert seen["texts"] == seen["batched"] == 100 and list(seen["latency"]) == [0, 14, 28, 42, 57, 71, 85]
    report = json.loads((out / "report.json").read_text())
    assert [r["latency_texts"] for r in report["variants"]] == [7, 7] and report["settings"]["latency_texts"] == 7
    said = "7 of the 100 eval texts (spread evenly over the file)"
    assert f"batch 1 over {said}" in " ".join((out / "report.md").read_text().split())
    assert f"batch-1 ms: p50 over {said}; texts/s: batch 64 over all 100" in capsys.readouterr().out
