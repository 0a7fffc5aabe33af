"""Mechanical CLI fuzzing of finetune, evaluate, predict, quantize and prune: bad input ends in one line and exit code 2, never a traceback."""

from __future__ import annotations

import pytest

from oztune.cli import main


@pytest.mark.parametrize("command, text", [
    ("evaluate", "batch_size: &a [*a]\n"),                 # an alias that holds itself: an int option
    ("finetune", "lora_targets: &a [*a]\n"),               # ... a list option
    ("predict", "text_column: &a {k: *a}\n"),              # ... a mapping that holds itself
])
def test_recursive_yaml_alias_in_config_is_a_clear_error(command, text, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    assert main([command, "--config", str(cfg)]) == 2  # (a YAML error is raised before the command runs)
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"{cfg}: line 1: " in err and "recursive" in err
    assert len(err.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def files(sentiment_files, tiny_finetuned, tiny_base):
    train, dev = sentiment_files
    return {"train": str(train), "dev": str(dev), "ft": str(tiny_finetuned), "base": str(tiny_base)}


HUGE = "99999999999999999999"  # > 2**64: torch raised "Overflow when unpacking long long"


@pytest.mark.parametrize("argv, needle", [
    (["finetune", "--train", "{train}", "--model", "{base}", "--seed", HUGE], "--seed"),
    (["finetune", "--train", "{train}", "--model", "{base}", "--lora-rank", HUGE], "--lora-rank"),
    # (blamed "base/config.json: a field has a value oztune cannot use", with torch's C++ stack on 50 lines)
    (["finetune", "--train", "{train}", "--model", "{base}", "--head-hidden", f"16,{HUGE}"], "--head-hidden"),
    (["quantize", "--model", "{ft}", "--qat-train", "{train}", "--seed", HUGE], "--seed"),
    (["quantize", "--model", "{ft}", "--qat-train", "{train}", "--seed", "-1"], "--seed"),
    (["quantize", "--model", "{ft}", "--qat-train", "{train}", "--qat-lr", "nan"], "--qat-lr"),
    (["quantize", "--model", "{ft}", "--qat-train", "{train}", "--qat-lr", "inf"], "--qat-lr"),
    (["distill", "--teacher", "{ft}", "--train", "{train}", "--eval", "{dev}", "--student-layers", "1",
      "--seed", HUGE], "--seed"),
])
def test_out_of_range_number_is_a_clear_error(argv, needle, files, tmp_path, capsys):
    argv = [x.format(**files) for x in argv] + ["--output", str(tmp_path / "o"), "--no-progress", "--epochs" if
            argv[0] != "quantize" else "--qat-epochs", "1", "--max-train-examples" if argv[0] != "quantize" else
            "--batch-size", "16", *(["--checkpoint-every", "0"] if argv[0] == "finetune" else [])]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv, message", [
    (["finetune", "--train", "{train}", "--model", "{base}", "--epochs", "0"], "--epochs must be at least 1, not 0"),
    (["finetune", "--train", "{train}", "--model", "{base}", "--lr", "0"], "--lr must be a positive, finite number, not 0.0"),
    (["finetune", "--train", "{train}", "--model", "{base}", "--lora-rank", "4", "--lora-alpha", "-1"],
     "--lora-alpha must be a positive, finite number, not -1.0"),
    (["quantize", "--model", "{ft}", "--qat-train", "{train}", "--qat-epochs", "0"],
     "--qat-epochs must be at least 1, not 0"),
    (["quantize", "--model", "{ft}", "--batch-size", "0"], "--batch-size must be at least 1, not 0"),
    (["quantize", "--model", "{ft}", "--max-length", "-3"], "--max-length must be at least 1, not -3"),
    (["quantize", "--model", "{ft}", "--qat-train", "{train}", "--qat-lr", "0"],
     "--qat-lr must be a positive, finite number, not 0.0"),
    (["distill", "--teacher", "{ft}", "--train", "{train}", "--student-layers", "1", "--temperature", "0"],
     "--temperature must be a positive, finite number, not 0.0"),
    (["prune", "--model", "{ft}", "--train", "{train}", "--eval", "{dev}", "--structured", "--importance-batches", "0"],
     "--importance-batches must be at least 1, not 0"),
    (["compress", "--model", "{ft}", "--train", "{train}", "--eval", "{dev}", "--importance-batches", "0"],
     "--importance-batches must be at least 1, not 0"),
    (["evaluate", "--model", "{ft}", "--data", "{dev}", "--batch-size", "0"], "--batch-size must be at least 1, not 0"),
    (["serve", "--model", "{ft}", "--max-batch-size", "0"], "--max-batch-size must be at least 1, not 0"),
    (["serve", "--model", "{ft}", "--max-queue", "-1"], "--max-queue must be at least 1, not -1"),
], ids=lambda x: " ".join(x[:1] + x[-2:]) if isinstance(x, list) else None)
def test_a_count_below_1_or_a_rate_not_positive_reads_the_same_in_every_command(argv, message, files, tmp_path,
                                                                                 capsys):
    output = [] if argv[0] in ("evaluate", "serve") else ["--output", str(tmp_path / "o")]
    assert main([x.format(**files) for x in argv] + output) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()
