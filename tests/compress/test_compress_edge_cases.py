"""Compression verbs: chaining, bad options, interrupted runs (an audit, session 9; each failed before its fix)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from oztune.cli import main
from oztune.compress.quantize import QuantConfig, quantization_record, quantize_
from oztune.models.hub import load_classifier, save_classifier

pytestmark = pytest.mark.usefixtures("one_thread")
SRC = str(Path(__file__).resolve().parents[2] / "src")


@pytest.fixture(scope="module")
def int8_dir(tiny_finetuned, tmp_path_factory):
    model, enc, meta = load_classifier(tiny_finetuned)
    cfg = QuantConfig()
    quantize_(model, cfg)
    return save_classifier(model, enc, tmp_path_factory.mktemp("q") / "q", meta["id2label"],
                           quantization=quantization_record(cfg))


def _one_line_exit_2(capsys, argv):
    rc = main(argv)  # a traceback here (RuntimeError from autograd) is the bug
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


@pytest.mark.parametrize("verb", ["prune", "prune-structured", "distill-teacher", "distill-student"])
def test_int8_model_into_a_training_verb_is_one_clear_line(verb, tiny_finetuned, int8_dir, sentiment_files, tmp_path,
                                                           capsys):
    train, dev = sentiment_files
    common = ["--train", str(train), "--eval", str(dev), "--output", str(tmp_path / "o"), "--epochs", "1",
              "--no-progress", "--precision", "fp32"]
    argv = {"prune": ["prune", "--model", str(int8_dir)],
            "prune-structured": ["prune", "--model", str(int8_dir), "--structured"],
            "distill-teacher": ["distill", "--teacher", str(int8_dir), "--student-layers", "1"],
            "distill-student": ["distill", "--teacher", str(tiny_finetuned), "--student", str(int8_dir)]}[verb]
    _one_line_exit_2(capsys, argv + common)
    assert not (tmp_path / "o").exists()


def test_compress_of_an_int8_model_keeping_fp32_writes_a_loadable_model(int8_dir, sentiment_files, tmp_path,
                                                                        monkeypatch):
    """The 'fp32' baseline of an int8 input is re-saved without its quantization record: unloadable."""
    from oztune.compress import search

    real = search.measure

    def fp32_fastest(model, encoder, eval_data, texts, pairs, saved_in, *rest):
        m = real(model, encoder, eval_data, texts, pairs, saved_in, *rest)
        m["throughput"] = 1e9 if "variants" not in Path(saved_in).parts else 1.0  # (timing noise decides this for real)
        return m

    monkeypatch.setattr(search, "measure", fp32_fastest)
    train, dev = sentiment_files
    out = tmp_path / "o"
    rc = main(["compress", "--model", str(int8_dir), "--train", str(train), "--eval", str(dev), "--output", str(out),
               "--recipes", "int8", "--max-drop", "0", "--no-progress", "--precision", "fp32"])
    if rc == 2:  # refusing an already-quantized model is a fix too
        assert not out.exists()
        return
    assert rc == 0 and json.loads((out / "report.json").read_text())["chosen"] == "fp32"
    load_classifier(out)  # ModelError: weights do not match config.json (unexpected ...weight_scale)


@pytest.mark.parametrize("extra", [["--layers", "1"], ["--heads", "0.5"], ["--ffn", "0.5"],
                                   ["--importance-batches", "4"], ["--importance-batches", "32"]])
def test_structured_only_options_without_structured_are_refused(extra, tiny_finetuned, sentiment_files, tmp_path, capsys):
    train, dev = sentiment_files
    _one_line_exit_2(capsys, ["prune", "--model", str(tiny_finetuned), "--train", str(train), "--eval", str(dev),
                              "--output", str(tmp_path / "o"), "--sparsity", "0.3", "--epochs", "1",
                              "--no-progress", "--precision", "fp32", *extra])
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("budget", ["nan", "inf"])
def test_non_finite_max_drop_is_one_clear_line(budget, tiny_finetuned, sentiment_files, tmp_path, capsys):
    train, dev = sentiment_files
    _one_line_exit_2(capsys, ["compress", "--model", str(tiny_finetuned), "--train", str(train), "--eval", str(dev),
                              "--output", str(tmp_path / "o"), "--recipes", "int8", "--max-drop", budget,
                              "--no-progress", "--precision", "fp32"])
    assert not (tmp_path / "o").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_output_equal_to_model_is_refused_and_the_model_kept(tiny_finetuned, tmp_path, capsys):
    import shutil

    src = tmp_path / "m"
    shutil.copytree(tiny_finetuned, src)
    before = (src / "model.safetensors").read_bytes()
    _one_line_exit_2(capsys, ["quantize", "--model", str(src), "--output", str(src), "--no-progress"])
    assert (src / "model.safetensors").read_bytes() == before  # the fp32 source is not replaced by int8


def test_sigterm_during_compress_leaves_no_half_written_directory(tiny_finetuned, sentiment_files, tmp_path):
    train, dev = sentiment_files
    out = tmp_path / "o"
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "oztune", "compress", "--model", str(tiny_finetuned), "--train", str(train),
                          "--eval", str(dev), "--output", str(out), "--sizes", "0.5", "--epochs", "500",
                          "--no-progress", "--precision", "fp32"], env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list(tmp_path.glob(".o.tmp-*/variants/int8/model.safetensors")):
            assert p.poll() is None, p.stderr.read()
            time.sleep(0.2)
        assert list(tmp_path.glob(".o.tmp-*")), "compress never started writing"
        p.send_signal(signal.SIGTERM)
        p.wait(60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode != 0 and not out.exists()
    assert not list(tmp_path.glob(".o.tmp-*")), "a half-written staging directory is left behind"
