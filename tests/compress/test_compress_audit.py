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


def test_the_fp32_row_weighs_the_model_compress_writes_when_it_keeps_it(sentiment_files, tmp_path, monkeypatch):
    # the fp32 row weighed the input's files: for an fp16 checkpoint (as many on the hub are) the report said the
    # kept fp32 model was half the size of the fp32 model.safetensors written to the output
    from pathlib import Path

    from conftest import tiny_hf_model, write_tiny_tokenizer
    from oztune.compress import search

    model = tiny_hf_model("bert", num_labels=2)
    model.config.id2label, model.config.label2id = {0: "neg", 1: "pos"}, {"neg": 0, "pos": 1}
    model.half().save_pretrained(tmp_path / "fp16")
    write_tiny_tokenizer(tmp_path / "fp16", 64)
    real = search.measure

    def worse(model, encoder, eval_data, texts, pairs, saved_in, *rest):
        m = real(model, encoder, eval_data, texts, pairs, saved_in, *rest)
        if "variants" in Path(saved_in).parts:  # every variant but fp32: out of budget
            m["score"] -= 50
        return m

    monkeypatch.setattr(search, "measure", worse)
    train, dev = sentiment_files
    out = tmp_path / "out"
    assert main(["compress", "--model", str(tmp_path / "fp16"), "--train", str(train), "--eval", str(dev),
                 "--output", str(out), "--recipes", "int8", "--max-drop", "1", *FAST]) == 0
    report = json.loads((out / "report.json").read_text())
    rows = {r["name"]: r for r in report["variants"]}
    assert report["chosen"] == "fp32"
    assert rows["fp32"]["file_mb"] == pytest.approx((out / "model.safetensors").stat().st_size / 1e6)
