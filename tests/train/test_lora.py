"""LoRA: starts at the pre-trained model, trains only the low-rank updates and the head, merges into a plain checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from oztune.cli import main
from oztune.errors import OztuneError
from oztune.models.hub import load_classifier
from oztune.models.lora import LoRALinear, apply_lora, merge_lora


@pytest.fixture
def model(tiny_base):
    torch.manual_seed(0)
    return load_classifier(tiny_base, num_labels=2)[0]


def logits(model, seed=1):
    ids = torch.randint(4, 64, (3, 7), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(ids, torch.ones_like(ids))


def test_lora_starts_at_the_base_model_and_trains_only_updates_and_head(model):
    before = logits(model)
    trainable = apply_lora(model, rank=4, targets=["qkv", "up"])
    torch.testing.assert_close(logits(model), before, rtol=0, atol=0)  # B starts at zero
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {n for n, _ in model.named_parameters() if "lora_" in n or n.startswith("head.")}
    assert {n.split(".")[4] for n in names if "lora_" in n} == {"qkv", "up"}
    C, F, L = 32, 64, 2
    head = sum(p.numel() for p in model.head.parameters())
    assert trainable == L * 4 * ((C + 3 * C) + (C + F)) + head  # r x (in + out) per wrapped linear


def test_merge_folds_the_update_into_plain_linears(model):
    apply_lora(model, rank=2, alpha=8)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            torch.nn.init.normal_(m.lora_b, std=0.1)  # as if trained
    wrapped = logits(model)
    assert merge_lora(model) == 4 * 2
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(logits(model), wrapped, rtol=1e-5, atol=1e-5)


def test_bad_lora_options(model):
    with pytest.raises(OztuneError, match="--lora-targets: unknown q, v; choose from qkv, o, up, down"):
        apply_lora(model, rank=4, targets=["q", "v"])
    with pytest.raises(OztuneError, match="--lora-rank must be at least 1"):
        apply_lora(model, rank=0)


def test_finetune_with_lora_saves_a_plain_checkpoint_transformers_loads(tiny_base, sentiment_files, tmp_path, capsys):
    import transformers
    from oztune import Classifier

    train, dev = sentiment_files
    out = tmp_path / "lora"
    assert main(["finetune", "--train", str(train), "--eval", str(dev), "--model", str(tiny_base), "--output", str(out),
                 "--epochs", "2", "--batch-size", "16", "--lr", "1e-2", "--lora-rank", "4", "--lora-targets", "qkv,o,up,down",
                 "--max-train-examples", "160"]) == 0
    shown = capsys.readouterr().out
    run = json.loads((out / "run.json").read_text())
    assert run["trainable_parameters"] < run["parameters"] / 2
    assert f"{run['trainable_parameters'] / 1e6:.3g}M trainable" in shown and "LoRA rank 4 on qkv,o,up,down" in shown
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["BertForSequenceClassification"] and cfg["oztune"]["format"] == "hf"

    clf = Classifier.from_pretrained(out)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    batch = clf.encoder(["good movie", "the plot was very dull and the film was bad"])
    with torch.no_grad():
        torch.testing.assert_close(clf.model(**batch), hf(**batch).logits, atol=1e-5, rtol=1e-5)

    base, saved = load_file(tiny_base / "model.safetensors"), load_file(out / "model.safetensors")
    key = {k.removeprefix("bert."): k for k in saved}
    changed = {k for k, v in base.items() if k in key and not torch.equal(v, saved[key[k]])}
    lora = {f"encoder.layer.{i}.{n}.weight" for i in range(2) for n in
            ("attention.self.query", "attention.self.key", "attention.self.value",
             "attention.output.dense", "intermediate.dense", "output.dense")}
    assert changed == lora | {"pooler.dense.weight", "pooler.dense.bias"}  # BERT's pooler belongs to the head


def test_the_update_is_scaled_by_alpha_over_rank_and_its_input_dropped_out():
    from torch import nn

    from oztune.models.lora import LoRALinear

    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    lora = LoRALinear(base, rank=4, alpha=8.0)
    with torch.no_grad():
        lora.lora_a.fill_(1.0)
        lora.lora_b.fill_(1.0)
    x = torch.randn(3, 6)
    with torch.no_grad():
        torch.testing.assert_close(lora(x) - base(x), 2.0 * (x @ lora.lora_a.T) @ lora.lora_b.T)
        dropped = LoRALinear(base, rank=4, alpha=8.0, dropout=0.999999).train()
        dropped.lora_b.fill_(1.0)
        torch.testing.assert_close(dropped(x), base(x))  # everything dropped: only the base layer is left
        torch.testing.assert_close(lora.merged()(x), base(x))  # merged: the same function, one linear


def test_default_alpha_gives_a_scale_of_two(model):
    from oztune.models.lora import LoRALinear

    apply_lora(model, rank=4)
    scales = {m.scaling for m in model.modules() if isinstance(m, LoRALinear)}
    assert scales == {2.0}


@pytest.mark.parametrize("targets, message", [
    ("q,v", "--lora-targets: unknown q, v; choose from qkv, o, up, down"),
    (",", "--lora-targets: give at least one of qkv, o, up, down"),
], ids=["unknown", "empty"])
def test_bad_lora_targets_are_refused_before_any_work(tiny_base, tmp_path, monkeypatch, capsys, targets, message):
    """Unknown names (PEFT's q,v) were refused only after reading the data, tokenizing it and loading the model;
    an empty list (``--lora-targets ""``) silently adapted every linear while run.json recorded none."""
    import oztune.train.finetune as ft

    def no_reading(*a, **k):
        raise AssertionError("the training file was read before the options were checked")

    monkeypatch.setattr(ft, "read_labelled", no_reading)
    train = tmp_path / "train.tsv"
    train.write_text("sentence\tlabel\ngood\tpos\nbad\tneg\n")
    assert main(["finetune", "--train", str(train), "--model", str(tiny_base), "--output", str(tmp_path / "o"),
                 "--lora-rank", "4", "--lora-targets", targets, "--no-progress"]) == 2
    assert message in capsys.readouterr().err
    with pytest.raises(OztuneError, match="give at least one of"):
        apply_lora(load_classifier(tiny_base, num_labels=2)[0], rank=4, targets=[])


def test_saving_unmerged_lora_updates_is_refused_not_written_unloadable(model, tiny_base, tmp_path):
    """save_classifier wrote a model with LoRA updates still beside their layers in oztune's own format, under
    names (``attn.qkv.base.weight``, ``attn.qkv.lora_a``) that neither oztune nor transformers load: the error
    came only when the directory was loaded, and the training was lost."""
    from oztune.models.hub import save_classifier

    enc = load_classifier(tiny_base, num_labels=2)[1]
    apply_lora(model, rank=2)
    with pytest.raises(ValueError, match="merge_lora"):
        save_classifier(model, enc, tmp_path / "m", {0: "neg", 1: "pos"})
    assert not (tmp_path / "m").exists()
    merge_lora(model)
    save_classifier(model, enc, tmp_path / "m", {0: "neg", 1: "pos"})
    torch.testing.assert_close(logits(load_classifier(tmp_path / "m")[0]), logits(model), rtol=1e-6, atol=1e-6)


def test_a_rank_up_to_the_wider_side_of_each_adapted_layer_is_taken(model):
    """The rank is refused only past the wider side of a layer it adapts (qkv: 32 -> 96), and the error names the
    layer with its input and output widths in that order."""
    apply_lora(model, rank=96, targets=["qkv"])  # wider than the input (32), as wide as the output (96)
    assert {m.lora_a.shape[0] for m in model.modules() if isinstance(m, LoRALinear)} == {96}
    with pytest.raises(OztuneError, match=r"--lora-rank 97 is more than the layers it adapts are wide "
                                          r"\(layers\.0\.attn\.qkv: 32 -> 96\)"):
        apply_lora(model.__class__(model.cfg, model.head_cfg), rank=97, targets=["qkv"])


def test_a_layer_pruned_to_nothing_is_left_unwrapped():
    from torch import nn

    from oztune.config import HeadConfig, ModelConfig
    from oztune.models.transformer import SequenceClassifier

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=16,
                      max_positions=16, layer_ffn=[16, 0])  # layer 1's feed-forward pruned away: 32 -> 0 -> 32
    model = SequenceClassifier(cfg, HeadConfig(num_labels=2))
    trainable = apply_lora(model, rank=2, targets=["up", "down"])
    ffn = model.backbone.layers[1].ffn
    assert type(ffn.up) is nn.Linear and type(ffn.down) is nn.Linear  # nothing to adapt
    assert isinstance(model.backbone.layers[0].ffn.up, LoRALinear)
    head = sum(p.numel() for p in model.head.parameters())
    assert trainable == 2 * ((32 + 16) + (16 + 32)) + head  # only layer 0's two linears
    assert merge_lora(model) == 2


def test_lora_refuses_a_model_with_sparse_layers(model):
    from oztune.compress.sparse import magnitude_prune_, to_sparse_

    magnitude_prune_(model, 0.6)
    assert to_sparse_(model)
    with pytest.raises(OztuneError, match=r"LoRA needs plain linear layers; layers\.0\.attn\.qkv is a SparseLinear"):
        apply_lora(model, rank=2)
