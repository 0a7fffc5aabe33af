"""Chains of compression steps and their less-travelled options (quantize, prune, export, ahead-of-time
packages): each test failed on the code before its fix."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from oztune.api import Classifier
from oztune.cli import main
from oztune.models import aot


@pytest.mark.parametrize("meta", ['{"torch": ', "", "[1, 2]", '"x"', "null", "MISSING_MAX_TOKENS"])
def test_an_unreadable_aoti_meta_json_runs_eager_with_a_warning_not_a_traceback(tiny_hf_dir, tmp_path, capsys, meta):
    # a cut-short or hand-edited aoti/meta.json crashed from_pretrained, predict, evaluate and serve with a
    # JSONDecodeError / AttributeError / KeyError traceback, where a broken .pt2 package runs eager with a warning
    src = tiny_hf_dir("bert")[0]
    folder = src / aot.AOT_DIR
    folder.mkdir()
    if meta == "MISSING_MAX_TOKENS":
        meta = json.dumps({**aot.machine(), "query_rows": True, "weights_sha256": aot.weights_digest(src)})
    (folder / aot.META).write_text(meta)
    with pytest.warns(UserWarning, match="meta.json: unreadable"):
        clf = Classifier.from_pretrained(src)
    plain = Classifier.from_pretrained(src, aot=False)
    texts = ["good film", "w1 w2 w3 bad"]
    assert [p["label"] for p in clf.predict(texts)] == [p["label"] for p in plain.predict(texts)]
    with pytest.warns(UserWarning, match="meta.json: unreadable"):
        assert main(["predict", "--model", str(src), "good film"]) == 0
    assert '"label"' in capsys.readouterr().out


@pytest.mark.parametrize("step", ["quantize", "qat", "prune"])
def test_changing_a_model_that_runs_compiled_graphs_is_refused(tiny_hf_dir, step):
    # Classifier.from_pretrained(an aoti export) wraps the model in a CompiledClassifier whose packages hold
    # the weights compiled in: quantize_(clf.model) (the README's example) then changed only the eager copy, so
    # every batch the packages take kept the fp32 logits, silently (shapes they do not take ran int8)
    from oztune.compress import PruneConfig, QuantConfig, prune_, quantize_
    from oztune.compress.quantize import prepare_qat_
    from oztune.errors import OztuneError
    from oztune.models.compiled import CompiledClassifier
    from oztune.models.hub import load_classifier

    model, _, _ = load_classifier(tiny_hf_dir("bert")[0])
    frozen = {k: v.clone() for k, v in model.state_dict().items()}  # what a package has compiled in
    built = copy.deepcopy(model)
    built.load_state_dict(frozen)
    wrapped = CompiledClassifier(model, graphs=(lambda ids, mask, tt, index: built(ids, mask, tt, token_index=index),
                                                lambda ids, tt: built(ids, None, tt)))
    change = {"quantize": lambda: quantize_(wrapped, QuantConfig()), "qat": lambda: prepare_qat_(wrapped),
              "prune": lambda: prune_(wrapped, PruneConfig(sparsity=0.5))}[step]
    with pytest.raises(OztuneError, match="aot=False"):
        change()
    torch.testing.assert_close(model.state_dict(), frozen)  # nothing half-changed


def _unstructured_pruned(tiny_finetuned, tmp_path):
    """The tiny fine-tuned model with 80% of its encoder weights zeroed, saved as `oztune prune` saves it."""
    from oztune.compress.sparse import magnitude_prune_, to_sparse_
    from oztune.models.hub import load_classifier, save_classifier

    model, enc, meta = load_classifier(tiny_finetuned)
    magnitude_prune_(model, 0.8)
    assert to_sparse_(model)
    return save_classifier(model, enc, tmp_path / "pruned", meta["id2label"])


def test_distilling_an_unstructured_pruned_student_keeps_its_zeros(tiny_finetuned, sentiment_files, tmp_path):
    # oztune distill --student <oztune prune output> trained every pruned weight back to non-zero (sparsity
    # 80% -> 0%) and saved the now dense layers as bitmask + values: a larger file than the unpruned teacher's
    from oztune.compress.sparse import sparsity_of
    from oztune.models.hub import load_classifier

    pruned = _unstructured_pruned(tiny_finetuned, tmp_path)
    train, dev = sentiment_files
    out = tmp_path / "student"
    assert main(["distill", "--teacher", str(tiny_finetuned), "--student", str(pruned), "--train", str(train),
                 "--eval", str(dev), "--output", str(out), "--epochs", "1", "--no-progress"]) == 0
    student, _, _ = load_classifier(out)
    assert sparsity_of(student) >= 0.79
    assert (out / "model.safetensors").stat().st_size < (tiny_finetuned / "model.safetensors").stat().st_size


def test_structured_pruning_of_an_unstructured_pruned_model_keeps_its_zeros(tiny_finetuned, sentiment_files, tmp_path):
    # oztune prune --structured on an `oztune prune` (unstructured) output: the layers it did not slice stayed
    # SparseLinear while the recovery distillation trained their zeros back (the file grew, sparsity fell)
    from oztune.compress.sparse import sparsity_of
    from oztune.models.hub import load_classifier

    pruned = _unstructured_pruned(tiny_finetuned, tmp_path)
    train, dev = sentiment_files
    out = tmp_path / "structured"
    assert main(["prune", "--model", str(pruned), "--train", str(train), "--eval", str(dev), "--output", str(out),
                 "--structured", "--sparsity", "0.25", "--epochs", "1", "--no-progress"]) == 0
    student, _, _ = load_classifier(out)
    assert sparsity_of(student) >= 0.7  # (about 0.78: the slices removed are not exactly 80% zeros)
    assert (out / "model.safetensors").stat().st_size < (pruned / "model.safetensors").stat().st_size


def test_skip_patterns_that_keep_every_layer_in_float_are_refused(tiny_finetuned, tmp_path, capsys):
    # quantize --skip matching every Linear, with --embeddings none, wrote a "quantized" model holding no int8
    # layer, which prune/quantize then refused as already quantized
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(tiny_finetuned), "--output", str(out), "--skip", "backbone.*,head.*",
                 "--embeddings", "none"]) == 2
    assert "nothing" in capsys.readouterr().err and not out.exists()
