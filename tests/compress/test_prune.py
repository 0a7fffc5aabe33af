"""Pruning on tiny random models: exact slicing, importance ranking, the cubic schedule, compact storage, the CLI."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from oztune.cli import main
from oztune.compress.prune import PruneConfig, _global_keep, drop_layers_, evenly_spaced, importance, prune_, shrink_
from oztune.compress.sparse import (GradualPruner, cubic_sparsity, encoder_linears, magnitude_masks, magnitude_prune_,
                                    pack_bits, sparsity_of, to_sparse_, unpack_bits)
from oztune.compress.vocab import VocabEmbedding, prune_vocab_, tokens_seen
from oztune.config import HeadConfig, ModelConfig
from oztune.data.dataset import EncodedData
from oztune.models.hub import load_classifier, save_classifier
from oztune.models.transformer import SequenceClassifier, init_weights
from oztune.train.loop import TrainConfig, fit

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(layers: int = 2, heads: int = 4, ffn: int = 24, seed: int = 0) -> SequenceClassifier:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=40, hidden_size=32, num_layers=layers, num_heads=heads, intermediate_size=ffn,
                      max_positions=32)
    model = SequenceClassifier(cfg, HeadConfig(num_labels=2))
    init_weights(model, std=0.2)  # larger than BERT's 0.02 so that every unit matters a little
    return model.eval()


def batch(seed: int = 1, n: int = 6, t: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 40, (n, t), generator=g)
    mask = torch.ones(n, t, dtype=torch.long)
    mask[0, 6:] = 0  # one padded row
    return ids, mask


def random_data(n: int = 64, seed: int = 2) -> EncodedData:
    g = torch.Generator().manual_seed(seed)
    enc = [(torch.randint(4, 40, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist(), None)
           for _ in range(n)]
    enc = [(ids, [0] * len(ids)) for ids, _ in enc]
    return EncodedData(enc, torch.randint(0, 2, (n,), generator=g), 0)


def test_shrinking_nothing_gives_exactly_the_same_logits():
    model = tiny_model()
    ids, mask = batch()
    ref = model(ids, mask)
    kept = shrink_(copy.deepcopy(model), [0, 1], [[0, 1, 2, 3]] * 2, [list(range(24))] * 2)
    assert torch.equal(kept(ids, mask), ref)
    none = prune_(copy.deepcopy(model), PruneConfig(), random_data())
    assert torch.equal(none(ids, mask), ref)


def test_structured_pruning_slices_the_right_rows_and_columns():
    """A shrunk model computes what the original computes with the removed heads and neurons silenced."""
    model = tiny_model(layers=3)
    heads, ffn = [[1, 3], [0, 1, 2]], [list(range(0, 24, 2)), [5, 7, 11]]
    silenced = copy.deepcopy(model)
    for i, (h, f) in zip([0, 2], zip(heads, ffn)):
        block = silenced.backbone.layers[i]
        with torch.no_grad():
            for head in set(range(4)) - set(h):
                block.attn.o.weight[:, head * 8:(head + 1) * 8] = 0
            block.ffn.down.weight[:, sorted(set(range(24)) - set(f))] = 0
    silenced.backbone.layers = torch.nn.ModuleList([silenced.backbone.layers[0], silenced.backbone.layers[2]])
    pruned = shrink_(copy.deepcopy(model), [0, 2], heads, ffn)

    ids, mask = batch()
    torch.testing.assert_close(pruned(ids, mask), silenced(ids, mask), rtol=1e-5, atol=1e-5)
    assert pruned.cfg.num_layers == 2 and pruned.cfg.layer_heads == [2, 3] and pruned.cfg.layer_ffn == [12, 3]
    b0, b1 = pruned.backbone.layers
    assert b0.attn.qkv.weight.shape == (3 * 2 * 8, 32) and b0.attn.o.weight.shape == (32, 2 * 8)
    assert b1.ffn.up.weight.shape == (3, 32) and b1.ffn.down.weight.shape == (32, 3)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())


def test_importance_keeps_the_heads_neurons_and_layers_that_matter():
    model = tiny_model(layers=3)
    with torch.no_grad():
        l0 = model.backbone.layers[0]
        l0.attn.o.weight[:, 8:] = 0  # heads 1, 2, 3 of layer 0 contribute nothing
        l0.ffn.down.weight[:, :12] = 0  # neither do neurons 0-11
        l1 = model.backbone.layers[1]  # layer 1 adds nothing: its block maps a normalised x to x
        for lin in (l1.attn.o, l1.ffn.down):
            lin.weight.zero_()
            lin.bias.zero_()
    scores = importance(model, random_data(), batches=4, batch_size=16)
    assert torch.all(scores.heads[0][1:] == 0) and scores.heads[0][0] > 0
    assert scores.layers[1] < 1e-4 * scores.layers.max()

    pruned = prune_(copy.deepcopy(model), PruneConfig(heads=3 / 8, ffn=12 / 48, layers=1), random_data())
    assert pruned.cfg.layer_heads == [1, 4] and pruned.cfg.layer_ffn == [12, 24]
    # the survivors of layer 0 are head 0 and neurons 12-23: the kept rows are the original ones
    torch.testing.assert_close(pruned.backbone.layers[0].attn.o.weight, l0.attn.o.weight[:, :8])
    torch.testing.assert_close(pruned.backbone.layers[0].ffn.up.weight, l0.ffn.up.weight[12:])
    torch.testing.assert_close(pruned.backbone.layers[1].ffn.up.weight, model.backbone.layers[2].ffn.up.weight)


def test_layer_choice_helpers():
    assert evenly_spaced(6, 3) == [0, 2, 5] and evenly_spaced(6, 6) == list(range(6)) and evenly_spaced(4, 1) == [0]
    model = drop_layers_(tiny_model(layers=3), [0, 2])
    assert model.cfg.num_layers == 2 and model.cfg.layer_heads == [4, 4]


def test_cubic_schedule_shape():
    s = [cubic_sparsity(t, 100, 0.8, begin=0.1, end=0.7) for t in range(101)]
    assert s[0] == s[10] == 0 and s[70] == pytest.approx(0.8) and s[100] == pytest.approx(0.8)
    assert all(a <= b for a, b in zip(s, s[1:]))
    assert s[40] == pytest.approx(0.8 * (1 - 0.5 ** 3))  # half way up the ramp: 7/8 of the final sparsity
    assert s[20] - s[10] > s[70] - s[60]  # fast first, slow at the end


def test_gradual_pruning_in_fit_follows_the_schedule():
    model = tiny_model()
    pruner = GradualPruner(model, 0.75, begin=0.0, end=0.5, updates=8)
    seen = []

    def on_step(step, total):
        pruner(step, total)
        seen.append((step, total, pruner.target, sparsity_of(model)))

    fit(model, random_data(64), TrainConfig(epochs=2, batch_size=8, lr=1e-3, progress=False, precision="fp32"),
        on_step=on_step)
    total = seen[-1][1]
    for step, _, target, actual in seen:
        assert actual == pytest.approx(target, abs=2e-3)  # masks hold between updates while weights train
        assert target <= cubic_sparsity(step, total, 0.75, 0.0, 0.5) + 1e-9
    assert seen[total // 4 - 1][3] > 0.5 and seen[-1][3] == pytest.approx(0.75, abs=2e-3)


def test_a_second_unstructured_prune_counts_the_zeros_already_there():
    """prune_(0.5) then prune_(0.3) keeps the model as the first left it (a weight is never restored); a higher
    target then prunes up to it, the first call's zeros among its zeros (PruneConfig's docstring says so)."""
    model = tiny_model()
    prune_(model, PruneConfig(sparsity=0.5))
    first = {n: p.detach().clone() for n, p in model.named_parameters()}
    prune_(model, PruneConfig(sparsity=0.3))
    assert all(torch.equal(p, first[n]) for n, p in model.named_parameters())
    assert sparsity_of(model) == pytest.approx(0.5, abs=0.01)
    prune_(model, PruneConfig(sparsity=0.7))
    assert sparsity_of(model) == pytest.approx(0.7, abs=0.01)
    zeros_before = [first[n] == 0 for n, _ in model.named_parameters() if n.endswith("weight") and (first[n] == 0).any()]
    zeros_now = [p == 0 for n, p in model.named_parameters() if n.endswith("weight") and (first[n] == 0).any()]
    assert zeros_before and all(bool((now | ~before).all()) for before, now in zip(zeros_before, zeros_now))


def test_magnitude_pruning_zeroes_exactly_the_share_asked_for():
    model = tiny_model(layers=2)
    n = sum(m.weight.numel() for m in encoder_linears(model).values())
    for share in (0.3, 0.5, 0.9):
        masks = magnitude_masks(model, share)
        assert sum(int((~m).sum()) for m in masks.values()) == int(share * n), share


def test_a_share_of_units_rounds_to_the_nearest_whole_unit():
    assert _global_keep([torch.tensor([1.0, 2.0, 3.0])], 0.5) == [[2]]  # round(1.5) = 2 removed
    assert _global_keep([torch.tensor([1.0, 2.0, 3.0, 4.0])], 0.7) == [[3]]  # round(2.8) = 3 removed


def test_importance_of_a_model_in_training_mode_is_measured_without_dropout():
    """A model handed over in train mode (the Python API) is ranked in eval mode, the same twice over, and is
    left in train mode."""
    model = tiny_model(layers=2).train()
    a, b = (importance(model, random_data(), batches=2, batch_size=16) for _ in range(2))
    assert model.training
    for x, y in zip([*a.heads, *a.ffn, a.layers], [*b.heads, *b.ffn, b.layers]):
        torch.testing.assert_close(x, y)


def test_bit_packing_round_trip():
    bits = torch.rand(1001, generator=torch.Generator().manual_seed(0)) > 0.3
    packed = pack_bits(bits)
    assert packed.dtype == torch.uint8 and packed.numel() == 126
    assert torch.equal(unpack_bits(packed, 1001), bits)



def test_bits_are_packed_first_bit_in_the_high_bit():
    """The layout saved files hold (a consistent change to both functions would still round-trip)."""
    bits = torch.zeros(17, dtype=torch.bool)
    bits[[0, 15, 16]] = True
    assert pack_bits(bits).tolist() == [0b1000_0000, 0b0000_0001, 0b1000_0000]
    assert torch.equal(unpack_bits(torch.tensor([0b0100_0001], dtype=torch.uint8), 8),
                       torch.tensor([False, True, False, False, False, False, False, True]))


def test_a_sparse_layer_whose_bitmask_and_values_disagree_is_a_load_error_saying_so():
    from oztune.compress.sparse import SparseLinear

    layer = SparseLinear(8, 4)
    with torch.no_grad():
        layer.weight[:, :4] = 0
    state = layer.state_dict()
    state["weight_values"] = state["weight_values"][:-1]  # a truncated file
    with pytest.raises(RuntimeError, match="weight: bitmask has 16 ones but 15 values"):
        SparseLinear(8, 4).load_state_dict(state)


def test_a_sparsity_under_one_weight_prunes_nothing():
    model = tiny_model()
    for share in (0.0, 1e-9):
        assert all(bool(m.all()) for m in magnitude_masks(model, share).values())


def test_a_layer_with_exactly_min_sparsity_zeros_is_made_sparse_and_its_zeros_kept():
    """"At least min_sparsity": a layer with exactly that share of zeros counts; a dense model has no keeper."""
    from oztune.compress.sparse import SparseLinear, zeros_keeper

    model = tiny_model()
    assert zeros_keeper(model) is None
    name, layer = next(iter(encoder_linears(model).items()))
    with torch.no_grad():
        layer.weight.view(-1)[: layer.weight.numel() // 4] = 0  # exactly a quarter (numel a multiple of 4)
    keep = zeros_keeper(model, min_sparsity=0.25)
    with torch.no_grad():
        layer.weight.add_(1.0)
    keep(1, 10)
    assert int((layer.weight == 0).sum()) == layer.weight.numel() // 4
    assert to_sparse_(model, min_sparsity=0.25) == [name]
    assert isinstance(model.get_submodule(name), SparseLinear)


def test_to_sparse_leaves_fake_quantized_and_already_sparse_layers_as_they_are():
    """Only plain Linears are swapped: a QAT model's FakeQuantLinear would lose its fake quantization, and a
    SparseLinear swapped again would be recorded twice."""
    from oztune.compress.quantize import FakeQuantLinear, prepare_qat_

    qat = prepare_qat_(tiny_model())
    magnitude_prune_(qat, 0.5)
    assert to_sparse_(qat) == []
    assert all(type(m) is FakeQuantLinear for m in encoder_linears(qat).values())
    model = tiny_model()
    magnitude_prune_(model, 0.5)
    assert len(to_sparse_(model)) == 8 and to_sparse_(model) == []


def test_swap_sparse_keeps_a_linear_without_bias_without_one():
    from oztune.compress.sparse import swap_sparse

    model = tiny_model()
    name = next(iter(encoder_linears(model)))
    old = model.get_submodule(name)
    plain = torch.nn.Linear(old.in_features, old.out_features, bias=False)
    swap_sparse(model, name, plain)
    new = model.get_submodule(name)
    assert new.bias is None and torch.equal(new.weight, plain.weight)
    assert set(new.state_dict()) == {"weight_mask", "weight_values"}


def test_cubic_schedule_with_no_ramp_jumps_to_final_at_its_step():
    """begin == end (or no steps at all) is a ramp of one step, not a division by zero."""
    assert [cubic_sparsity(s, 10, 0.8, begin=0.5, end=0.5) for s in (4, 5, 6, 10)] == [0.0, 0.0, 0.8, 0.8]
    assert cubic_sparsity(0, 0, 0.8) == 0.0


def test_gradual_pruner_reaches_final_at_the_end_of_the_ramp_between_its_updates():
    """With 3 updates over 70 of 100 steps masks are recomputed every 23 steps; the ramp's last step (70, not
    a multiple of 23) still recomputes them, so the model recovers at the final sparsity from there on."""
    model = tiny_model()
    pruner = GradualPruner(model, 0.6, end=0.7, updates=3)
    for step in range(1, 71):
        pruner(step, 100)
    assert pruner.target == pytest.approx(0.6)
    assert sparsity_of(model) == pytest.approx(0.6, abs=0.01)


@pytest.fixture
def classifier_dir(tiny_base, tmp_path):
    """A saved tiny classifier (random head) with a tokenizer."""
    torch.manual_seed(0)
    model, enc, _ = load_classifier(tiny_base, num_labels=2)
    return save_classifier(model, enc, tmp_path / "clf", {0: "neg", 1: "pos"})


def test_sparse_and_pruned_models_reload_with_identical_logits(classifier_dir, tmp_path):
    model, enc, meta = load_classifier(classifier_dir)
    b = enc(["good movie", "the plot was very dull and awful", "it"])
    args = (b["input_ids"], b["attention_mask"], b["token_type_ids"])

    magnitude_prune_(model, 0.9)
    assert len(to_sparse_(model)) == 8  # 2 layers x (qkv, o, up, down)
    save_classifier(model, enc, tmp_path / "sparse", meta["id2label"])
    record = json.loads((tmp_path / "sparse" / "config.json").read_text())["oztune"]["pruning"]
    assert record["sparse_format"] == "bitmask" and len(record["sparse_modules"]) == 8
    dense_mb = (classifier_dir / "model.safetensors").stat().st_size
    sparse_mb = (tmp_path / "sparse" / "model.safetensors").stat().st_size
    assert sparse_mb < dense_mb
    again, _, _ = load_classifier(tmp_path / "sparse")
    assert torch.equal(again(*args), model(*args))
    assert sparsity_of(again) == pytest.approx(0.9, abs=1e-3)

    small, _, _ = load_classifier(classifier_dir)
    prune_(small, PruneConfig(heads=0.5, ffn=0.5, layers=1), random_data(32))
    save_classifier(small, enc, tmp_path / "small", meta["id2label"])
    cfg = json.loads((tmp_path / "small" / "config.json").read_text())
    assert cfg["oztune"]["format"] == "native" and cfg["oztune"]["model"]["num_layers"] == 1
    again, _, _ = load_classifier(tmp_path / "small")
    assert again.cfg.layer_heads == small.cfg.layer_heads and torch.equal(again(*args), small(*args))


def test_vocabulary_pruning_keeps_seen_tokens_and_reloads_quantized(classifier_dir, tmp_path):
    from oztune.compress.quantize import QuantConfig, quantization_record, quantize_

    model, enc, meta = load_classifier(classifier_dir)
    seen_texts, unseen = ["good movie", "the plot was dull"], ["awful film"]
    seen = tokens_seen(EncodedData(enc.encode(seen_texts), None, enc.pad_id), model.cfg.vocab_size)
    unk = enc.tokenizer.token_to_id("[UNK]")

    @torch.no_grad()
    def logits(m, texts):
        b = enc(texts)
        return m(b["input_ids"], b["attention_mask"], b["token_type_ids"])

    small = prune_vocab_(copy.deepcopy(model), seen, unk, enc.pad_id)
    assert isinstance(small.backbone.embed.word, VocabEmbedding)
    assert small.backbone.embed.word.table.num_embeddings == int(seen.sum()) + 2  # + [UNK] and [PAD]
    assert torch.equal(logits(small, seen_texts), logits(model, seen_texts))
    b = enc(unseen)
    as_unk = torch.where(seen[b["input_ids"]], b["input_ids"], torch.full_like(b["input_ids"], unk))
    assert torch.equal(logits(small, unseen), model(as_unk, b["attention_mask"], b["token_type_ids"]))

    save_classifier(small, enc, tmp_path / "v", meta["id2label"])
    again, _, _ = load_classifier(tmp_path / "v")
    assert torch.equal(logits(again, seen_texts + unseen), logits(small, seen_texts + unseen))
    q = QuantConfig()
    quantize_(small, q)
    save_classifier(small, enc, tmp_path / "vq", meta["id2label"], quantization=quantization_record(q))
    again, _, _ = load_classifier(tmp_path / "vq")
    assert torch.equal(logits(again, seen_texts + unseen), logits(small, seen_texts + unseen))
    assert (tmp_path / "vq" / "model.safetensors").stat().st_size < (tmp_path / "v" / "model.safetensors").stat().st_size


@pytest.mark.parametrize("eos", [50256, 3])
def test_vocabulary_pruning_keeps_the_pad_row_the_encoder_pads_with(eos, tmp_path):
    """A GPT-2 config without a pad id: the model's config took eos as its pad id while the encoder pads with
    [PAD]. Pruning kept eos's row (GPT-2's 50256, outside these 64 ids: an IndexError) and not [PAD]'s, which an
    empty text then read [UNK] for (one pad token, attended: like GPT-2's, this tokenizer adds no special tokens)."""
    from conftest import tiny_hf_model, write_tiny_tokenizer

    from oztune.compress.vocab import unk_id

    hf = tiny_hf_model("gpt2")
    hf.config.pad_token_id, hf.config.eos_token_id = None, eos
    hf.save_pretrained(tmp_path / "src")
    write_tiny_tokenizer(tmp_path / "src", 64)
    tokenizer = json.loads((tmp_path / "src" / "tokenizer.json").read_text())
    (tmp_path / "src" / "tokenizer.json").write_text(json.dumps({**tokenizer, "post_processor": None}))
    model, enc, meta = load_classifier(tmp_path / "src")
    texts = ["good movie", "the plot was very dull", ""]  # padded to 5 tokens; the empty text is one pad token
    b = enc(texts)
    with torch.no_grad():
        want = model(b["input_ids"], b["attention_mask"])
    pad_row = model.backbone.embed.word.weight[enc.pad_id].clone()
    seen = tokens_seen(EncodedData(enc.encode(texts[:2]), None, enc.pad_id), model.cfg.vocab_size)
    prune_vocab_(model, seen, unk_id(enc), enc.pad_id)
    out = save_classifier(model, enc, tmp_path / "pruned", meta["id2label"])
    saved = json.loads((out / "config.json").read_text())
    assert saved["pad_token_id"] == saved["oztune"]["model"]["pad_token_id"] == enc.pad_id
    again, enc, _ = load_classifier(out)
    word = again.backbone.embed.word
    assert again.cfg.pad_token_id == enc.pad_id and torch.equal(word.weight[word.remap[enc.pad_id]], pad_row)
    b = enc(texts)
    with torch.no_grad():
        torch.testing.assert_close(again(b["input_ids"], b["attention_mask"]), want, atol=0, rtol=0)


def test_dropping_whole_layers_stays_loadable_by_transformers(classifier_dir, tmp_path):
    import transformers
    model, enc, meta = load_classifier(classifier_dir)
    drop_layers_(model, [1])
    save_classifier(model, enc, tmp_path / "one", meta["id2label"])
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "one").eval()
    b = enc(["good movie", "the plot"])
    with torch.no_grad():
        torch.testing.assert_close(hf(**b).logits, model(b["input_ids"], b["attention_mask"], b["token_type_ids"]),
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("extra", [["--structured", "--layers", "1"], ["--sparsity", "0.8"]])
def test_prune_cli_writes_a_model_evaluate_reloads(classifier_dir, sentiment_files, tmp_path, extra, capsys):
    train, dev = sentiment_files
    out = tmp_path / "pruned"
    code = main(["prune", "--model", str(classifier_dir), "--train", str(train), "--eval", str(dev),
                 "--output", str(out),
                 "--epochs", "1", "--max-train-examples", "64", "--no-progress", "--precision", "fp32", *extra])
    assert code == 0
    run = json.loads((out / "run.json").read_text())
    if "--structured" in extra:
        assert run["shape"].startswith("1 layers")
    else:
        assert run["sparsity"] == pytest.approx(0.8, abs=2e-3)
    card = (out / "README.md").read_text()
    assert card.startswith("# pruned classifier") and f"{run['metrics']['accuracy']:.4f} |" in card
    assert main(["evaluate", "--model", str(out), "--data", str(dev), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["accuracy"] == pytest.approx(run["metrics"]["accuracy"])


@pytest.mark.parametrize("args, message", [
    (["--sparsity", "1.0"], "--sparsity must be in [0, 1)"),
    (["--sparsity", "-0.1"], "--sparsity must be in [0, 1)"),
    (["--structured", "--layers", "2"], "--layers 2: the model has only 2 layers"),
    (["--structured", "--heads", "0.01", "--ffn", "0"],  # (1% of 8 heads rounds to none: it retrained, saved "pruned")
     "--structured with --heads 0.01, --ffn 0 and --layers 0 removes nothing from this model (2 layers, heads"),
])
def test_prune_bad_options_exit_2(classifier_dir, sentiment_files, tmp_path, args, message, capsys):
    train, dev = sentiment_files
    code = main(["prune", "--model", str(classifier_dir), "--train", str(train), "--eval", str(dev),
                 "--output", str(tmp_path / "o"), "--no-progress", "--precision", "fp32", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, message", [
    (["--sparsity", "0"], "--sparsity 0 prunes nothing: give a --sparsity above 0"),
    (["--sparsity", "0", "--structured"], "--structured --sparsity 0 prunes nothing (no heads, FFN neurons or layers"),
    (["--structured", "--heads", "0", "--ffn", "0"],  # (--sparsity is not used then: not offered)
     "--structured --heads 0 --ffn 0 prunes nothing (no heads, FFN neurons or layers removed): give --heads or --ffn"),
    (["--structured", "--sparsity", "0", "--heads", "0", "--layers", "0"],
     "--structured --sparsity 0 --heads 0 prunes nothing"),
])
def test_prune_refuses_options_that_prune_nothing_before_loading(tiny_finetuned, sentiment_files, tmp_path, args,
                                                                 message, capsys, monkeypatch):
    """A run that prunes nothing would only retrain the model and save it as "pruned" (accuracy changed, sparsity
    0%): refused with one line before the model is loaded, as quantize refuses a step that quantizes nothing."""
    from oztune.compress import distillation as distill

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(distill, "load_trained", no_loading)
    train, dev = sentiment_files
    code = main(["prune", "--model", str(tiny_finetuned), "--train", str(train), "--eval", str(dev),
                 "--output", str(tmp_path / "o"), "--epochs", "1", "--no-progress", "--precision", "fp32", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert "--layers 1 or more" in err or "--structured with --heads, --ffn or --layers" in err
    assert not (tmp_path / "o").exists()


def test_prune_rejects_a_model_without_a_task_head(tiny_base, sentiment_files, tmp_path, capsys):
    train, dev = sentiment_files
    code = main(["prune", "--model", str(tiny_base), "--train", str(train), "--eval", str(dev),
                 "--output", str(tmp_path / "o")])
    assert code == 2 and "not a fine-tuned classifier" in capsys.readouterr().err


def test_global_ranking_normalises_each_layer_and_keeps_one_unit_per_layer():
    from oztune.compress.prune import _global_keep

    t = torch.tensor
    # without the per-layer L2 normalisation the small-scaled second layer would lose everything but one
    assert _global_keep([t([100.0, 200.0, 300.0]), t([1.0, 2.0, 3.0])], 1 / 3) == [[1, 2], [1, 2]]
    # a layer whose units all score lowest still keeps one
    kept = _global_keep([t([0.0, 0.0]), t([5.0, 5.0])], 0.9)
    assert all(len(k) >= 1 for k in kept) and sum(len(k) for k in kept) == 2
    assert _global_keep([t([3.0, 1.0, 2.0])], 0.0) == [[0, 1, 2]]


def test_magnitude_pruning_ranks_weights_across_layers():
    from oztune.compress.sparse import encoder_linears

    model = tiny_model()
    linears = encoder_linears(model)
    with torch.no_grad():
        linears["backbone.layers.1.ffn.up"].weight.abs_().add_(10.0)  # larger than any other layer's weights
    before = {n: m.weight.detach().abs().clone() for n, m in linears.items()}
    magnitude_prune_(model, 0.5)
    pruned = torch.cat([before[n][m.weight == 0] for n, m in linears.items()])
    kept = torch.cat([before[n][m.weight != 0] for n, m in linears.items()])
    assert pruned.max() <= kept.min()  # one threshold for all layers
    assert (linears["backbone.layers.1.ffn.up"].weight == 0).sum() == 0  # a per-layer threshold would prune half
    assert sparsity_of(model) == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize("layers", [0.5, True, -1])
def test_layers_must_be_a_whole_number_of_layers(layers):
    """PruneConfig(layers=0.5) was accepted, then failed deep in prune_ with 'slice indices must be integers'."""
    from oztune.compress.prune import PruneConfig
    from oztune.errors import OztuneError

    with pytest.raises(OztuneError, match="--layers must be a whole number of layers, 0 or more"):
        PruneConfig(layers=layers)


@pytest.mark.parametrize("config", [PruneConfig(heads=0.5), PruneConfig(ffn=0.5), PruneConfig(layers=1)])
def test_structured_pruning_of_a_qat_model_is_refused_and_leaves_it_as_it_was(config):
    from oztune.compress.quantize import prepare_qat_
    from oztune.errors import OztuneError
    model = prepare_qat_(tiny_model())
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(OztuneError, match="prune the fp32 model first, then prepare_qat_"):
        prune_(model, config, random_data())
    assert {n: type(m) for n, m in model.named_modules()} == before


def test_unstructured_pruning_of_a_qat_model_keeps_its_fake_quantized_layers():
    from oztune.compress.quantize import FakeQuantLinear, prepare_qat_
    model = prepare_qat_(tiny_model())
    before = {n: type(m) for n, m in model.named_modules()}
    prune_(model, PruneConfig(sparsity=0.5))
    assert {n: type(m) for n, m in model.named_modules()} == before and FakeQuantLinear in before.values()
    assert sparsity_of(model) == pytest.approx(0.5, abs=0.01)


def test_structured_pruning_on_no_examples_is_refused_like_unlabelled_data():
    from oztune.errors import OztuneError

    model = tiny_model()
    with pytest.raises(OztuneError, match="needs labelled training data .*holds no examples"):
        prune_(model, PruneConfig(heads=0.5), random_data().subset([]))
    assert model.cfg.layer_heads is None or model.cfg.layer_heads == [4, 4]


def test_pruning_a_quantized_or_pruned_vocabulary_is_refused():
    """prune_vocab_ takes the float token table: an int8 one (Int8Embedding) would be copied as raw codes into a
    float table, its scales lost; a pruned one (VocabEmbedding) has no num_embeddings. Both refused, unchanged."""
    from oztune.compress.quantize import Int8Embedding, quantize_
    from oztune.errors import OztuneError

    keep = torch.zeros(40, dtype=torch.bool)
    keep[5:9] = True
    quantized = quantize_(tiny_model())
    pruned = prune_vocab_(tiny_model(), keep, 1, 0)
    for model, kind in ((quantized, Int8Embedding), (pruned, VocabEmbedding)):
        with pytest.raises(OztuneError, match="already pruned or quantized"):
            prune_vocab_(model, keep, 1, 0)
        assert isinstance(model.backbone.embed.word, kind)


def test_unk_id_is_none_for_a_tokenizer_without_an_unknown_token():
    """Byte-level BPE (GPT-2) has no unknown token: unk_id is None (no vocabulary pruning), never some id."""
    from types import SimpleNamespace

    from tokenizers import Tokenizer
    from tokenizers.models import BPE, WordLevel

    from oztune.compress.vocab import unk_id

    assert unk_id(SimpleNamespace(tokenizer=Tokenizer(BPE()))) is None
    word_level = Tokenizer(WordLevel({"[PAD]": 0, "good": 1, "[UNK]": 2}, unk_token="[UNK]"))
    assert unk_id(SimpleNamespace(tokenizer=word_level)) == 2
