"""Ahead-of-time compiled inference (oztune.models.aot, oztune export --format aoti): the packages give
the eager model's logits, load in a fresh Classifier, and fall back to eager where they cannot run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from oztune.api import Classifier
from oztune.cli import main
from oztune.compress.quantize import QuantConfig, quantize_
from oztune.config import HeadConfig, ModelConfig
from oztune.models import aot
from oztune.models.compiled import CompiledClassifier
from oztune.models.hub import load_classifier
from oztune.models.packing import token_index
from oztune.models.transformer import SequenceClassifier

from conftest import padded_batch


@pytest.mark.parametrize("family,pooling,int8", [("bert", "mean", True), ("gpt2", "last", False)])
def test_aot_logits_match_eager(tiny_hf_dir, tmp_path, one_thread, family, pooling, int8):
    model, _, _ = load_classifier(tiny_hf_dir(family)[0])
    model.head_cfg.pooling = pooling
    if int8:
        quantize_(model, QuantConfig())
    model.eval()
    aot.build(model, tmp_path / "m" / aot.AOT_DIR)
    wrapped = aot.load(model, tmp_path / "m")
    assert isinstance(wrapped, CompiledClassifier)
    one_padded = (torch.tensor([[7, 8, 9, 0]]), torch.tensor([[1, 1, 1, 0]]))  # B 1 with padding: eager
    batches = [padded_batch(0, lengths=(7,)), padded_batch(0, lengths=(1,)),  # one text; one token: eager
               padded_batch(0, lengths=(6, 6, 5)), padded_batch(0, lengths=(9, 2, 2, 9)),
               padded_batch(0, lengths=(3, 11, 1, 6, 11), seed=2), one_padded]
    with torch.no_grad():
        for ids, mask in batches:
            # int8: inductor computes x / scale in another order, so a code can round the other way
            torch.testing.assert_close(wrapped(ids, mask), model(ids, mask), atol=2e-2 if int8 else 1e-5, rtol=1e-3)


@pytest.mark.parametrize("window", [3, 5])
def test_a_window_shorter_than_the_example_batch_exports_graphs_that_fit_it(tmp_path, monkeypatch, one_thread,
                                                                             window):
    """The example batch fits the position window (T 7 overran it; a window of 3 gets T 2, B being 3). Only the
    export runs here: the compiler, a minute's work, gets the graphs as they are."""
    built = {}
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package",
                        lambda program, package_path: built.setdefault(Path(package_path).name, program.module()))
    torch.manual_seed(0)
    model = SequenceClassifier(ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                                           intermediate_size=37, max_positions=window), HeadConfig(num_labels=3))
    aot.build(model.eval(), tmp_path)
    ids, mask = padded_batch(0, lengths=(window, 2, window - 1, 1))
    b, t, q = token_index(mask, model.pooled_positions(ids, mask))
    with torch.no_grad():
        torch.testing.assert_close(built[aot.PACKED](ids, mask, torch.zeros_like(ids), b, t, q), model(ids, mask))
        torch.testing.assert_close(built[aot.SINGLE](ids[:1], torch.zeros_like(ids[:1])), model(ids[:1]))


def test_export_aoti_dir_runs_compiled_with_the_same_predictions(tiny_hf_dir, tmp_path, one_thread):
    src = tiny_hf_dir("bert")[0]
    out = tmp_path / "aot"
    assert main(["export", "--model", str(src), "--output", str(out), "--format", "aoti"]) == 0
    assert {p.name for p in (out / aot.AOT_DIR).iterdir()} == {aot.PACKED, aot.SINGLE, aot.META}
    fast, plain = Classifier.from_pretrained(out), Classifier.from_pretrained(out, aot=False)
    assert isinstance(fast.model, CompiledClassifier) and not isinstance(plain.model, CompiledClassifier)
    texts = ["good film", "the plot was very dull and the film was bad", "w1 w2 w3", "great"]
    for batch in (texts, texts[:1]):
        got, want = fast.predict(batch), plain.predict(batch)
        assert [p["label"] for p in got] == [p["label"] for p in want]
        assert [p["score"] for p in got] == pytest.approx([p["score"] for p in want], abs=1e-5)
        torch.testing.assert_close(torch.from_numpy(fast.logits(batch)), torch.from_numpy(plain.logits(batch)),
                                   atol=1e-5, rtol=1e-4)


# any one differing; a package from before oztune recorded its graphs' version has none (read as 1)
@pytest.mark.parametrize("other", [{"torch": "0.1.0"}, {"cpu_capability": "NO_AVX"}, {"graphs": 1}, {"graphs": None}])
def test_packages_for_another_machine_are_not_used(tiny_hf_dir, tmp_path, other):
    src = tiny_hf_dir("bert")[0]
    model, _, _ = load_classifier(src)
    folder = tmp_path / aot.AOT_DIR
    folder.mkdir()
    meta = {k: v for k, v in {**aot.machine(), **other}.items() if v is not None}
    (folder / aot.META).write_text(json.dumps({**meta, "max_tokens": 64, "query_rows": True}))
    built_for = f"built for {meta['torch']} / {meta['cpu_capability']} / oztune graphs {meta.get('graphs', 1)}, this is "
    with pytest.warns(UserWarning, match=re.escape(built_for)):  # not "do not load": it stops at the machine
        assert aot.load(model, tmp_path) is None
    assert aot.load(model, src) is None  # no packages at all: None, quietly


