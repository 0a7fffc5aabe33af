"""Inference on the real tokens only (Packing) gives the numbers of the padded pass."""

from __future__ import annotations

import pytest
import torch

import oztune.models.packing as tr
from oztune.models.hub import load_classifier

from conftest import padded_batch


def run(model, ids, mask, tt=None, pack=True, group_cost=None, **kw):
    """Logits with packing forced on (every padded batch) or off; checks which one ran.

    ``group_cost`` 0 gives every distinct length an attention group of its own (passed to length_groups:
    its default, tr.GROUP_COST, is bound when the module is imported, so setting tr.GROUP_COST does nothing).
    """
    seen = []
    hook = model.backbone.layers[0].ffn_norm.register_forward_hook(lambda m, a, out: seen.append(out.dim()))
    old = tr.PACK_MIN_PADDING, tr.length_groups
    tr.PACK_MIN_PADDING = 0.0 if pack else 2.0
    if group_cost is not None:
        tr.length_groups = lambda attention_mask: old[1](attention_mask, group_cost)
    try:
        with torch.no_grad():
            out = model(ids, mask, tt, **kw)
    finally:
        tr.PACK_MIN_PADDING, tr.length_groups = old
        hook.remove()
    assert seen == [2 if pack else 3]  # packed rows are (N, C)
    return out


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert", "gpt2"])
@pytest.mark.parametrize("pooling", ["cls", "mean", "last"])
def test_packed_inference_matches_padded(tiny_hf_dir, family, pooling):
    d, _ = tiny_hf_dir(family)
    model, _, _ = load_classifier(d)
    model.eval()
    model.head_cfg.pooling = model.head.cfg.pooling = pooling
    ids, mask = padded_batch(0, lengths=(9, 4, 1, 7, 9))
    want = run(model, ids, mask, pack=False)
    torch.testing.assert_close(run(model, ids, mask), want, atol=1e-5, rtol=1e-5)  # one attention group
    torch.testing.assert_close(run(model, ids, mask, group_cost=0), want, atol=1e-5, rtol=1e-5)  # four
    with torch.no_grad():  # all_tokens (layer hooks) is never packed
        torch.testing.assert_close(model(ids, mask, all_tokens=True), want, atol=1e-5, rtol=1e-5)


def test_packed_backbone_matches_on_real_tokens_left_padding_and_pairs(tiny_hf_dir):
    d, _ = tiny_hf_dir("bert")
    model, _, _ = load_classifier(d)
    model.eval()
    ids, mask = padded_batch(0, lengths=(6, 2, 6, 3))
    ids, mask = ids.flip(1), mask.flip(1)  # left padding
    tt = (torch.arange(6) >= 4).long().expand(4, 6).contiguous() * mask  # a second segment
    hidden = []
    for pack in (False, True):
        tr.PACK_MIN_PADDING = 0.0 if pack else 2.0
        try:
            with torch.no_grad():
                hidden.append(model.backbone(ids, mask, tt))
        finally:
            tr.PACK_MIN_PADDING = 0.1
    real = mask.bool()
    torch.testing.assert_close(hidden[1][real], hidden[0][real], atol=1e-5, rtol=1e-5)
    assert hidden[1][~real].abs().max() == 0  # padded positions are zeros when packed
    ids, mask, tt = ids.flip(1), mask.flip(1), tt.flip(1)  # right padding, as oztune pads
    torch.testing.assert_close(run(model, ids, mask, tt), run(model, ids, mask, tt, pack=False), atol=1e-5, rtol=1e-5)
    ids, mask, tt = ids.flip(1), mask.flip(1), tt.flip(1)
    # cls pooling of a left-padded row reads a padding position: that batch is not packed
    model.head_cfg.pooling = model.head.cfg.pooling = "cls"
    tr.PACK_MIN_PADDING = 0.0
    try:
        with torch.no_grad():
            torch.testing.assert_close(model(ids, mask, tt), run(model, ids, mask, tt, pack=False))
    finally:
        tr.PACK_MIN_PADDING = 0.1


