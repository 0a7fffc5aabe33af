"""Places where the README promised behaviour the code did not deliver (an audit).

Each test quotes the README line it checks; each failed on the code before its fix.
"""

from __future__ import annotations

import pytest

from oztune import Classifier
from oztune.cli import main


def _multi_label_model(tiny_base, tmp_path):
    """A tiny multi-label classifier (labels a, b) saved as oztune saves one (untrained head: only its
    problem type and labels matter here)."""
    import torch

    from oztune.models.hub import load_classifier, save_classifier

    torch.manual_seed(0)
    model, enc, _ = load_classifier(tiny_base, num_labels=2, problem_type="multi_label")
    return save_classifier(model, enc, tmp_path / "ml", {0: "a", 1: "b"})


# README, Data: "multi-label (binary cross-entropy): JSON lists (...), Python's (...) or `a|b`; an empty list
# or a blank cell is an example with no labels".
# The reader only treats a blank cell as "no labels" when some *other* cell of the column looks like a list
# or holds a '|'. A multi-label eval file whose labelled rows each have one label (a, b) and one row with no
# label is refused as "missing label", although the model is multi-label.


def test_blank_cell_is_no_labels_when_evaluating_a_multi_label_model(tiny_base, tmp_path):
    out = _multi_label_model(tiny_base, tmp_path)
    data = tmp_path / "eval.tsv"
    data.write_text("sentence\tlabel\ngood movie\ta\nthe film\t\nthe plot\tb\n")
    clf = Classifier.from_pretrained(out)
    assert clf.problem_type == "multi_label"
    metrics = clf.evaluate(str(data))  # raises DataError: "line 3: missing label in column 'label'"
    assert metrics["examples"] == 3


