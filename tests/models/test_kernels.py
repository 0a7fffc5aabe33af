"""oneDNN's fp32 Linear at CPU inference: where it runs, that it computes the module's numbers, and its pack cache."""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

from oztune.api import Classifier
from oztune.models import kernels
from oztune.models.hub import load_classifier

from conftest import padded_batch

pytestmark = pytest.mark.skipif(not kernels.ONEDNN_LINEAR, reason="this torch build has no oneDNN linear")


@pytest.fixture
def calls(monkeypatch):
    """Counts oneDNN linear calls (the op itself still runs); every size goes to it (MIN_WORK 1: these tests' layers
    are small)."""
    monkeypatch.setattr(kernels, "MIN_WORK", 1)
    seen = []
    real = torch.ops.mkldnn._linear_pointwise

    def counted(*args):
        seen.append(args[3])  # the post-op
        return real(*args)

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", counted)
    return seen


@pytest.mark.parametrize("shape", [(5, 16), (2, 7, 16), (1, 1, 16)])
def test_linear_computes_the_module(shape, calls):
    torch.manual_seed(0)
    m = kernels.freeze_(nn.Linear(16, 24))
    x = torch.randn(*shape) * 3
    with torch.no_grad():
        y, expected = kernels.linear(m, x), m(x)
    assert y.shape == expected.shape
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    assert calls == ["none"]


def test_linear_without_bias_and_odd_layouts(calls):
    torch.manual_seed(1)
    m = kernels.freeze_(nn.Linear(16, 24, bias=False))
    with torch.no_grad():
        for x in (torch.randn(3, 32)[:, ::2], torch.randn(16, 3).t()):  # strided, transposed
            torch.testing.assert_close(kernels.linear(m, x), m(x), rtol=1e-5, atol=1e-5)
    assert calls == ["none", "none"]


def test_module_called_where_onednn_does_not_apply(calls, monkeypatch):
    m, x = nn.Linear(8, 4), torch.randn(2, 8)
    with torch.no_grad():
        kernels.linear(m, x)  # weights not final (a model in training, evaluated)
    kernels.freeze_(m)
    y = kernels.linear(m, x)  # grad on (training)
    assert y.requires_grad and calls == []
    with torch.no_grad():
        monkeypatch.setattr(kernels, "MIN_WORK", 2 * 8 * 4 + 1)
        kernels.linear(m, x)  # too little work for oneDNN's call to pay
        monkeypatch.setattr(kernels, "MIN_WORK", 2 * 8 * 4)
        kernels.linear(m, x)
        assert calls == ["none"]
        calls.clear()
        kernels.linear(m.double(), x.double())  # not fp32
        kernels.linear(kernels.freeze_(nn.Linear(8, 0)), x)  # pruned to nothing
        kernels.linear(m.float(), x[:0])  # no rows

        class Sub(nn.Linear):  # an int8, sparse or LoRA layer: its own forward
            def forward(self, x):
                return super().forward(x) + 1

        sub = kernels.freeze_(Sub(8, 4))
        assert torch.equal(kernels.linear(sub, x), nn.Linear.forward(sub, x) + 1)
        seen = []
        m.register_forward_pre_hook(lambda mod, a: seen.append(1))  # a hook sees the call
        kernels.linear(m, x)
        assert seen == [1]
        class Wrap(nn.Module):  # as the TorchScript ONNX exporter traces a model
            def __init__(self):
                super().__init__()
                self.m = kernels.freeze_(nn.Linear(8, 4))

            def forward(self, t):
                return kernels.linear(self.m, t)

        traced = torch.jit.trace(Wrap(), x, check_trace=False)
        assert "mkldnn" not in str(traced.graph)
    assert calls == []


def test_pack_follows_the_weight_and_goes_with_it(calls):
    m, x = kernels.freeze_(nn.Linear(8, 4)), torch.randn(3, 8)
    with torch.no_grad():
        before = kernels.linear(m, x)
        m.weight.mul_(2)  # an optimizer step or a loaded state dict: the version moves
        torch.testing.assert_close(kernels.linear(m, x), m(x))
        assert not torch.allclose(kernels.linear(m, x), before)
        m.weight.data.zero_()  # .data bumps no version: forget() is the way to say so
        kernels.forget(kernels._PACKS, m.weight)
        torch.testing.assert_close(kernels.linear(m, x), m.bias.expand(3, 4))
    key = m.weight.data_ptr()
    assert key in kernels._PACKS
    del m
    gc.collect()
    assert key not in kernels._PACKS


def test_classifier_runs_onednn_at_inference_with_the_same_logits(tiny_hf_dir, monkeypatch, calls):
    model, enc, meta = load_classifier(tiny_hf_dir("bert")[0])
    ids, mask = padded_batch(0, lengths=(9, 2, 5))
    with torch.no_grad():
        slow = model(ids, mask)
        assert calls == []  # loaded, not final: a model to fine-tune
        clf = Classifier(model, enc, meta["id2label"])  # the API takes the weights as final
        fast = model(ids, mask)
    layers = len(model.backbone.layers)
    assert len(calls) == 4 * layers + len(model.head.hidden) + 1  # qkv, o, up, down; the head
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    assert clf.model is model


def test_training_after_inference_does_not_run_on_stale_packs(tiny_hf_dir, calls):
    """PyTorch's fused AdamW moves no version counter: packs of the weights it updates would go stale, so
    train() thaws the model."""
    model, _, _ = load_classifier(tiny_hf_dir("bert")[0])
    ids, mask = padded_batch(0, lengths=(9, 2, 5))
    kernels.freeze_(model.eval())
    with torch.no_grad():
        model(ids, mask)  # packs made
    n = len(calls)
    assert n > 0
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    model(ids, mask).sum().backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        after = model(ids, mask)
        assert len(calls) == n  # thawed: the module's own kernel
        kernels.freeze_(model)
        torch.testing.assert_close(model(ids, mask), after, rtol=1e-5, atol=1e-5)  # packed anew
    assert len(calls) > n