def test_packed_int8_and_pruned_heads(tiny_hf_dir):
    from oztune.compress.prune import shrink_
    from oztune.compress.quantize import quantize_

    d, _ = tiny_hf_dir("bert")
    model, _, _ = load_classifier(d)
    model.eval()
    heads = [list(range(h)) for h in model.cfg.layer_heads]
    heads[0] = []  # a layer with no attention left, packed rows pass through its output bias
    shrink_(model, list(range(model.cfg.num_layers)), heads, [list(range(f)) for f in model.cfg.layer_ffn])
    quantize_(model)
    ids, mask = padded_batch(0, lengths=(12, 3, 8, 1, 5))
    for pooling in ("cls", "mean"):
        model.head_cfg.pooling = model.head.cfg.pooling = pooling
        want = run(model, ids, mask, pack=False)
        torch.testing.assert_close(run(model, ids, mask), want, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(run(model, ids, mask, group_cost=0), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_a_group_of_several_rows_shorter_than_the_batch_matches_padded(tiny_hf_dir, family):
    """Two rows of length 4 in a batch of T 9 share a group padded to 4 positions: their tokens' places in it
    count rows of 4, not of the batch's 9 (every other group above is one row, or as long as the batch)."""
    model, enc, _ = load_classifier(tiny_hf_dir(family)[0])
    model.eval()
    ids, mask = padded_batch(enc.pad_id, lengths=(9, 4, 4, 1, 9))
    assert sorted((len(rows), T) for rows, T in tr.length_groups(mask, 0)) == [(1, 1), (2, 4), (2, 9)]
    want = run(model, ids, mask, pack=False)
    torch.testing.assert_close(run(model, ids, mask, group_cost=0), want, atol=1e-5, rtol=1e-5)


def test_groups_minimise_attention_work_plus_group_cost():
    import itertools
    import random

    def cost(ends, bounds):
        return sum(tr.GROUP_COST + (hi - lo) * ends[hi - 1] ** 2 for lo, hi in bounds)

    rng = random.Random(0)
    for _ in range(200):
        ends = sorted(rng.choice([rng.randint(1, 12), rng.randint(40, 128)]) for _ in range(rng.randint(1, 9)))
        got = tr._group_bounds(ends)
        assert got[0][0] == 0 and got[-1][1] == len(ends) and all(a[1] == b[0] for a, b in zip(got, got[1:]))
        best = min(cost(ends, list(zip((0, *cut), (*cut, len(ends)))))
                   for r in range(len(ends)) for cut in itertools.combinations(range(1, len(ends)), r))
        assert cost(ends, got) == best
    assert tr._group_bounds([5] * 40 + [100] * 4) == [(0, 40), (40, 44)]
    assert tr._group_bounds([5, 6, 7]) == [(0, 3)]


def test_packing_only_at_inference_with_enough_padding():
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])  # 1/8 padding
    with torch.no_grad():
        assert tr.Packing.worth_it(mask) == (1 / 8 >= tr.PACK_MIN_PADDING)
        assert not tr.Packing.worth_it(torch.ones(2, 4))
        assert not tr.Packing.worth_it(None)
        assert tr.Packing.worth_it(torch.tensor([[1, 1, 0, 0]]))
    assert not tr.Packing.worth_it(torch.tensor([[1, 1, 0, 0]]))  # autograd on: training keeps (B, T, C)


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_packed_left_padded_rows_match_padded_in_several_groups(tiny_hf_dir, family):
    """A row's attention group is as long as its last real position, not its count of real tokens: left
    padding puts a short row's tokens at the end, so every left-padded row needs all T positions."""
    model, enc, _ = load_classifier(tiny_hf_dir(family)[0])
    model.eval()
    model.head_cfg.pooling = model.head.cfg.pooling = "mean"  # cls and last pooling read a fixed position
    ids, mask = padded_batch(enc.pad_id, lengths=(9, 4, 1, 7, 9))
    ids, mask = ids.flip(1), mask.flip(1)  # left padding
    assert [T for _, T in tr.length_groups(mask, 0)] == [9]  # one group, even where each length costs nothing
    want = run(model, ids, mask, pack=False)
    assert torch.isfinite(want).all()
    torch.testing.assert_close(run(model, ids, mask, group_cost=0), want, atol=1e-5, rtol=1e-5)


def test_a_batch_with_exactly_the_minimum_share_of_padding_is_packed(monkeypatch):
    monkeypatch.setattr(tr, "PACK_MIN_PADDING", 0.25)  # exact in binary: 1 - 6/8 == 0.25
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    with torch.no_grad():
        assert tr.Packing.worth_it(mask)  # "at least this share"
        assert not tr.Packing.worth_it(torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]))


def test_a_batch_with_the_default_minimum_share_of_padding_is_packed():
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 8:] = 0  # 2 of 20 padding: 10%, the default minimum (1 - 18/20 is 0.0999... in floats)
    with torch.no_grad():
        assert tr.PACK_MIN_PADDING == 0.1 and tr.Packing.worth_it(mask)
        mask[1, 8] = 1
        assert not tr.Packing.worth_it(mask)


def test_token_index_maps_each_query_to_its_packed_row_and_refuses_a_query_on_padding():
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])  # packed rows: (0,0) (0,1) (0,2) (1,1) (1,2)
    b, t, q = tr.token_index(mask, torch.tensor([0, 1]))
    assert b.tolist() == [0, 0, 0, 1, 1] and t.tolist() == [0, 1, 2, 1, 2] and q.tolist() == [0, 3]
    assert tr.token_index(mask, torch.tensor([2, 0])) is None  # row 1's position 0 is padding: no packed row
    assert tr.token_index(mask)[2] is None
