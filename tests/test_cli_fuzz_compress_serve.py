"""Mechanical CLI fuzzing of distill, compress, export and serve: one bad value per run ends in one
line naming the option and exit code 2, never a traceback, a nan model or a server that starts anyway."""

from __future__ import annotations

import pytest

from oztune.cli import main


@pytest.fixture(scope="module")
def files(sentiment_files, tiny_finetuned):
    train, dev = sentiment_files
    return {"train": str(train), "dev": str(dev), "ft": str(tiny_finetuned)}


HUGE = "99999999999999999999"  # > 2**64
DISTILL = ["distill", "--teacher", "{ft}", "--train", "{train}", "--eval", "{dev}", "--epochs", "1",
           "--max-train-examples", "16", "--no-progress"]
COMPRESS = ["compress", "--model", "{ft}", "--train", "{train}", "--eval", "{dev}", "--epochs", "1",
            "--max-train-examples", "16", "--recipes", "prune", "--no-progress"]


@pytest.mark.parametrize("argv, needle", [
    (DISTILL + ["--student", ""], "--student"),                           # was a TypeError traceback
    (DISTILL + ["--student-layers", "1", "--hidden-weight", "nan"], "--hidden-weight"),  # were a nan student,
    (DISTILL + ["--student-layers", "1", "--hidden-weight", "inf"], "--hidden-weight"),  # saved as a success
    (DISTILL + ["--student-layers", "1", "--hidden-weight", "1e400"], "--hidden-weight"),
    (COMPRESS + ["--sizes", "1e-300"], "--sizes"),                        # named --heads, an option of prune
    (COMPRESS + ["--sizes", "0.001"], "--sizes"),                         # a variant named prune0
    (COMPRESS + ["--sizes", "0.5,0.999"], "--sizes"),                     # ... and prune100
    (["export", "--model", "{ft}", "--format", "aoti", "--opset", "99"], "--opset"),  # silently ignored
    (["quantize", "--model", "{ft}", "--scheme", "int4"], "--scheme"),      # "quantization scheme must be ..."
    (["quantize", "--model", "{ft}", "--embeddings", "int4"], "--embeddings"),  # "embeddings must be ..."
])
def test_bad_value_is_one_line_and_nothing_is_written(argv, needle, files, tmp_path, capsys):
    argv = [x.format(**files) for x in argv] + ["--output", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


PRUNE = ["prune", "--model", "{ft}", "--train", "{train}", "--eval", "{dev}", "--epochs", "1",
         "--max-train-examples", "16", "--no-progress"]


@pytest.mark.parametrize("argv", [DISTILL + ["--student-layers", "1"], COMPRESS, PRUNE, ["quantize", "--model", "{ft}"]])
def test_a_max_length_beyond_the_window_is_refused_naming_the_model(argv, files, tmp_path, capsys):
    """--max-length 65 on a model of 64 positions was cut to 64 without a word by every command but finetune."""
    argv = [x.format(**files) for x in argv] + ["--max-length", "65", "--output", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the model reads at most 64 tokens (its position table), not the max length 65" in err
    assert files["ft"] in err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv, needle", [
    (["--threads", HUGE], "--threads"),                     # torch: "Overflow when unpacking long long" traceback
    (["--threads", str(2**31)], "--threads"),
    (["--threads", "100000"], "--threads"),                 # started, to make 100,000 threads at the first request
    (["--backend", "onnx", "--threads", HUGE], "--threads"),   # onnxruntime's TypeError traceback
    (["--backend", "onnx", "--workers", HUGE], "--workers"),   # OverflowError traceback
    (["--workers", "100000"], "--workers"),                 # torch: spawned model processes without end
    (["--host", ""], "--host"),                             # listened on every interface, as http://:PORT
])
def test_serve_refuses_bad_start_up_values_before_loading(argv, needle, files, monkeypatch, capsys):
    from oztune.serve import commands

    def started(a):  # a bad value that got through: never serve from a test
        raise AssertionError(f"serve started with {argv}")

    monkeypatch.setattr(commands, "_serve", started)
    assert main(["serve", "--model", files["ft"], "--port", "0", *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and needle in err and len(err.strip().splitlines()) == 1, err