def test_blank_cell_is_no_labels_with_problem_type_multi_label(tiny_base, tmp_path, capsys):
    train = tmp_path / "train.tsv"
    train.write_text("sentence\tlabel\ngood movie\ta\nthe film\t\nthe plot\tb\na good plot\ta\n")
    rc = main(["finetune", "--train", str(train), "--output", str(tmp_path / "m"), "--model", str(tiny_base),
               "--problem-type", "multi_label", "--epochs", "1", "--checkpoint-every", "0", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 0, err  # rc 2: "train.tsv: line 3: missing label in column 'label'"


# README, Errors: "Bad input gets one line naming the file, line, column or option and what was expected, and
# exit code 2 — no traceback: ... an option value out of range (also from `--config` YAML, read as the
# option's type)." These out-of-range option values are accepted (and then misbehave) or end in a traceback.


def _finetune(tiny_base, sentiment_files, tmp_path, *extra):
    train, dev = sentiment_files
    return main(["finetune", "--train", str(train), "--eval", str(dev), "--output", str(tmp_path / "out"),
                 "--model", str(tiny_base), "--epochs", "3", "--checkpoint-every", "0", "--no-progress",
                 "--precision", "fp32", *extra])


def test_negative_patience_is_refused(tiny_base, sentiment_files, tmp_path, one_thread):
    # today: rc 0 after one of the three epochs, with no evaluation at all (run.json history [], metrics {}),
    # while the model card says "Training: 3 epoch(s)"
    assert _finetune(tiny_base, sentiment_files, tmp_path, "--patience", "-1") == 2


def test_negative_seed_is_one_line_not_a_traceback(tiny_base, sentiment_files, tmp_path, one_thread):
    # today: ValueError "expected non-negative integer" from numpy's default_rng, a traceback (rc 1 in the CLI)
    assert _finetune(tiny_base, sentiment_files, tmp_path, "--seed", "-1", "--max-train-examples", "50") == 2


def test_nan_learning_rate_is_one_line_not_a_traceback(tiny_base, sentiment_files, tmp_path, one_thread):
    # today: `a.lr <= 0` is False for nan; torch's AdamW then raises "Invalid learning rate: nan" (a traceback)
    assert _finetune(tiny_base, sentiment_files, tmp_path, "--lr", "nan") == 2


@pytest.mark.parametrize("flag", ["--max-grad-norm", "--weight-decay"])
def test_negative_clipping_norm_or_weight_decay_is_refused(flag, tiny_base, sentiment_files, tmp_path, one_thread):
    # today: accepted and trained (a negative norm switches clipping off on the fused AdamW path and flips the
    # gradients' sign through clip_grad_norm_ on the unfused one; a negative decay grows the weights)
    assert _finetune(tiny_base, sentiment_files, tmp_path, flag, "-1") == 2


def test_nan_distillation_temperature_is_refused():
    from oztune.compress import DistillConfig
    from oztune.errors import OztuneError

    with pytest.raises(OztuneError, match="--temperature"):  # today: `nan <= 0` is False, accepted
        DistillConfig(temperature=float("nan"))


def test_prune_refuses_zero_importance_batches_as_compress_does(tiny_finetuned, sentiment_files, tmp_path):
    # compress: "--importance-batches must be at least 1, not 0"; prune silently measures on one batch
    train, dev = sentiment_files
    assert main(["prune", "--model", str(tiny_finetuned), "--train", str(train), "--eval", str(dev),
                 "--output", str(tmp_path / "p"), "--structured", "--importance-batches", "0", "--epochs", "1",
                 "--no-progress", "--precision", "fp32"]) == 2


def test_predict_to_a_full_stdout_is_one_error_line_not_a_silent_truncation(tiny_finetuned, tmp_path):
    # README, Errors: "a write that fails on the way (a full disk: the error names the output and the OS error
    # ...)": predict's answers to a redirected stdout on a full disk (here a file-size limit) were cut short
    # with exit 0 (a large write to sys.stdout that fits in part is not an error to Python)
    import resource
    import subprocess
    import sys

    out = tmp_path / "answers.jsonl"
    with open(out, "wb") as fh:
        r = subprocess.run([sys.executable, "-m", "oztune", "predict", "--model", str(tiny_finetuned), "--input", "-"],
                           input="good film and the plot is very nice\n" * 3000, stdout=fh, stderr=subprocess.PIPE,
                           text=True, timeout=120,
                           preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (20480, 20480)))
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "standard output" in r.stderr and "File too large" in r.stderr


# README, Compress, the Python quantize snippet: "save_classifier(clf.model, clf.encoder, "runs/sst2-int8", ...)".
# It saved without text_pairs: a pair model quantized that way lost config.json's oztune.text_pairs and then scored
# single texts (the snippet is run here as written, on a pair model, but for its predict of a single text).


def test_the_readme_quantize_snippet_keeps_a_pair_models_text_pairs_record(tiny_base, tmp_path, monkeypatch):
    import json
    import re
    from pathlib import Path

    import torch

    from oztune.models.hub import load_classifier, save_classifier

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    snippet = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "quantization_record(" in b)
    torch.manual_seed(0)
    model, enc, _ = load_classifier(tiny_base, num_labels=2)
    save_classifier(model, enc, tmp_path / "runs" / "sst2", {0: "neg", 1: "pos"}, text_pairs=True)
    monkeypatch.chdir(tmp_path)
    exec("\n".join(line for line in snippet.splitlines() if ".predict(" not in line), {})
    config = json.loads((tmp_path / "runs" / "sst2-int8" / "config.json").read_text())
    assert config["oztune"].get("text_pairs") is True
    assert Classifier.from_pretrained(tmp_path / "runs" / "sst2-int8").text_pairs is True


def test_the_functions_the_readme_places_in_oztune_compress_are_there():
    """README: "In Python (each a config dataclass and one function, in `oztune.compress`; `quantize_`,
    `prepare_qat_` and `prune_` ...", and its snippets' ``from oztune.compress import ...`` lines."""
    import re
    from pathlib import Path

    import oztune.compress

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    said = readme[readme.index("in `oztune.compress`;"):]
    said = said[:said.index("\n\n")]
    names = set(re.findall(r"`(\w+_)`", said))
    for line in re.findall(r"^from oztune\.compress import (.+)$", readme, re.M):
        names |= {n.strip() for n in line.split(",")}
    assert "prepare_qat_" in names
    missing = sorted(n for n in names if not hasattr(oztune.compress, n) or n not in oztune.compress.__all__)
    assert not missing, missing
