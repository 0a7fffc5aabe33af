"""The pooled-row shortcut in the last layer gives the numbers of the full pass, values and gradients."""

from __future__ import annotations

import pytest
import torch

from oztune.models.hub import load_classifier
from oztune.models.transformer import Dropout

from conftest import padded_batch


def no_dropout(model):
    for m in model.modules():
        if isinstance(m, Dropout):
            m.p = 0.0
    return model


@pytest.mark.parametrize("family", ["bert", "gpt2"])
@pytest.mark.parametrize("pooling", ["cls", "last"])
@pytest.mark.parametrize("lengths", [(9, 4, 1, 7), (5, 5)])
def test_pooled_row_only_matches_full_last_layer(tiny_hf_dir, family, pooling, lengths):
    d, _ = tiny_hf_dir(family)
    model, _, _ = load_classifier(d)
    model.head_cfg.pooling = model.head.cfg.pooling = pooling
    no_dropout(model).train()
    ids, mask = padded_batch(0, lengths=lengths)
    grads = []
    for all_tokens in (True, False):
        model.zero_grad(set_to_none=True)
        out = model(ids, mask, all_tokens=all_tokens)
        out.pow(2).sum().backward()
        grads.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (full, g_full), (short, g_short) = grads
    torch.testing.assert_close(short, full, atol=1e-5, rtol=1e-5)
    assert g_full.keys() == g_short.keys()
    for name in g_full:
        torch.testing.assert_close(g_short[name], g_full[name], atol=1e-5, rtol=1e-4, msg=name)
    with torch.no_grad():  # inference takes SDPA's path
        model.eval()
        torch.testing.assert_close(model(ids, mask), model(ids, mask, all_tokens=True), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(ids), model(ids, all_tokens=True), atol=1e-5, rtol=1e-5)


def test_last_layer_with_every_head_pruned_keeps_shapes(tiny_hf_dir):
    from oztune.compress.prune import shrink_

    d, _ = tiny_hf_dir("bert")
    model, _, _ = load_classifier(d)
    model.eval()
    ids, mask = padded_batch(0)
    heads = [list(range(h)) for h in model.cfg.layer_heads]
    heads[-1] = []
    shrink_(model, list(range(model.cfg.num_layers)), heads, [list(range(f)) for f in model.cfg.layer_ffn])
    assert model.backbone.layers[-1].attn.num_heads == 0
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask), model(ids, mask, all_tokens=True), atol=1e-5, rtol=1e-5)
