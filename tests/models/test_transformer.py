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


def test_dropout_zeroes_a_share_p_and_rescales_the_rest():
    torch.manual_seed(0)
    drop = Dropout(0.3).train()
    x = torch.ones(10**6)
    y = drop(x)
    assert abs((y == 0).float().mean().item() - 0.3) < 0.005
    assert abs(y.mean().item() - 1.0) < 0.01  # kept values are scaled by 1 / (1 - p)
    assert torch.equal(drop.eval()(x), x)
    assert torch.equal(Dropout(0.999999).train()(x), torch.zeros_like(x))  # rounds to "drop all", no 1/0


def test_dropout_with_p_below_one_level_keeps_everything():
    # p rounds to 0 of 65,536 levels: every int16 draw (even -32768) is kept, unscaled
    torch.manual_seed(0)
    x = torch.ones(2 * 10**6)
    assert torch.equal(Dropout(1e-6).train()(x), x)


def test_mean_pooling_of_a_row_with_no_real_token_is_zero_not_nan():
    from oztune.models.transformer import pool

    h = torch.randn(2, 3, 4)
    got = pool(h, torch.tensor([[0, 0, 0], [1, 1, 0]]), "mean")
    assert torch.equal(got[0], torch.zeros(4))
    torch.testing.assert_close(got[1], h[1, :2].mean(0))


def test_mean_pooling_averages_the_real_tokens_only():
    from oztune.models.transformer import pool

    torch.manual_seed(0)
    h = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    got = pool(h, mask, "mean")
    torch.testing.assert_close(got[0], h[0, :3].mean(0))
    torch.testing.assert_close(got[1], h[1].mean(0))
    torch.testing.assert_close(pool(h, mask, "last")[0], h[0, 2])


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_padding_does_not_change_a_rows_logits_with_mean_pooling(tiny_hf_dir, family):
    d, _ = tiny_hf_dir(family)
    model, enc, _ = load_classifier(d, head={"pooling": "mean"})
    no_dropout(model).eval()
    ids, mask = padded_batch(enc.pad_id, lengths=(9, 4))
    with torch.no_grad():
        alone = model(ids[1:, :4], mask[1:, :4])
        padded = model(ids, mask)
    torch.testing.assert_close(padded[1:], alone, atol=1e-5, rtol=1e-5)


def test_each_problem_type_has_its_loss():
    from oztune.config import HeadConfig
    from oztune.models.transformer import SequenceClassifier

    def loss(problem, logits, labels):
        model = SequenceClassifier.__new__(SequenceClassifier)  # loss needs only the head config
        model.head_cfg = HeadConfig(num_labels=logits.shape[-1], problem_type=problem)
        return model.loss(logits, labels).item()

    logits = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, 3.0]])
    ce = -(logits.log_softmax(-1)[[0, 1], [0, 2]]).mean()
    assert loss("single_label", logits, torch.tensor([0, 2])) == pytest.approx(ce.item(), rel=1e-6)
    targets = torch.tensor([[1, 0, 1], [0, 0, 1]])
    p = logits.sigmoid()
    bce = -(targets * p.log() + (1 - targets) * (1 - p).log()).mean()
    assert loss("multi_label", logits, targets) == pytest.approx(bce.item(), rel=1e-5)
    values = torch.tensor([[0.5], [2.0], [-1.0]])
    y = torch.tensor([1.0, 2.0, 0.0])
    assert loss("regression", values, y) == pytest.approx(((0.5 - 1) ** 2 + 0 + 1) / 3, rel=1e-6)


def test_a_left_padded_causal_batch_gives_finite_outputs(tiny_hf_dir, monkeypatch):
    """Queries before a row's first real token see no key under the causal mask: no NaN may come of it."""
    import oztune.models.packing as packing

    d, _ = tiny_hf_dir("gpt2")
    model, enc, _ = load_classifier(d, head={"pooling": "mean"})
    no_dropout(model).eval()
    ids, mask = padded_batch(enc.pad_id, lengths=(9, 4, 1, 7, 9))
    ids, mask = ids.flip(1), mask.flip(1)  # padding on the left
    monkeypatch.setattr(packing, "PACK_MIN_PADDING", 2.0)  # the padded path, not the packed one
    with torch.no_grad():
        out = model(ids, mask)
    assert torch.isfinite(out).all()