def test_packages_for_other_weights_are_not_used(tiny_hf_dir, tmp_path):
    src = tiny_hf_dir("bert")[0]
    model, _, _ = load_classifier(src)
    folder = src / aot.AOT_DIR
    folder.mkdir()
    meta = {**aot.machine(), "max_tokens": 64, "query_rows": True, "weights_sha256": aot.weights_digest(src)}
    (folder / aot.META).write_text(json.dumps({**meta, "weights_sha256": "0" * 64}))
    with pytest.warns(UserWarning, match="other weights"):
        assert aot.load(model, src) is None
    (folder / aot.META).write_text(json.dumps(meta))  # the right weights: on to loading (no package files here)
    with pytest.warns(UserWarning, match="do not load"):
        assert aot.load(model, src) is None


def test_export_aoti_with_int8_exits_2(tiny_hf_dir, tmp_path, capsys):
    src = tiny_hf_dir("bert")[0]
    assert main(["export", "--model", str(src), "--output", str(tmp_path / "o"), "--format", "aoti", "--int8"]) == 2
    assert "--int8 is for --format onnx" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_graphs_take_at_most_the_position_window(tmp_path, monkeypatch, one_thread):
    """A RoBERTa-like model (position ids start at 2) holds max_positions - 2 tokens: the graphs and the meta
    that bounds what is sent to them say so (they took the table's rows, 2 more than the window)."""
    built = {}
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package",
                        lambda program, package_path: built.setdefault(Path(package_path).name, program))
    torch.manual_seed(0)
    model = SequenceClassifier(ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4,
                                           intermediate_size=37, max_positions=12, position_offset=2),
                               HeadConfig(num_labels=2))
    aot.build(model.eval(), tmp_path)
    assert json.loads((tmp_path / aot.META).read_text())["max_tokens"] == model.cfg.max_length == 10
    for name in (aot.PACKED, aot.SINGLE):
        tokens = built[name].range_constraints
        assert max(int(r.upper) for r in tokens.values() if int(r.upper) < 1000) == 10


def test_an_aoti_export_has_its_own_model_card(tiny_finetuned, tmp_path, monkeypatch):
    """The export copied its source's README.md verbatim: "int8 classifier (oztune quantize)", an example with
    --model <the source>, no word of aoti. It gets its own card. (The compiler, a minute's work, is stubbed.)"""
    import shutil

    monkeypatch.setattr(aot, "build", lambda model, out_dir, weights=None: Path(out_dir).mkdir(parents=True))
    src = tmp_path / "sst2-int8"
    shutil.copytree(tiny_finetuned, src)
    (src / "README.md").write_text("# int8 classifier (oztune quantize)\n\noztune predict --model runs/sst2-int8 \"x\"\n")
    out = tmp_path / "aot"
    assert main(["export", "--model", str(src), "--output", str(out), "--format", "aoti"]) == 0
    card = (out / "README.md").read_text()
    assert card.startswith("# ahead-of-time compiled classifier (oztune export --format aoti)")
    assert "quantize" not in card and "runs/sst2-int8" not in card
    assert f"Made with: `oztune export --model {src} --format aoti --output {out}`" in card
    for line in (f'oztune predict --model {out} "a charming', f"oztune evaluate --model {out} --data",
                 f"oztune serve --model {out}\n", f'Classifier.from_pretrained("{out}")'):
        assert line in card, line
    assert (src / "README.md").read_text().startswith("# int8 classifier")  # the source's card stays its own


def test_an_aoti_export_copies_the_model_not_the_users_other_files(tiny_finetuned, tmp_path, monkeypatch):
    """The export copied the whole source folder: a user's notes (and a compress run's variants/) went with the
    model, and a later export over it was then refused as holding files that are not a model's."""
    import shutil

    monkeypatch.setattr(aot, "build", lambda model, out_dir, weights=None: Path(out_dir).mkdir(parents=True))
    src = tmp_path / "src"
    shutil.copytree(tiny_finetuned, src)
    (src / "notes.txt").write_text("my notes\n")
    (src / "variants" / "int8").mkdir(parents=True)
    (src / "variants" / "int8" / "config.json").write_text("{}")
    out = tmp_path / "aot"
    assert main(["export", "--model", str(src), "--output", str(out), "--format", "aoti"]) == 0
    copied = {p.name for p in out.iterdir()}
    assert "notes.txt" not in copied and "variants" not in copied
    assert {"config.json", "model.safetensors", "tokenizer.json", aot.AOT_DIR} <= copied
    assert (src / "notes.txt").exists()
    assert main(["export", "--model", str(src), "--output", str(out), "--format", "aoti"]) == 0  # over its own export
