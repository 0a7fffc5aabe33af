"""oztune compress and its report: bugs found by an audit (session 15); each test failed on the code before its fix."""

from __future__ import annotations

import json

import pytest

from oztune.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = ["--no-progress", "--precision", "fp32", "--epochs", "1", "--max-train-examples", "100", "--importance-batches", "2"]


def test_compressing_an_unstructured_pruned_model_keeps_its_zeros(tiny_finetuned, sentiment_files, tmp_path):
    # compress --recipes prune on an `oztune prune` (unstructured) output: the recovery distillation trained
    # every pruned weight back (sparsity 80% -> 0%), as distill and prune --structured once did
    from oztune.compress.sparse import magnitude_prune_, sparsity_of, to_sparse_
    from oztune.models.hub import load_classifier, save_classifier

    model, enc, meta = load_classifier(tiny_finetuned)
    magnitude_prune_(model, 0.8)
    assert to_sparse_(model)
    pruned = save_classifier(model, enc, tmp_path / "pruned", meta["id2label"])
    train, dev = sentiment_files
    out = tmp_path / "out"
    assert main(["compress", "--model", str(pruned), "--train", str(train), "--eval", str(dev), "--output", str(out),
                 "--recipes", "prune", "--sizes", "0.5", "--max-drop", "100", "--no-prune-vocab", *FAST]) == 0
    student, _, _ = load_classifier(out / "variants" / "prune50")
    assert sparsity_of(student) >= 0.7
    rows = {r["name"]: r for r in json.loads((out / "report.json").read_text())["variants"]}
    assert rows["prune50"]["file_mb"] < rows["fp32"]["file_mb"]
