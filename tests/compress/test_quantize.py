"""int8 quantization: accuracy against fp32, kernels, save/reload, skip patterns, QAT, and the CLI end to end."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from oztune.api import Classifier
from oztune.cli import main
from oztune.compress import int8_ops, quantize
from oztune.compress.int8_ops import quantize_per_channel
from oztune.compress.quantize import (BoundedFeedForward, ChunkedFeedForward, FakeQuantLinear, Int8Embedding, Int8Linear, QuantConfig,
                                      prepare_qat_, quantization_record, quantize_)
from oztune.config import HeadConfig, ModelConfig
from oztune.data.dataset import EncodedData
from oztune.data.load import Columns, encode_examples, read_labelled
from oztune.data.tokenize import TextEncoder
from oztune.errors import OztuneError
from oztune.models.hub import load_classifier, save_classifier
from oztune.models.transformer import SequenceClassifier, init_weights
from oztune.train.loop import TrainConfig, fit

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_classifier(seed: int = 0, **cfg) -> SequenceClassifier:
    torch.manual_seed(seed)
    base = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48, max_positions=64)
    model = SequenceClassifier(ModelConfig(**{**base, **cfg}), HeadConfig(num_labels=3))
    init_weights(model, std=0.2)
    with torch.no_grad():
        model.head.out.weight.mul_(10)  # logits spread widely, so that argmax is not a coin flip
    return model.eval()


def random_batch(n: int = 48, T: int = 20, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 64, (n, T), generator=g)
    mask = torch.ones(n, T, dtype=torch.long)
    for i, length in enumerate(torch.randint(2, T + 1, (n,), generator=g)):
        mask[i, length:] = 0
        ids[i, length:] = 0
    return ids, mask


def save_tiny(model: SequenceClassifier, path, quant: QuantConfig | None, tokenizer_from):
    """Save with the word-level tokenizer of ``tokenizer_from`` (the tiny_base fixture's directory)."""
    enc = TextEncoder.from_dir(tokenizer_from, 62)
    return save_classifier(model, enc, path, {0: "neg", 1: "neutral", 2: "pos"},
                           quantization=quantization_record(quant) if quant else None)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("M", [1, 7, 300])  # torch._int_mm below ONEDNN_MIN_ROWS rows, oneDNN from there on
def test_int8_linear_is_close_to_fp32(M):
    torch.manual_seed(0)
    lin = nn.Linear(96, 80)
    q = Int8Linear.from_linear(lin)
    x = torch.randn(M, 96) * torch.rand(M, 1) * 10  # tokens of very different magnitudes: per-token scales
    with torch.no_grad():
        assert rel_err(q(x), lin(x)) < 0.01
    assert q.weight.dtype == torch.int8 and q.weight_scale.dtype == torch.float32
    torch.testing.assert_close(q.dequantized_weight(), lin.weight.detach(), atol=q.weight_scale.max().item(), rtol=0)


def test_both_kernels_give_the_same_result(monkeypatch):
    torch.manual_seed(0)
    q = Int8Linear.from_linear(nn.Linear(64, 40))
    x = torch.randn(300, 64)
    onednn = q(x)
    monkeypatch.setattr(int8_ops, "ONEDNN_MIN_ROWS", 10**9)
    torch.testing.assert_close(q(x), onednn, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("M", [7, 300])
def test_weights_written_through_data_are_used_after_sum_weights(M):
    """Int8Linear caches its packed weight and knows a change by the weight's version counter; a write through
    ``weight.data`` bumps none, and the docstring's rule (call sum_weights after changing the weight) packs again."""
    torch.manual_seed(0)
    q, other = Int8Linear.from_linear(nn.Linear(64, 40)), Int8Linear.from_linear(nn.Linear(64, 40))
    x = torch.randn(M, 64)
    with torch.no_grad():
        before = q(x)  # packs q's weight
        q.weight.data.copy_(other.weight)
        q.weight_scale.data.copy_(other.weight_scale)
        q.bias.data.copy_(other.bias)
        q.sum_weights()
        torch.testing.assert_close(q(x), other(x), atol=1e-6, rtol=1e-6)
        assert not torch.allclose(q(x), before)


@pytest.mark.parametrize("M", [7, 300])
def test_int8_linear_runs_under_inference_mode_first_and_no_grad_after(M):
    torch.manual_seed(0)
    q = Int8Linear.from_linear(nn.Linear(64, 40))
    x = torch.randn(M, 64)
    with torch.inference_mode():  # the first call packs the weight for oneDNN (M >= ONEDNN_MIN_ROWS)
        first = q(x).clone()
    with torch.no_grad():
        torch.testing.assert_close(q(x), first)
    torch.testing.assert_close(q(x), first)  # and with autograd on


def test_zero_rows_empty_inputs_and_empty_layers_are_finite():
    torch.manual_seed(0)
    q = Int8Linear.from_linear(nn.Linear(16, 8))
    x = torch.randn(3, 5, 16)
    x[:, 3:] = 0  # padding rows
    y = q(x)
    assert y.shape == (3, 5, 8) and torch.isfinite(y).all()
    torch.testing.assert_close(y[:, 3:], q.bias.expand(3, 2, 8))
    assert q(torch.zeros(0, 16)).shape == (0, 8)
    empty_in = Int8Linear.from_linear(nn.Linear(0, 4))  # a feed-forward pruned to width 0
    empty_in.bias.uniform_(1, 2)  # (nn.Linear(0, 4)'s own bias is zeros)
    torch.testing.assert_close(q(torch.zeros(2, 0, 16)), q.bias.expand(2, 0, 8))
    torch.testing.assert_close(empty_in(torch.zeros(2, 0)), empty_in.bias.expand(2, 4))
    assert Int8Linear.from_linear(nn.Linear(4, 0))(torch.randn(2, 4)).shape == (2, 0)
    for few_rows in (True, False):  # a zero row's scale is positive: its codes are 0 / scale = 0, never 0 / 0
        codes, scale = int8_ops.quantize_per_token(x.reshape(-1, 16), few_rows)
        assert (scale > 0).all() and not codes.view(3, 5, 16)[:, 3:].any()


@pytest.mark.parametrize("bits,bound", [(8, 0.05), (7, 0.1)])  # 7: half the levels, about twice the error
def test_quantized_classifier_is_close_to_fp32(bits, bound):
    model = tiny_classifier()
    q = quantize_(copy.deepcopy(model), QuantConfig(weight_bits=bits))
    ids, mask = random_batch()
    with torch.no_grad():
        ref, out = model(ids, mask), q(ids, mask)
    assert rel_err(out, ref) < bound
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
    kinds = {type(m) for m in q.modules()}
    assert nn.Linear not in kinds and nn.Embedding in kinds  # token types stay fp32, every Linear is int8
    assert type(q.backbone.embed.word) is Int8Embedding and type(q.backbone.layers[0].ffn) is ChunkedFeedForward


@pytest.mark.parametrize("M", [7, 300])  # torch._int_mm, and oneDNN's kernel from ONEDNN_MIN_ROWS rows on
@pytest.mark.parametrize("floor", [None, 0.17])
def test_int8_linear_takes_an_input_that_requires_grad(M, floor):
    torch.manual_seed(0)
    q = Int8Linear.from_linear(nn.Linear(64, 40))
    x = torch.randn(M, 64).clamp_min(-(floor or 10)).requires_grad_()  # e.g. an fp32 LayerNorm's output
    lower = None if floor is None else -floor
    with torch.no_grad():
        ref = q(x, None, lower)
    torch.testing.assert_close(q(x, None, lower), ref, atol=0, rtol=0)


@pytest.mark.parametrize("n", [4, 40])
def test_an_int8_model_runs_with_autograd_on_and_gives_its_no_grad_logits(n):
    q = quantize_(tiny_classifier(), QuantConfig())  # its LayerNorms stay fp32 parameters that require grad
    assert any(p.requires_grad for p in q.parameters())
    ids, mask = random_batch(n=n)
    with torch.no_grad():
        ref = q(ids, mask)
    torch.testing.assert_close(q(ids, mask), ref)  # (fp32 kernels may round differently with autograd on)


def test_chunked_feed_forward_is_exact(monkeypatch):
    model = quantize_(tiny_classifier(), QuantConfig())
    ids, mask = random_batch(n=40, T=16)
    with torch.no_grad():
        whole = model(ids, mask)
        monkeypatch.setattr(quantize, "CHUNK_ROWS", 37)  # 640 tokens in 18 chunks, the last one short
        torch.testing.assert_close(model(ids, mask), whole, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu"])
def test_activation_bounds_cover_the_rows_and_keep_the_output(activation):
    """The feed-forward's down-projection codes each row of act(h) over [-floor, max(max h, 0)]: never
    narrower than the row's values (else codes would clip), and close to them when the row's maximum is a
    few units."""
    from oztune.models.transformer import activation_fn

    floor = quantize.ACT_FLOORS[activation]
    act = activation_fn(activation)
    g = torch.Generator().manual_seed(0)
    h = torch.cat([torch.randn(64, 300, generator=g) * 4,  # typical rows: maxima of 8 to 16
                   -torch.rand(4, 300, generator=g) * 3,  # every value negative (GELU's dip near -0.75)
                   torch.full((1, 300), -0.75), torch.full((1, 300), 1.0)])
    top = h.amax(-1, keepdim=True).clamp_min(0)
    assert (act(h) >= -floor).all() and (act(h) <= top).all()
    torch.testing.assert_close(top[:64], act(h).amax(-1, keepdim=True)[:64], atol=0, rtol=1e-6)

    ffn = quantize_(tiny_classifier(activation=activation), QuantConfig()).backbone.layers[0].ffn
    assert type(ffn) is ChunkedFeedForward and ffn.act_floor == floor
    x = torch.randn(10, 32, generator=g) * 3
    with torch.no_grad():
        with_bound = ffn(x)
        ffn.act_floor = None
        plain = ffn(x)
        ffn.up.bias.sub_(50)  # every h negative: act(h) in [-floor, 0], above max h (the bound is max(max h, 0))
        negative = ffn(x)
        ffn.act_floor = floor
        torch.testing.assert_close(ffn(x), negative, atol=1e-3, rtol=0)
    assert rel_err(with_bound, plain) < 0.02


@pytest.mark.parametrize("M", [7, 300])  # torch._int_mm below ONEDNN_MIN_ROWS rows, oneDNN from there on
@pytest.mark.parametrize("given_top", [True, False])
def test_int8_linear_codes_inputs_with_a_floor_asymmetrically(M, given_top):
    """Inputs known to be >= lower (a GELU's output) get 255 steps over [lower, row max]: both kernels compute
    exactly those codes' product, which is much closer to fp32 than symmetric codes over [-max, max]."""
    torch.manual_seed(0)
    lin = nn.Linear(96, 40)
    q = Int8Linear.from_linear(lin)
    x = nn.functional.gelu(torch.randn(M, 96) * 3)
    lower = -quantize.ACT_FLOORS["gelu"]
    top = x.amax(-1, keepdim=True)
    with torch.no_grad():
        y = q(x, top if given_top else None, lower)
        scale = (top - lower) / 255
        coded = ((x - lower) / scale).round() * scale + lower
        torch.testing.assert_close(y, nn.functional.linear(coded, q.dequantized_weight(), q.bias), atol=1e-4, rtol=1e-4)
        ref = nn.functional.linear(x, q.dequantized_weight(), q.bias)  # the activations' rounding only
        assert rel_err(y, ref) < 0.6 * rel_err(q(x), ref)
        q.bias = None  # without a bias: the floor's constant term (lower * each output's weight sum) alone
        torch.testing.assert_close(q(x, top if given_top else None, lower), y - lin.bias, atol=1e-4, rtol=1e-4)


def test_weight_sums_follow_loads_and_the_down_projections_use_them(tmp_path):
    """``weight_sums`` is not saved: a loaded layer (e.g. ``prepare_quantized``'s empty one) recomputes it."""
    a, b = (quantize_(tiny_classifier(seed), QuantConfig()) for seed in (0, 1))
    down = a.backbone.layers[0].ffn.down
    assert "weight_sums" not in a.state_dict() and (down.weight_sums != 0).any()
    a.load_state_dict(b.state_dict())
    torch.testing.assert_close(down.weight_sums, down.dequantized_weight().sum(1))
    torch.testing.assert_close(down.weight_sums, b.backbone.layers[0].ffn.down.weight_sums, atol=0, rtol=0)


def test_pruned_shapes_and_a_layer_without_heads():
    model = tiny_classifier(layer_heads=[0, 2], layer_ffn=[5, 0])
    q = quantize_(copy.deepcopy(model), QuantConfig())
    ids, mask = random_batch(n=6)
    with torch.no_grad():
        assert rel_err(q(ids, mask), model(ids, mask)) < 0.05


def test_save_reload_gives_identical_logits_and_a_smaller_file(tmp_path, tiny_base):
    model = tiny_classifier(vocab_size=64)
    ids, mask = random_batch()
    sizes = {}
    for emb in ("int8", "none"):
        cfg = QuantConfig(embeddings=emb)
        q = quantize_(copy.deepcopy(model), cfg)
        d = save_tiny(q, tmp_path / emb, cfg, tiny_base)
        config = json.loads((d / "config.json").read_text())
        assert config["oztune"]["format"] == "native" and config["oztune"]["quantization"]["embeddings"] == emb
        loaded, _, _ = load_classifier(d)
        with torch.no_grad():
            assert torch.equal(loaded(ids, mask), q(ids, mask))
        assert type(loaded.backbone.layers[1].attn.qkv) is Int8Linear
        sizes[emb] = (d / "model.safetensors").stat().st_size
    fp32 = save_tiny(copy.deepcopy(model), tmp_path / "fp32", None, tiny_base)
    assert sizes["int8"] < sizes["none"] < (fp32 / "model.safetensors").stat().st_size


def test_loading_8_bit_codes_on_a_cpu_without_vnni_says_they_run_slowly_there(tmp_path, tiny_base, monkeypatch,
                                                                             capsys):
    """A model quantized on a CPU with VNNI (8-bit codes) runs through fp32 matmuls on one without it, slower than
    fp32: loading it there says so, and how to get int8 speed; 7-bit codes there, or 8-bit ones on a CPU with
    VNNI, load silently."""
    model = tiny_classifier(vocab_size=64)
    dirs = {}
    for bits in (8, 7):
        cfg = QuantConfig(weight_bits=bits)
        dirs[bits] = save_tiny(quantize_(copy.deepcopy(model), cfg), tmp_path / str(bits), cfg, tiny_base)
    capsys.readouterr()
    n = sum(isinstance(m, Int8Linear) for m in load_classifier(dirs[8])[0].modules())
    for vnni, bits, said in ((False, 8, True), (False, 7, False), (True, 8, False)):
        monkeypatch.setattr(int8_ops, "HAS_ONEDNN", vnni)
        monkeypatch.setattr(int8_ops, "ONEDNN_7BIT", not vnni)
        load_classifier(dirs[bits])
        err = capsys.readouterr().err
        assert (f"oztune: note: {dirs[bits]}: {n} of its {n} int8 layers hold 8-bit weight codes" in err) == said, err
        assert said or not err
        if said:
            assert "quantize the fp32 model on this CPU" in err


def test_a_linear_of_one_input_feature_stays_fp32_and_the_model_is_deterministic(tmp_path, tiny_base):
    """Structured pruning can leave a feed-forward block one neuron wide: its down-projection reads one feature.
    torch._int_mm (torch 2.13, CPU) gives garbage for K = 1, different on every call (the int8 model's scores
    moved by up to 0.25 between two calls). Such a layer now stays fp32, in quantize_, on reload and in QAT."""
    model = tiny_classifier(intermediate_size=1)
    ids, mask = random_batch()
    with torch.no_grad():
        ref = model(ids, mask)
        cfg = QuantConfig()
        q = quantize_(copy.deepcopy(model), cfg)
        one = [n for n, m in q.named_modules() if isinstance(m, (nn.Linear, Int8Linear)) and m.in_features == 1]
        assert one and all(type(q.get_submodule(n)) is nn.Linear for n in one), one
        assert type(q.backbone.layers[0].attn.qkv) is Int8Linear  # (the others are int8)
        first = q(ids, mask)
        assert torch.equal(first, q(ids, mask))
        assert rel_err(first, ref) < 0.05
        loaded, _, _ = load_classifier(save_tiny(q, tmp_path / "q", cfg, tiny_base))
        assert torch.equal(loaded(ids, mask), first)
    qat = prepare_qat_(copy.deepcopy(model), cfg)
    assert all(type(qat.get_submodule(n)) is not FakeQuantLinear for n in one)


def test_skip_patterns_keep_modules_in_fp32(tmp_path, tiny_base):
    cfg = QuantConfig(skip=["head.*", "backbone.layers.1"])
    q = quantize_(tiny_classifier(), cfg)
    assert type(q.head.out) is nn.Linear and type(q.backbone.layers[1].ffn.up) is nn.Linear
    assert type(q.backbone.layers[1].attn.qkv) is nn.Linear and type(q.backbone.layers[0].attn.qkv) is Int8Linear
    loaded, _, _ = load_classifier(save_tiny(q, tmp_path / "m", cfg, tiny_base))
    assert type(loaded.head.out) is nn.Linear and type(loaded.backbone.layers[0].ffn.down) is Int8Linear
    with pytest.raises(OztuneError, match="'layers.9' matches no module"):
        quantize_(tiny_classifier(), QuantConfig(skip=["layers.9"]))
    with pytest.raises(OztuneError, match="embeddings must be one of int8, none"):
        QuantConfig(embeddings="int4")
    assert QuantConfig(skip=None).skip == []  # (None: nothing skipped)
    for bad in (5, ["head.*", 3]):  # (was a bare TypeError from the list comprehension)
        with pytest.raises(OztuneError, match="skip must be a list of glob patterns"):
            QuantConfig(skip=bad)


def test_deepcopy_of_a_quantized_model_runs():
    q = quantize_(tiny_classifier(), QuantConfig())
    ids, mask = random_batch(n=30)  # 600 tokens: the oneDNN kernel, whose packed weight is not copyable
    with torch.no_grad():
        ref = q(ids, mask)
        torch.testing.assert_close(copy.deepcopy(q)(ids, mask), ref)


def test_fake_quantization_passes_gradients_straight_through():
    x = torch.randn(4, 8, requires_grad=True)
    y = int8_ops.fake_quantize_per_token(x)
    assert (y - x).abs().max() <= x.abs().amax() / 254 + 1e-6
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))
    w = torch.randn(4, 8, requires_grad=True)  # QAT's weights and down-projection inputs train the same way
    for fq in (int8_ops.fake_quantize_per_channel(w), int8_ops.fake_quantize_from_floor(w, -10.0)):
        w.grad = None
        (fq * x.detach()).sum().backward()
        torch.testing.assert_close(w.grad, x.detach())


@pytest.fixture(scope="module")
def finetuned(one_thread, tiny_base, sentiment_files, tmp_path_factory):
    """A tiny BERT fine-tuned on the synthetic sentiment task with the CLI."""
    train, dev = sentiment_files
    out = tmp_path_factory.mktemp("ft") / "model"
    assert main(["finetune", "--train", str(train), "--eval", str(dev), "--output", str(out), "--model", str(tiny_base),
                 "--epochs", "4", "--lr", "3e-3", "--batch-size", "16", "--no-progress", "--no-freeze-embeddings"]) == 0
    return out


def test_qat_fake_quantizes_the_down_projections_on_their_int8_grid():
    """QAT trains each feed-forward's down-projection on the asymmetric grid its int8 layer will use, whose
    upper bound is max(max h, 0) of the activation's input h, not the activation output's max (with the
    small h here, GELU's max is well under it: QAT's grid would be finer than int8's)."""
    model = tiny_classifier()
    ref = quantize_(copy.deepcopy(model), QuantConfig())
    prepare_qat_(model)
    ffn, int8_ffn = model.backbone.layers[0].ffn, ref.backbone.layers[0].ffn
    assert type(ffn) is BoundedFeedForward and type(ffn.down) is FakeQuantLinear
    assert type(model.backbone.layers[0].ffn.up) is FakeQuantLinear
    x = torch.randn(6, 32) * 0.1
    with torch.no_grad():
        h = ffn.up(x)
        assert (h.amax(-1) > 1.2 * ffn.act(h).amax(-1)).all()  # the two bounds differ: the test can tell them apart
        fp32 = int8_ffn.down.dequantized_weight()
        want = nn.functional.linear(int8_ops.fake_quantize_from_floor(ffn.act(h), -quantize.ACT_FLOORS["gelu"],
                                                                      h.amax(-1, keepdim=True).clamp_min(0)),
                                    fp32, int8_ffn.down.bias)
        torch.testing.assert_close(ffn.down(ffn.act(h), h.amax(-1, keepdim=True).clamp_min(0), -0.1701), want)
        torch.testing.assert_close(ffn(x), want, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(int8_ffn(x), want, atol=1e-5, rtol=1e-3)  # the int8 kernel, up to rounding


@pytest.mark.parametrize("bits", [8, 7])
@pytest.mark.parametrize("config", [{}, {"embeddings": "none", "skip": ["head.*"]}], ids=["all", "some"])
def test_a_qat_model_computes_what_its_int8_model_will(config, bits):
    """Every layer int8 converts is simulated, embeddings included, and nothing else: given the int8 model's
    inputs, each QAT layer gives its int8 layer's outputs, up to the int8 kernel's rounding, and the QAT model's
    logits (what training evaluates and keeps the best of) are far closer to the int8 model's than fp32's are
    (not equal to 1e-5 end to end: a 1e-7 difference can round an int8 code the other way, and the next layers
    carry the step on)."""
    config = QuantConfig(weight_bits=bits, **config)
    model = tiny_classifier()
    fp32 = copy.deepcopy(model)
    ref = quantize_(copy.deepcopy(model), config)
    prepare_qat_(model, config)
    assert isinstance(model.backbone.embed.word, quantize.FakeQuantEmbedding) == (config.embeddings == "int8")
    assert type(model.backbone.embed.token_type) is nn.Embedding  # int8 keeps it fp32 too
    assert (type(model.head.out) is FakeQuantLinear) == (not config.skip)
    calls = []
    int8_layers = [(n, m) for n, m in ref.named_modules() if isinstance(m, (Int8Linear, Int8Embedding))]
    for name, m in int8_layers:
        m.register_forward_hook(lambda m, args, out, name=name: calls.append((name, args, out)))
    ids, mask = random_batch()
    with torch.no_grad():
        want, qat = ref(ids, mask), model(ids, mask)
        assert {n for n, _, _ in calls} == {n for n, _ in int8_layers}
        for name, args, out in calls:
            torch.testing.assert_close(model.get_submodule(name)(*args), out, atol=1e-5, rtol=1e-5)
        assert rel_err(fp32(ids, mask), want) > 10 * rel_err(qat, want)  # int8 is not simply fp32 here


def test_qat_trains_and_converts(finetuned, sentiment_files):
    train, _ = sentiment_files
    model, enc, meta = load_classifier(finetuned)
    data = encode_examples(read_labelled(str(train), Columns()), enc, meta["label2id"], "single_label", str(train))
    prepare_qat_(model, QuantConfig(skip=["head.out"]))
    assert type(model.backbone.layers[0].attn.qkv) is FakeQuantLinear and type(model.head.out) is nn.Linear
    result = fit(model, data, TrainConfig(epochs=2, batch_size=16, lr=1e-3, progress=False, precision="fp32"))
    losses = [r["loss"] for r in result.log]
    assert sum(losses[-5:]) < sum(losses[:5])
    quantize_(model, QuantConfig(skip=["head.out"]))
    assert not any(isinstance(m, FakeQuantLinear) for m in model.modules())
    assert type(model.backbone.layers[0].attn.qkv) is Int8Linear and type(model.head.out) is nn.Linear


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "oztune", *args], capture_output=True, text=True, timeout=300)


def test_cli_quantize_then_evaluate_and_predict_in_fresh_processes(finetuned, sentiment_files, tmp_path, capsys):
    train, dev = sentiment_files
    out = tmp_path / "int8"
    assert main(["quantize", "--model", str(finetuned), "--output", str(out), "--eval", str(dev), "--skip", "head.out",
                 "--qat-train", str(train), "--qat-epochs", "1", "--qat-lr", "1e-4", "--no-progress"]) == 0
    shown = capsys.readouterr().out
    assert "weights:" in shown and "accuracy on" in shown and "(int8)" in shown
    run_json = json.loads((out / "run.json").read_text())
    assert run_json["metrics"]["accuracy"] >= 0.9 and run_json["qat"]["epochs"] == 1
    assert (out / "model.safetensors").stat().st_size / 1e6 < run_json["file_mb_before"]

    clf = Classifier.from_pretrained(out)
    assert type(clf.model.backbone.layers[0].ffn.up) is Int8Linear and type(clf.model.head.out) is nn.Linear
    texts = [e.text for e in read_labelled(str(dev), Columns())]
    expected = clf.predict(texts)
    r = run("predict", "--model", str(out), "--input", str(dev))
    assert r.returncode == 0, r.stderr
    got = [json.loads(line) for line in r.stdout.splitlines()]
    assert [p["label"] for p in got] == [p["label"] for p in expected]
    assert max(abs(p["score"] - e["score"]) for p, e in zip(got, expected)) < 1e-6
    r = run("evaluate", "--model", str(out), "--data", str(dev), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["accuracy"] == pytest.approx(run_json["metrics"]["accuracy"])


def test_quantize_prints_a_tiny_models_sizes_in_kb(tiny_hf_dir, tmp_path, capsys):
    """Sizes printed with one decimal in MB read 0.1 MB -> 0.0 MB for a tiny model; run.json's file_mb_before
    stays a number of MB, to the byte (it was rounded to 10 kB)."""
    src, out = tiny_hf_dir("bert")[0], tmp_path / "q"
    assert main(["quantize", "--model", str(src), "--output", str(out), "--no-progress"]) == 0
    before, after = ((d / "model.safetensors").stat().st_size / 1e6 for d in (src, out))
    assert f"weights: {before * 1e3:.3g} kB -> {after * 1e3:.3g} kB\n" in capsys.readouterr().out
    assert json.loads((out / "run.json").read_text())["file_mb_before"] == pytest.approx(before)
    card = (out / "README.md").read_text()  # (without --eval: no metrics table of a header and no rows)
    assert "| metric |" not in card and "Not evaluated (no evaluation file was given)" in card


def test_cli_weight_bits_choose_the_codes_saved_and_recorded(tiny_hf_dir, tmp_path, capsys):
    """--weight-bits 7 saves Linear weights within +-63 (what oneDNN computes exactly without VNNI) and 8 the full
    +-127, both recorded, printed and in the card, and reloaded the same; embeddings stay 8-bit; without the
    option, this CPU's default (int8_ops.WEIGHT_BITS); any other number is refused, naming the option."""
    from safetensors.torch import load_file

    src = tiny_hf_dir("bert")[0]
    for bits, m in ((7, 63), (8, 127), (None, int8_ops.max_code(int8_ops.WEIGHT_BITS))):
        out = tmp_path / f"q{bits}"
        assert main(["quantize", "--model", str(src), "--output", str(out), "--no-progress",
                     *(["--weight-bits", str(bits)] if bits else [])]) == 0
        shown_bits = bits or int8_ops.WEIGHT_BITS
        assert f"{shown_bits}-bit weight codes" in capsys.readouterr().out
        w = load_file(str(out / "model.safetensors"))
        linear = [k for k in w if k.endswith("qkv.weight") or k.endswith("up.weight")]
        assert linear and all(w[k].abs().max() == m for k in linear)
        emb = next(k for k in w if k.endswith("word_embeddings.weight") or k.endswith("embed.word.weight"))
        assert w[emb].dtype == torch.int8 and w[emb].abs().max() == 127
        record = json.loads((out / "config.json").read_text())["oztune"]["quantization"]
        assert record["weight_bits"] == shown_bits and f"within +-{m}," in record["weights"]
        assert f"weights in {shown_bits}-bit codes" in (out / "README.md").read_text()
        clf = Classifier.from_pretrained(out)
        assert clf.model.backbone.layers[0].attn.qkv.weight.abs().max() == m
    r = run("quantize", "--model", str(src), "--output", str(tmp_path / "bad"), "--weight-bits", "6")
    assert r.returncode == 2 and "--weight-bits must be one of 8, 7, not 6" in r.stderr
    assert not (tmp_path / "bad").exists()


def test_in_memory_quantized_model_predicts_like_the_saved_one(finetuned, sentiment_files, tmp_path):
    _, dev = sentiment_files
    model, enc, meta = load_classifier(finetuned)
    quantize_(model, QuantConfig())
    texts = [e.text for e in read_labelled(str(dev), Columns())]
    in_memory = Classifier(model, enc, meta["id2label"]).logits(texts)
    assert main(["quantize", "--model", str(finetuned), "--output", str(tmp_path / "q"), "--no-progress"]) == 0
    assert (Classifier.from_pretrained(tmp_path / "q").logits(texts) == in_memory).all()


BAD = [
    (["quantize", "--model", "{base}", "--output", "{tmp}/o"], "not a fine-tuned classifier"),
    (["quantize", "--model", "{tmp}/plain", "--output", "{tmp}/o"], "not a model directory"),
    (["quantize", "--output", "{tmp}/o"], "--model is required"),
    (["quantize", "--model", "{ft}"], "--output is required"),
    (["quantize", "--model", "{ft}", "--output", "{tmp}/o", "--skip", "layers.7.*"], "'layers.7.*' matches no module"),
    (["quantize", "--model", "{ft}", "--output", "{tmp}/o", "--scheme", "int4"], "scheme must be one of int8"),
    (["quantize", "--model", "{ft}", "--output", "{tmp}/o", "--qat-lr", "0"], "--qat-lr must be a positive, finite number"),
    (["quantize", "--model", "{ft}", "--output", "{tmp}/o", "--max-train-examples", "0"],
     "--max-train-examples must be at least 1"),
    (["quantize", "--model", "{ft}", "--output", "{tmp}/o", "--max-train-examples", "8"],
     "--max-train-examples samples --qat-train's examples; give --qat-train FILE too"),
    (["quantize", "--model", "{ft}", "--output", "{tmp}/o", "--qat-epochs", "3"],
     "--qat-epochs is for quantization-aware fine-tuning, which runs only with --qat-train; give --qat-train FILE too"),
    (["quantize", "--model", "{ft}", "--output", "{tmp}/o", "--qat-epochs", "1"],  # its default, given: refused too
     "--qat-epochs is for quantization-aware fine-tuning"),
    (["quantize", "--model", "{ft}", "--output", "{tmp}/o", "--qat-lr", "1e-4"],
     "--qat-lr is for quantization-aware fine-tuning, which runs only with --qat-train; give --qat-train FILE too"),
    (["quantize", "--model", "{ft}", "--output", "{tmp}/o", "--qat-lr", "2e-5"], "--qat-lr is for quantization-aware"),
]


@pytest.mark.parametrize("argv,message", BAD)
def test_bad_input_exits_2_with_one_line(argv, message, finetuned, tiny_base, tmp_path, capsys):
    fill = {"base": str(tiny_base), "tmp": str(tmp_path), "ft": str(finetuned)}
    (tmp_path / "plain").mkdir()  # a directory, not a model
    assert main([a.format(**fill) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_qat_on_a_seeded_sample_of_the_train_file(finetuned, sentiment_files, tmp_path):
    from oztune.compress.args import QuantizeArgs
    from oztune.compress.quantize_recipe import run_quantize
    from oztune.train.finetune import sample

    train, _ = sentiment_files
    run = run_quantize(QuantizeArgs(model=str(finetuned), output=str(tmp_path / "q"), qat_train=str(train),
                                    max_train_examples=37, seed=5, progress=False))
    assert run["qat"]["examples"] == 37
    assert (run["qat"]["epochs"], run["qat"]["lr"]) == (1, 2e-5)  # the defaults, when not given
    texts = [e.text for e in read_labelled(str(train), Columns())]
    assert sample(texts, 37, 5) != sample(texts, 37, 6)  # the sample depends on --seed
    assert len(sample(texts, 10_000, 5)) == len(texts)


def test_an_already_quantized_model_is_refused(finetuned, tmp_path, capsys):
    assert main(["quantize", "--model", str(finetuned), "--output", str(tmp_path / "q"), "--no-progress"]) == 0
    assert main(["quantize", "--model", str(tmp_path / "q"), "--output", str(tmp_path / "o")]) == 2
    assert "already quantized" in capsys.readouterr().err


def test_per_channel_weights_use_the_full_int8_range():
    torch.manual_seed(0)
    w = torch.randn(6, 40)
    w[2] = 0.0  # an all-zero row stays zero
    wq, scale = int8_ops.quantize_per_channel(w)
    amax = wq.abs().amax(-1)
    assert amax.tolist() == [127, 127, 0, 127, 127, 127]
    assert (scale > 0).all()  # the zero row's too: its codes are 0 / scale, not 0 / 0
    torch.testing.assert_close(scale[[0, 1, 3]], w[[0, 1, 3]].abs().amax(-1) / 127)
    assert (wq.float() * scale[:, None] - w).abs().max() <= scale.max() / 2 + 1e-6  # rounded, not truncated


def test_loading_other_weights_into_a_quantized_model_repacks_them():
    a, b = (quantize_(tiny_classifier(seed), QuantConfig()) for seed in (0, 1))
    ids, mask = random_batch(n=64, T=20)  # ~600 real tokens: the oneDNN path with a packed weight
    with torch.no_grad():
        a(ids, mask)  # packs a's weights
        a.load_state_dict(b.state_dict())  # copied into the same tensors
        torch.testing.assert_close(a(ids, mask), b(ids, mask), atol=0, rtol=0)


def test_fake_quantization_matches_the_int8_model_it_trains_for():
    """QAT's forward is the int8 layer's numbers: per-row weight grid, per-token activation grid."""
    w = torch.tensor([[1.0, 0.01], [100.0, 50.0]])
    wq, scale = int8_ops.quantize_per_channel(w)
    torch.testing.assert_close(int8_ops.fake_quantize_per_channel(w), wq.float() * scale[:, None])
    # row 0 on its own grid (step 1/127): a per-tensor grid (step 100/127) would round 0.01 to 0 and 1.0 to 0.79
    torch.testing.assert_close(int8_ops.fake_quantize_per_channel(w)[0], torch.tensor([1.0, 1 / 127]))
    torch.manual_seed(0)
    linear = nn.Linear(16, 8)
    fq = FakeQuantLinear.from_linear(linear)
    q = Int8Linear.from_linear(linear)
    x = torch.randn(5, 16)
    with torch.no_grad():
        want = nn.functional.linear(int8_ops.fake_quantize_per_token(x), q.dequantized_weight(), linear.bias)
        torch.testing.assert_close(fq(x), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(q(x), want, atol=1e-3, rtol=1e-3)  # the int8 kernel: the same up to rounding
        assert (fq(x) - linear(x)).abs().max() > 1e-4  # and not simply the fp32 layer


@pytest.mark.parametrize("M", [7, 300])  # torch._int_mm below ONEDNN_MIN_ROWS rows, oneDNN from there on
def test_fake_quantization_from_a_floor_matches_int8_without_a_given_top(M):
    """Without ``top`` both grids span [lower, max x] per row: QAT's defaulted to max(max x, 0), int8's to max x,
    which differ for a row whose values are all below 0 (row 1: GELU of negative inputs)."""
    torch.manual_seed(0)
    linear = nn.Linear(96, 40)
    fq, q = FakeQuantLinear.from_linear(linear), Int8Linear.from_linear(linear)
    x = nn.functional.gelu(torch.randn(M, 96) * 3)
    x[1] = nn.functional.gelu(-0.4 - 1.5 * torch.rand(96))  # in [-0.17, -0.05]
    lower = -quantize.ACT_FLOORS["gelu"]
    assert (x[1] < 0).all() and (x.amax(-1) > 0).sum() == M - 1
    with torch.no_grad():
        want = nn.functional.linear(int8_ops.fake_quantize_from_floor(x, lower), q.dequantized_weight(), linear.bias)
        torch.testing.assert_close(q(x, None, lower), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fq(x, None, lower), want, atol=1e-5, rtol=1e-5)
        top = x.amax(-1, keepdim=True)  # the default: each row's own max
        torch.testing.assert_close(int8_ops.fake_quantize_from_floor(x, lower), int8_ops.fake_quantize_from_floor(x, lower, top))


@pytest.mark.parametrize("record", [None, QuantConfig(), QuantConfig(embeddings="none", skip=["head.*"])],
                         ids=["no-record", "other-skip", "other-embeddings"])
def test_saving_an_int8_model_with_a_record_that_does_not_rebuild_it_is_refused(record, tmp_path, tiny_base):
    """save_classifier(int8 model, ...) without quantization= (or with another config's record) wrote a directory
    that load_classifier refuses ('weights do not match config.json (unexpected: ...weight_scale)')."""
    q = quantize_(tiny_classifier(), QuantConfig(skip=["backbone.layers.1.*"]))
    with pytest.raises(OztuneError, match="quantiz"):
        save_tiny(q, tmp_path / "m", record, tiny_base)
    assert not (tmp_path / "m").exists()
    with pytest.raises(OztuneError, match="int8"):  # and a record for a model that holds no int8 layer
        save_tiny(tiny_classifier(), tmp_path / "f", QuantConfig(), tiny_base)
    d = save_tiny(q, tmp_path / "ok", QuantConfig(skip=["backbone.layers.1.*"]), tiny_base)  # the right one
    ids, mask = random_batch()
    with torch.no_grad():
        assert torch.equal(load_classifier(d)[0](ids, mask), q(ids, mask))


@pytest.mark.parametrize("config", [QuantConfig(), QuantConfig(embeddings="none", skip=["head.*"])])
def test_saving_a_qat_model_before_quantize_is_refused(config, tmp_path, tiny_base):
    """save_classifier of a prepare_qat_ model (no quantize_) wrote its fake-quantized layers as plain fp32 ones:
    the directory reloaded as an fp32 model whose logits differed from the in-memory model's, silently."""
    model = prepare_qat_(tiny_classifier(), config)
    for record in (None, config):
        with pytest.raises(OztuneError, match=r"prepare_qat_.*quantize_"):
            save_tiny(model, tmp_path / "m", record, tiny_base)
        assert not (tmp_path / "m").exists()
    ids, mask = random_batch()
    with torch.no_grad():
        want = quantize_(model, config)(ids, mask)  # converted, it saves and reloads as it runs
        d = save_tiny(model, tmp_path / "ok", config, tiny_base)
        assert torch.equal(load_classifier(d)[0](ids, mask), want)


@pytest.mark.parametrize("convert", [lambda m: m.half(), lambda m: m.to(torch.bfloat16), lambda m: m.double(),
                                     lambda m: m.to("cpu", torch.float16)], ids=["half", "bf16", "double", "to-both"])
@pytest.mark.parametrize("config", [QuantConfig(), QuantConfig(embeddings="none", skip=["head.*"])],
                         ids=["all", "linears-only"])
def test_converting_an_int8_model_out_of_fp32_says_it_runs_in_fp32(convert, config):
    """.half() / .to(torch.bfloat16) of an int8 model converted its LayerNorms but not what its int8 layers give
    (fp32): the next forward failed deep inside LayerNorm ("mixed dtype (CPU): expect parameter to have scalar
    type of Float"). Refused at conversion time, the model left as it was (the forward pass checks nothing)."""
    q = quantize_(tiny_classifier(), config)
    ids, mask = random_batch(n=6)
    with torch.no_grad():
        want = q(ids, mask)
        with pytest.raises(TypeError, match="int8-quantized model runs in fp32"):
            convert(q)
        assert all(t.dtype in (torch.float32, torch.int8) for t in [*q.parameters(), *q.buffers()])
        assert torch.equal(q(ids, mask), want)
        for kind in (Int8Linear, Int8Embedding):  # a layer on its own too
            for layer in [m for m in q.modules() if isinstance(m, kind)][:1]:
                with pytest.raises(TypeError, match="runs in fp32"):
                    convert(layer)
        assert torch.equal(q.float().to("cpu")(ids, mask), want)  # what keeps fp32 is no conversion
        assert tiny_classifier().half().backbone.embed.word.weight.dtype == torch.float16  # an fp32 model converts


def test_fit_of_an_int8_model_says_so():
    """fit(int8 model) raised "addcmul(): functions with out=... arguments don't support automatic
    differentiation" from inside the first step (distill and prune_ name the int8 model)."""
    q = quantize_(tiny_classifier(), QuantConfig())
    ids, mask = random_batch(n=8)
    data = EncodedData([(row[m.bool()].tolist(), [0] * int(m.sum())) for row, m in zip(ids, mask)],
                       torch.arange(8) % 3, 0)
    with pytest.raises(OztuneError, match="int8"):
        fit(q, data, TrainConfig(epochs=1, batch_size=4, progress=False, precision="fp32"))
    assert not q.training


def test_quantizing_or_preparing_qat_of_an_int8_model_says_it_is_int8():
    """quantize_ twice said "nothing to quantize: the skip patterns (none) keep every Linear layer in fp32";
    prepare_qat_ of an int8 model silently did nothing (no layer fake-quantized) and returned it."""
    q = quantize_(tiny_classifier(), QuantConfig())
    with pytest.raises(OztuneError, match="already int8"):
        quantize_(q, QuantConfig())
    with pytest.raises(OztuneError, match="already int8"):
        prepare_qat_(q)
    partly = quantize_(tiny_classifier(), QuantConfig(skip=["head.*"]))  # (what is left in fp32 still converts)
    assert type(quantize_(partly, QuantConfig()).head.out) is Int8Linear


def test_without_an_exact_onednn_kernel_every_size_runs_an_fp32_matmul_of_the_codes(monkeypatch):
    """Where oneDNN's kernel is missing or saturates (HAS_ONEDNN False: no VNNI), torch._int_mm is a reference loop
    too (3 GOP/s on an AVX2 EPYC, 30x slower than fp32 matmul): the packed weight is then the weight's codes as
    fp32, and every size, few rows or many, symmetric or from a floor, runs an fp32 matmul of the codes, computing
    what torch._int_mm does."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 40)
    x = torch.randn(int8_ops.ONEDNN_MIN_ROWS + 44, 64)
    h = x.clamp_min(-0.17)
    top = h.amax(-1, keepdim=True)

    def run(q):
        return q(x), q(h, top, -0.1701), q(x[:3]), q(h[:3], top[:3], -0.1701)

    def no_int_mm(*args):
        raise AssertionError("torch._int_mm called")

    with torch.no_grad():
        monkeypatch.setattr(int8_ops, "HAS_ONEDNN", False)
        q = Int8Linear.from_linear(lin)
        with monkeypatch.context() as m:
            m.setattr(torch, "_int_mm", no_int_mm)
            got = run(q)
        assert torch.equal(q.packed_weight(), q.weight.float())
        monkeypatch.setattr(int8_ops, "HAS_ONEDNN", True)  # the reference: torch._int_mm at every size
        monkeypatch.setattr(int8_ops, "pack_weight", lambda wq: None)
        expected = run(Int8Linear.from_linear(lin))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["half", "bf16"])
@pytest.mark.parametrize("prepare", [quantize_, prepare_qat_], ids=["quantize_", "prepare_qat_"])
def test_quantizing_a_model_that_is_not_fp32_says_float_it_first(prepare, dtype):
    """quantize_ / prepare_qat_ of a .half() or .to(torch.bfloat16) model converted it, and the next forward
    failed inside LayerNorm ("mixed dtype (CPU): expect parameter to have scalar type of Float"): the layers
    they swap in give fp32. Refused before anything changes; the model, .float()ed, then converts."""
    model = tiny_classifier().to(dtype)
    ids, mask = random_batch(n=6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kinds = [type(m) for m in model.modules()]
    with torch.no_grad():
        want = model(ids, mask)
        with pytest.raises(TypeError, match=rf"{prepare.__name__} takes an fp32 model .*{dtype} weights "
                                            r"\(e\.g\. backbone\..*\): \.float\(\) it first"):
            prepare(model, QuantConfig())
        assert [type(m) for m in model.modules()] == kinds
        assert model.state_dict().keys() == before.keys()
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        assert torch.equal(model(ids, mask), want)
        assert prepare(model.float(), QuantConfig())(ids, mask).dtype == torch.float32


@pytest.mark.parametrize("code", [127, 63])
def test_many_rows_of_the_largest_codes_are_exact(code):
    """On a CPU without VNNI (AVX2) oneDNN's u8 x s8 kernel sums pairs of products in int16, which saturates for
    large codes (255 * 127 * 2 > 32767): from ONEDNN_MIN_ROWS rows on, outputs were off by up to half. oneDNN is
    used only where it computes these exactly (HAS_ONEDNN; or ONEDNN_7BIT and 7-bit weights, +-63: 255 * 63 * 2 =
    32130), else an exact kernel: the sums of the largest codes, from many rows and few, symmetric or from a floor."""
    q = Int8Linear(64, 2, bias=False)
    q.weight[0], q.weight[1] = code, -code  # scales 1: outputs are the int32 sums themselves
    q.sum_weights()
    x = torch.full((int8_ops.ONEDNN_MIN_ROWS + 4, 64), 3.0)  # every code 127 (u8 255 for oneDNN)
    x[1::2, :32] = -3.0
    want = torch.tensor([[64 * 127.0 * code, -64 * 127.0 * code], [0.0, 0.0]]).repeat(x.shape[0] // 2, 1) * 3 / 127
    with torch.no_grad():
        torch.testing.assert_close(q(x), want)
        torch.testing.assert_close(q(x[:5]), want[:5])  # few rows: torch._int_mm, or this CPU's kernel for all
        h = x.clamp_min(0)  # from a floor of 0 (ReLU's): codes 255 over [0, 3]
        want = torch.tensor([[64 * 3.0 * code, -64 * 3.0 * code], [32 * 3.0 * code, -32 * 3.0 * code]])
        torch.testing.assert_close(q(h, None, 0.0), want.repeat(h.shape[0] // 2, 1))


def test_onednn_is_not_used_where_its_kernel_saturates(monkeypatch):
    """HAS_ONEDNN is False where oneDNN's kernel is there but saturates (no VNNI), so torch._int_mm runs."""
    real = torch.ops.onednn.qlinear_pointwise

    def saturating(u8, *args):  # int16 sums of pairs of products, as vpmaddubsw on AVX2
        return real(u8.clamp_max(128), *args)  # (the largest codes come out wrong, as they did)

    monkeypatch.setattr(torch.ops.onednn, "qlinear_pointwise", saturating)
    assert not int8_ops._onednn_exact(127)


def vpmaddubsw_kernel(monkeypatch):
    """oneDNN's int8 linear as a CPU without VNNI computes it: u8 x s8 products summed in pairs in int16, which
    saturates (the prepacked weights are recorded to compute with)."""
    real_prepack, weights = torch.ops.onednn.qlinear_prepack, {}

    def prepack(wq, shape):
        packed = real_prepack(wq, shape)
        weights[id(packed)] = wq
        return packed

    def pointwise(u8, x_scale, x_zp, packed, w_scale, w_zp, bias, *args):
        u, w = u8.long(), weights[id(packed)].long()  # (M, K), (N, K); K even here
        pairs = u[:, None, 0::2] * w[None, :, 0::2] + u[:, None, 1::2] * w[None, :, 1::2]  # (M, N, K/2)
        acc = pairs.clamp(-32768, 32767).sum(-1) - x_zp * w.sum(1)
        return (acc.float() * x_scale * w_scale + (0 if bias is None else bias)).float()

    monkeypatch.setattr(torch.ops.onednn, "qlinear_prepack", prepack)
    monkeypatch.setattr(torch.ops.onednn, "qlinear_pointwise", pointwise)


def test_the_probe_finds_a_kernel_exact_only_for_7_bit_weights(monkeypatch):
    """Without VNNI oneDNN's kernel saturates for 8-bit weight codes (255 * 127 * 2 > 32767) but not for 7-bit
    ones (255 * 63 * 2 = 32130): the probe tells them apart, and on such a CPU quantize_ makes 7-bit weights."""
    vpmaddubsw_kernel(monkeypatch)
    assert not int8_ops._onednn_exact(127) and int8_ops._onednn_exact(63) and not int8_ops._onednn_exact(65)
    assert int8_ops.WEIGHT_BITS == (7 if int8_ops.ONEDNN_7BIT else 8) == QuantConfig().weight_bits
    assert not (int8_ops.HAS_ONEDNN and int8_ops.ONEDNN_7BIT)


@pytest.mark.parametrize("floor", [None, 0.1701])
@pytest.mark.parametrize("M", [3, int8_ops.ONEDNN_MIN_ROWS + 44])
def test_7_bit_weights_run_onednn_at_every_size_where_only_they_are_exact(monkeypatch, M, floor):
    """On a CPU without VNNI (HAS_ONEDNN False, ONEDNN_7BIT True) a weight of 7-bit codes is packed for oneDNN and
    every size runs its kernel (torch._int_mm is a reference loop there), computing what torch._int_mm does, up to
    the int8 largest codes; a weight with a code beyond +-63 (quantized 8-bit) runs an fp32 matmul of the codes."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 40)
    x = torch.randn(M, 64) * 3
    h = x.clamp_min(-0.17)
    lower = None if floor is None else -floor
    xin, top = (x, None) if floor is None else (h, h.amax(-1, keepdim=True))
    with torch.no_grad():
        monkeypatch.setattr(int8_ops, "HAS_ONEDNN", True)  # the reference: torch._int_mm at every size
        monkeypatch.setattr(int8_ops, "pack_weight", lambda wq: None)
        want = Int8Linear.from_linear(lin, 7)(xin, top, lower)
        monkeypatch.undo()
        monkeypatch.setattr(int8_ops, "HAS_ONEDNN", False)
        monkeypatch.setattr(int8_ops, "ONEDNN_7BIT", True)
        q = Int8Linear.from_linear(lin, 7)
        assert q.weight.abs().max() == 63
        with monkeypatch.context() as m:
            m.setattr(torch, "_int_mm", lambda *a: pytest.fail("torch._int_mm called"))
            torch.testing.assert_close(q(xin, top, lower), want, atol=1e-5, rtol=1e-5)
        packed = q.packed_weight()
        assert packed.dtype == torch.int8 and packed.is_mkldnn
        for code in (64, -64):  # one code out of 7 bits, either sign: the fp32 matmul of the codes
            wide = Int8Linear.from_linear(lin, 7)
            wide.weight[3, 5] = code
            assert torch.equal(wide.packed_weight(), wide.weight.float())


def test_the_graph_op_packs_each_weight_once_again_after_a_change_and_forgets_it_with_the_weight(monkeypatch):
    """oztune::onednn_int8_mm (what compiled graphs call on a CPU without VNNI) computes ((u8 - zp) @ wq.T) * scale
    exactly, packs a weight on its first call only, again after the weight changes in place, and drops its pack
    when the weight is gone."""
    import gc

    torch.manual_seed(0)
    wq, w_scale = torch.randint(-63, 64, (40, 64), dtype=torch.int8), torch.rand(40) + 0.5
    u8 = torch.randint(0, 256, (7, 64), dtype=torch.uint8)
    packs = []
    real = torch.ops.onednn.qlinear_prepack
    monkeypatch.setattr(torch.ops.onednn, "qlinear_prepack", lambda w, s: packs.append(1) or real(w, s))

    def want(zp, wq):
        return ((u8.double() - zp) @ wq.double().t() * w_scale.double()).float()

    for zp in (128, 0):
        torch.testing.assert_close(torch.ops.oztune.onednn_int8_mm(u8, zp, wq, w_scale), want(zp, wq))
    assert len(packs) == 1
    wq[0] = -wq[0]  # changed in place: packed again, and the result is the new weight's
    torch.testing.assert_close(torch.ops.oztune.onednn_int8_mm(u8, 128, wq, w_scale), want(128, wq))
    assert len(packs) == 2
    key = wq.data_ptr()
    assert key in int8_ops._PACKS
    del wq
    gc.collect()
    assert key not in int8_ops._PACKS


@pytest.mark.parametrize("bits", [7, 8])
def test_compiled_int8_calls_onednn_where_the_weights_fit_and_exports_without_it(monkeypatch, bits):
    """Compiled on a CPU without VNNI (HAS_ONEDNN False, ONEDNN_7BIT True), a 7-bit weight runs oneDNN's kernel
    through oztune::onednn_int8_mm (it ran an fp32 matmul of the codes, converting the weight on every call),
    an 8-bit one the fp32 matmul; both compute what eager does, symmetric and from a floor. torch.export (the
    ahead-of-time packages, which cannot call a Python op) keeps the fp32 matmul."""
    monkeypatch.setattr(int8_ops, "HAS_ONEDNN", False)
    monkeypatch.setattr(int8_ops, "ONEDNN_7BIT", True)
    torch.manual_seed(0)
    q = Int8Linear.from_linear(nn.Linear(64, 40), bits)
    assert q.fits_onednn is (bits == 7)
    x = torch.randn(9, 64) * 3
    h, top = x.clamp_min(-0.17), None
    with torch.no_grad():
        want = q(x), q(h, top, -0.1701)
    calls = []
    real = int8_ops.packed_weight
    monkeypatch.setattr(int8_ops, "packed_weight", lambda wq: calls.append(1) or real(wq))
    torch._dynamo.reset()
    compiled = torch.compile(q, backend="aot_eager", dynamic=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), want[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(compiled(h, top, -0.1701), want[1], atol=1e-5, rtol=1e-5)
    assert len(calls) == (2 if bits == 7 else 0)
    exported = torch.export.export(q, (x,))
    assert not any("onednn_int8_mm" in str(n.target) for n in exported.graph.nodes)
    torch.testing.assert_close(exported.module()(x), q(x), atol=1e-5, rtol=1e-5)


def test_7_bit_weights_clip_each_row_where_that_reconstructs_it_better():
    """quantize_per_channel(w, 7): codes within +-63; rows of heavy-tailed values (as trained weights are) are
    clipped (a scale below max/63, the largest values' codes clamped at 63) because that reconstructs them with
    less squared error, and no row is reconstructed worse than with the full range. 8-bit weights keep the full
    range."""
    torch.manual_seed(0)
    w = torch.distributions.Laplace(0.0, 0.05).sample((3, 4096))
    w[2, :64] = torch.linspace(-1, 1, 64)  # a short row of evenly spread values: clipping gains next to nothing
    w[2, 64:] = 0
    wq, scale = quantize_per_channel(w, 7)
    assert wq.abs().max() <= 63 and wq.dtype == torch.int8
    full = w.abs().amax(-1) / 63
    assert (scale[:2] < 0.97 * full[:2]).all() and scale[2] >= 0.98 * full[2]

    def err(codes, s):
        return ((codes.float() * s[:, None] - w) ** 2).sum(-1)

    full_err = err(torch.round(w / full[:, None]).clamp(-63, 63), full)
    assert (err(wq, scale) <= full_err).all() and (err(wq, scale)[:2] < 0.95 * full_err[:2]).all()
    torch.testing.assert_close(quantize_per_channel(w)[1], w.abs().amax(-1) / 127)


def test_weight_bits_must_be_8_or_7():
    for bad in (6, 9, "7", True, 7.5, 7.0):
        with pytest.raises(OztuneError, match="weight_bits must be 8 or 7"):
            QuantConfig(weight_bits=bad)
    assert QuantConfig(weight_bits=7).weight_bits == 7 and QuantConfig.from_dict({"weight_bits": 8}).weight_bits == 8
    record = quantization_record(QuantConfig(weight_bits=7))
    assert record["weight_bits"] == 7 and "within +-63" in record["weights"]


def test_empty_skip_patterns_are_dropped():
    """The CLI's comma-separated --skip with a trailing comma or blanks ("head.*, ,"): the empty patterns, which
    match no module and were refused by quantize_, are dropped."""
    config = QuantConfig(skip="head.*, ,")
    assert config.skip == ["head.*"] and QuantConfig(skip=["", " backbone.layers.0.* "]).skip == ["backbone.layers.0.*"]
    model = quantize_(tiny_classifier(), config)
    assert type(model.head.out) is nn.Linear and type(model.backbone.layers[0].ffn.up) is Int8Linear


def test_a_record_that_does_not_describe_the_model_names_a_layer_it_gets_wrong():
    """check_record's message names a layer the record gets wrong, and which way: int8 in the model and not in
    the record, or the other way round."""
    q = quantize_(tiny_classifier(), QuantConfig(skip=["backbone.layers.1.*"]))
    with pytest.raises(OztuneError, match=r"\(backbone\.layers\.1\.\S+ is not int8\)"):  # the record converts it
        quantize.check_record(q, quantization_record(QuantConfig()))
    with pytest.raises(OztuneError, match=r"\(backbone\.embed\.\S+ is int8\)"):  # the record keeps it in fp32
        quantize.check_record(q, quantization_record(QuantConfig(embeddings="none", skip=["backbone.layers.1.*"])))
    with pytest.raises(OztuneError, match=r"is not int8: it holds no int8 layer\)"):
        quantize.check_record(tiny_classifier(), quantization_record(QuantConfig()))
    quantize.check_record(q, quantization_record(QuantConfig(skip=["backbone.layers.1.*"])))  # the right one


def test_qat_keeps_the_padding_row_out_of_training():
    """FakeQuantEmbedding keeps an embedding's padding_idx (quantize_ takes any module's): the pad row gets no
    gradient, as in fp32 training."""
    word = nn.Embedding(10, 4, padding_idx=0)
    fq = quantize.FakeQuantEmbedding.from_embedding(word)
    assert fq.padding_idx == 0
    fq(torch.tensor([0, 5])).sum().backward()
    assert not word.weight.grad[0].any() and word.weight.grad[5].any()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_int8_linear_takes_inputs_of_other_float_dtypes_as_fp32(dtype):
    torch.manual_seed(0)
    q = Int8Linear.from_linear(nn.Linear(16, 8))
    x = torch.randn(5, 16).to(dtype)
    with torch.no_grad():
        torch.testing.assert_close(q(x), q(x.float()))


def test_a_skip_pattern_matching_nothing_is_refused_beside_one_that_matches():
    with pytest.raises(OztuneError, match=r"skip pattern 'heads\.\*' matches no module"):
        quantize_(tiny_classifier(), QuantConfig(skip=["backbone.layers.0.*", "heads.*"]))


def test_7_bit_weights_take_each_rows_best_clipping_and_the_widest_where_tied():
    """quantize_per_channel(w, 7) scales each row by (max |w| / 63) * r for the r among 1.00, 0.99, ..., 0.70 whose
    clamped codes reconstruct the row with the least squared error, the widest where tied: checked against every
    ratio directly, on rows whose best ratio varies (1.00 and 0.99 among them), and an all-zero row (every ratio
    ties: scale 1, as with 8-bit codes)."""
    torch.manual_seed(0)
    ratios = [1 - i / 100 for i in range(31)]
    bests = set()
    for w in (torch.cat([torch.randn(16, 64), torch.rand(16, 64) - 0.5, torch.zeros(1, 64)]),
              torch.distributions.Laplace(0.0, 1.0).sample((16, 1024))):
        amax = w.abs().amax(-1)
        full = torch.where(amax > 0, amax / 63, torch.ones_like(amax))
        errs = torch.stack([((w / (full * r)[:, None]).round().clamp(-63, 63) * (full * r)[:, None] - w).square()
                            .sum(-1) for r in ratios], 1)  # (N, 31)
        best = errs.argmin(1)  # (the first, widest, where tied)
        bests |= set(best.tolist())
        wq, scale = quantize_per_channel(w, 7)
        torch.testing.assert_close(scale, full * torch.tensor(ratios)[best])
        torch.testing.assert_close(((wq.float() * scale[:, None] - w) ** 2).sum(-1), errs.min(1).values)
    assert {0, 1} < bests  # rows best unclipped, best at 0.99, and others
    assert quantize_per_channel(torch.zeros(2, 8), 7)[1].tolist() == [1.0, 1.0]


def test_fake_quantization_from_a_floor_rounds_half_steps_as_int8_does():
    """fake_quantize_from_floor computes the codes in int8_linear_from_floor's order, x / scale + (-lower / scale -
    128): values half a step between two codes (every one of 255 steps, on four grids) round as the int8 layer
    rounds them. ((x - lower) / scale, the same in exact arithmetic, rounds many of them the other way: a step.)"""
    lower, top = -0.1701, torch.tensor([[3.0], [1.7], [0.9], [5.3]])
    scale = (top - lower) / 255
    x = torch.cat([lower + (torch.arange(255.0) + 0.5) * scale, top], 1)  # (4, 256)
    q = Int8Linear(256, 256, bias=False)  # the identity: its outputs are the inputs as the int8 kernel codes them
    q.weight.copy_(torch.eye(256, dtype=torch.int8))
    q.weight_scale.fill_(1.0)
    q.sum_weights()
    with torch.no_grad():
        torch.testing.assert_close(int8_ops.fake_quantize_from_floor(x, lower, top), q(x, top, lower),
                                   atol=1e-5, rtol=0)


def test_an_empty_weight_fits_onednn_where_7_bit_codes_do(monkeypatch):
    """fits_onednn of a weight with no codes (a layer of no inputs or no outputs) is True on a CPU without VNNI
    (no code is beyond +-63; min/max of an empty tensor would raise), as for every weight where HAS_ONEDNN."""
    monkeypatch.setattr(int8_ops, "HAS_ONEDNN", False)
    monkeypatch.setattr(int8_ops, "ONEDNN_7BIT", True)
    for shape in ((0, 8), (4, 0)):
        assert int8_ops.fits_onednn(torch.zeros(shape, dtype=torch.int8))
        assert Int8Linear(shape[1], shape[0]).fits_onednn
    assert not int8_ops.fits_onednn(torch.full((2, 2), 64, dtype=torch.int8))
    monkeypatch.setattr(int8_ops, "ONEDNN_7BIT", False)
    assert not int8_ops.fits_onednn(torch.zeros(0, 8, dtype=torch.int8))


def test_preparing_qat_again_with_other_weight_bits_fake_quantizes_to_them():
    """prepare_qat_ of a model already prepared (its FakeQuantLinear layers kept, not wrapped again) with another
    weight_bits: every layer then simulates the new codes, as quantize_ with that config will make them. A
    FakeQuantLinear made otherwise simulates 8-bit codes, as Int8Linear.from_linear makes by default."""
    model = prepare_qat_(tiny_classifier(), QuantConfig(weight_bits=8))
    prepare_qat_(model, QuantConfig(weight_bits=7))
    layers = [m for m in model.modules() if type(m) is FakeQuantLinear]
    assert layers and all(m.bits == 7 for m in layers)
    x = torch.randn(5, 32)
    with torch.no_grad():
        want = nn.functional.linear(int8_ops.fake_quantize_per_token(x),
                                    Int8Linear.from_linear(model.head.out, 7).dequantized_weight(), model.head.out.bias)
        torch.testing.assert_close(model.head.out(x), want, atol=1e-5, rtol=1e-5)
    assert FakeQuantLinear(4, 2).bits == 8 == FakeQuantLinear.from_linear(nn.Linear(4, 2)).bits  # as Int8Linear's


def test_with_an_exact_onednn_kernel_few_rows_run_torch_int_mm_and_many_rows_onednn(monkeypatch):
    """Where oneDNN's kernel is exact for every weight (HAS_ONEDNN: VNNI), eager below ONEDNN_MIN_ROWS rows runs
    torch._int_mm and never packs the weight (oneDNN's kernel costs more per call there); from there on it packs the
    weight once and runs oneDNN's kernel, not torch._int_mm."""
    monkeypatch.setattr(int8_ops, "HAS_ONEDNN", True)
    torch.manual_seed(0)
    q = Int8Linear.from_linear(nn.Linear(64, 40))
    packs, int_mms = [], []
    real_pack, real_int_mm = int8_ops.pack_weight, torch._int_mm
    monkeypatch.setattr(int8_ops, "pack_weight", lambda wq: packs.append(1) or real_pack(wq))
    monkeypatch.setattr(torch, "_int_mm", lambda *a: int_mms.append(1) or real_int_mm(*a))
    x = torch.randn(int8_ops.ONEDNN_MIN_ROWS, 64)
    with torch.no_grad():
        q(x[:7])
        q(x[:7].clamp_min(-0.17), None, -0.1701)
        assert (len(packs), len(int_mms)) == (0, 2)
        q(x)
        q(x.clamp_min(-0.17), None, -0.1701)
    assert (len(packs), len(int_mms)) == (1, 2)


def test_7_bit_qat_keeps_each_rows_clipping_ratio_for_a_few_training_passes_and_evaluation_searches(monkeypatch):
    """A 7-bit FakeQuantLinear in training searches its rows' clipping (31 passes over the weight) once every
    CLIP_REFRESH passes and in between scales the current weight's ranges by the ratios of that search; with
    eval() or no grad it always searches (what quantize_ will make of the weight now), and so after other bits.
    The weight is changed as fused AdamW changes it, without a new tensor version: no cache may trust that."""
    monkeypatch.setattr(quantize, "CLIP_REFRESH", 3)
    searches = []
    real = int8_ops.clip_ratios
    monkeypatch.setattr(int8_ops, "clip_ratios", lambda *a: searches.append(1) or real(*a))
    torch.manual_seed(0)
    fq = FakeQuantLinear.from_linear(nn.Linear(64, 16), 7)
    x = torch.randn(5, 64)
    done = []
    for step in range(7):
        ratios, before = fq._ratios, len(searches)
        y = fq(x)
        y.sum().backward()
        done.append(len(searches) - before)
        kept = step % 3 != 0  # passes 1, 4, 7 search
        w = fq.weight.detach()
        scale = int8_ops.channel_scales(w, 7, ratios[1] if kept else None)[0]
        want = nn.functional.linear(int8_ops.fake_quantize_per_token(x),
                                    int8_ops.fake_quantize_per_channel(w, 7, scale), fq.bias)
        torch.testing.assert_close(y, want, atol=0, rtol=0)
        if kept:  # the kept ratios on the current ranges, not a fresh search's scales
            assert not torch.equal(scale, int8_ops.channel_scales(w, 7)[0])
        with torch.no_grad():
            fq.weight.mul_(torch.empty_like(fq.weight).uniform_(0.5, 1.5))  # each row's range and best clip move
    assert done == [1, 0, 0, 1, 0, 0, 1]
    fresh = Int8Linear.from_linear(fq, 7).dequantized_weight()
    for mode in ("eval", "no_grad"):
        fq.train(mode != "eval")
        with torch.set_grad_enabled(mode != "no_grad"):
            before = len(searches)
            torch.testing.assert_close(fq(x), nn.functional.linear(int8_ops.fake_quantize_per_token(x), fresh, fq.bias),
                                       atol=1e-5, rtol=1e-5)
            assert len(searches) == before + 1
    fq.train()
    fq.bits = 8
    fq(x)
    fq.bits = 7
    before = len(searches)
    fq(x)
    assert len(searches) == before + 1  # (ratios were kept from 7-bit passes, but 8-bit training passes ran since)


def test_7_bit_qat_of_a_layer_with_no_outputs_trains_more_than_one_pass():
    """A FakeQuantLinear with no output rows has no clipping ratios to keep: its second training pass read the
    missing ratios' shape (AttributeError on None)."""
    fq = FakeQuantLinear.from_linear(nn.Linear(8, 0), 7)
    x = torch.randn(3, 8)
    for _ in range(3):
        assert fq(x).shape == (3, 0)


def test_fake_quantization_of_a_zero_weight_row_is_finite():
    """A weight row of zeros (a neuron pruned to nothing, or never trained) fake-quantizes to zeros with 7- and 8-bit
    codes, in training and in evaluation: its scale is positive (not 0, whose codes 0 / 0 made the whole output NaN),
    and that output is the bias."""
    torch.manual_seed(0)
    for bits in (7, 8):
        fq = FakeQuantLinear.from_linear(nn.Linear(16, 4), bits)
        with torch.no_grad():
            fq.weight[2] = 0
        x = torch.randn(3, 16)
        for training in (True, False):
            fq.train(training)
            y = fq(x)
            assert torch.isfinite(y).all()
            torch.testing.assert_close(y[:, 2], fq.bias[2].expand(3))
        assert torch.equal(int8_ops.fake_quantize_per_channel(fq.weight, bits)[2], torch.zeros(16))


def test_7_bit_qat_searches_again_when_the_weight_has_other_rows():
    """A 7-bit FakeQuantLinear whose weight is replaced by one of other rows (e.g. output rows pruned away) between two
    training passes searches that weight's clipping: the kept ratios are one per row of the old weight."""
    torch.manual_seed(0)
    fq = FakeQuantLinear.from_linear(nn.Linear(32, 16), 7)
    x = torch.randn(5, 32)
    fq(x).sum().backward()
    with torch.no_grad():
        fq.weight = nn.Parameter(fq.weight[:6].clone())
        fq.bias = nn.Parameter(fq.bias[:6].clone())
    fq.out_features = 6
    y = fq(x)
    want = nn.functional.linear(int8_ops.fake_quantize_per_token(x),
                                int8_ops.fake_quantize_per_channel(fq.weight.detach(), 7), fq.bias)
    torch.testing.assert_close(y, want, atol=0, rtol=0)
    assert fq._ratios[1].shape == (6,)


def test_the_pack_cache_gives_a_view_at_a_weights_address_its_own_pack(monkeypatch):
    """packed_weight caches by the weight's address, but a view of a weight's first rows shares that address and its
    version counter: it is packed as itself (its rows), not answered with the whole weight's pack."""
    monkeypatch.setattr(int8_ops, "HAS_ONEDNN", False)
    monkeypatch.setattr(int8_ops, "ONEDNN_7BIT", False)  # pack_weight: the codes in fp32, comparable here
    torch.manual_seed(0)
    wq = torch.randint(-127, 128, (12, 8), dtype=torch.int8)
    assert torch.equal(int8_ops.packed_weight(wq), wq.float())
    head = wq[:5]
    assert head.data_ptr() == wq.data_ptr() and head._version == wq._version
    assert torch.equal(int8_ops.packed_weight(head), head.float())
    assert torch.equal(int8_ops.packed_weight(wq), wq.float())


def test_compiled_7_bit_qat_searches_the_clipping_on_every_pass():
    """Compiled, a 7-bit FakeQuantLinear in training computes its weight's scales in the graph, a fresh clipping
    search on every pass (ratios kept across passes would be Python state the graph cannot follow): each pass's
    output is the current weight's fake quantization, though the weight moves between passes."""
    torch.manual_seed(0)
    fq = FakeQuantLinear.from_linear(nn.Linear(64, 16), 7)
    x = torch.randn(5, 64)
    torch._dynamo.reset()
    compiled = torch.compile(fq, backend="eager")
    for _ in range(3):
        y = compiled(x)
        y.sum().backward()
        want = nn.functional.linear(int8_ops.fake_quantize_per_token(x),
                                    int8_ops.fake_quantize_per_channel(fq.weight.detach(), 7), fq.bias)
        torch.testing.assert_close(y, want, atol=1e-6, rtol=1e-6)
        with torch.no_grad():
            fq.weight.mul_(torch.empty_like(fq.weight).uniform_(0.5, 1.5))  # each row's range and best clip move


@pytest.mark.parametrize("bits", [7, 8])
def test_fake_quantizing_a_weight_of_no_columns_gives_it_back_empty(bits):
    """A weight (N, 0) (a layer of no inputs) fake-quantizes to itself, as quantize_per_channel codes it: the max of
    its rows over no columns raised."""
    w = torch.empty(3, 0, requires_grad=True)
    scale, _ = int8_ops.channel_scales(w.detach(), bits)
    assert scale.shape == (3, 1) and (scale > 0).all()
    out = int8_ops.fake_quantize_per_channel(w, bits)
    assert out.shape == (3, 0)
    assert quantize_per_channel(w, bits)[0].shape == (3, 0)
