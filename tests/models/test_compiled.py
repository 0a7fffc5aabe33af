"""CompiledClassifier: compiled at inference (padded batches packed), eager for training, same logits."""

from __future__ import annotations

import pytest
import torch

from oztune.compress.quantize import QuantConfig, quantize_
from oztune.models.compiled import CompiledClassifier, compile_for_inference
from oztune.models.hub import load_classifier

from conftest import padded_batch


class Recorder:
    """Stands in for the compiled model: records the calls and runs the eager model."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __call__(self, ids, mask, tt, token_index=None):
        self.calls.append((tuple(ids.shape), mask is None, token_index is not None))
        return self.model(ids, mask, tt, token_index=token_index)


def test_dispatch_compiled_unless_grad_all_tokens_or_a_padded_pooled_position(tiny_hf_dir):
    model, _, _ = load_classifier(tiny_hf_dir("bert")[0])
    assert model.head_cfg.pooling == "cls"
    rec = Recorder(model)
    wrapped = CompiledClassifier(model.eval(), graphs=(lambda ids, mask, tt, index: rec(ids, mask, tt, token_index=index),
                                                       lambda ids, tt: rec(ids, None, tt)))
    one, one_mask = padded_batch(0, lengths=(7,))
    flat, flat_mask = padded_batch(0, lengths=(6, 6, 6))
    padded, padded_mask = padded_batch(0, lengths=(9, 2, 2, 9))
    twelve, twelve_mask = padded_batch(0, lengths=(12,))
    left = torch.cat([torch.zeros(1, 1, dtype=torch.long), twelve], 1)  # one text, left-padded by one
    left_mask = torch.cat([torch.zeros(1, 1, dtype=torch.long), twelve_mask], 1)  # its cls position is padding
    right_mask = torch.cat([twelve_mask, torch.zeros(1, 1, dtype=torch.long)], 1)
    with torch.no_grad():
        wrapped(one, one_mask)
        wrapped(left, left_mask)  # eager: the pooled position has no packed row
        wrapped(left, right_mask)  # one padded text: packed
        wrapped(flat, flat_mask)
        wrapped(padded, padded_mask)
        wrapped(flat, flat_mask, all_tokens=True)
    wrapped(flat, flat_mask)  # grad enabled: training never runs the inference graph
    # one unpadded text: no mask, not packed; every other batch packed
    assert rec.calls == [((1, 7), True, False), ((1, 13), False, True), ((3, 6), False, True),
                         ((4, 9), False, True)]
    assert wrapped.head_cfg is model.head_cfg  # attributes are the wrapped model's
    assert list(wrapped.state_dict()) == ["eager." + k for k in model.state_dict()]  # no second copy


@pytest.mark.parametrize("family,pooling,int8", [("bert", "cls", False), ("bert", "cls", True),
                                                 ("bert", "mean", True), ("gpt2", "last", False)])
def test_compiled_logits_match_eager(tiny_hf_dir, one_thread, family, pooling, int8):
    model, _, _ = load_classifier(tiny_hf_dir(family)[0])
    model.head_cfg.pooling = pooling
    if int8:
        quantize_(model, QuantConfig())
    model.eval()
    wrapped = compile_for_inference(model)
    pad = 0
    batches = [padded_batch(pad, lengths=(7,)), padded_batch(pad, lengths=(5,)),  # one text, two lengths
               padded_batch(pad, lengths=(6, 6, 5)), padded_batch(pad, lengths=(9, 2, 2, 9)),
               padded_batch(pad, lengths=(3, 11, 1, 6, 11), seed=2)]
    with torch.no_grad():
        for ids, mask in batches:
            # int8: inductor computes x / scale in another order, so a code can round the other way
            got, want = wrapped(ids, mask), model(ids, mask)
            torch.testing.assert_close(got, want, atol=2e-2 if int8 else 1e-5, rtol=1e-3)


def test_one_graph_for_every_batch(tiny_hf_dir, one_thread):
    """Batches of every size, length and padding, with few rows and many (the eager int8 kernels switch
    at ONEDNN_MIN_ROWS), share one compiled graph, and one text another: a recompile in service would
    stall a request for tens of seconds."""
    import torch._dynamo

    from oztune.compress.int8_ops import ONEDNN_MIN_ROWS

    model, _, _ = load_classifier(tiny_hf_dir("bert")[0])
    quantize_(model, QuantConfig())
    wrapped = compile_for_inference(model)
    small = padded_batch(0, lengths=(6, 6))
    large = padded_batch(0, lengths=(8,) * (ONEDNN_MIN_ROWS // 8 + 1))  # > ONEDNN_MIN_ROWS rows
    with torch.no_grad():
        wrapped(*padded_batch(0, lengths=(5,)))  # the graph for one text
        wrapped(*small)  # and the one for batches
        with torch._dynamo.config.patch(error_on_recompile=True):
            for ids, mask in (large, padded_batch(0, lengths=(3,) * 5), padded_batch(0, lengths=(9,)),
                              padded_batch(0, lengths=(9, 2, 2, 9)), padded_batch(0, lengths=(5, 1, 13))):
                torch.testing.assert_close(wrapped(ids, mask), model(ids, mask), atol=1e-3, rtol=1e-3)


def test_rows_of_very_different_lengths_run_as_groups_cut_to_their_length(tiny_hf_dir):
    """One graph call packs one attention group as long as the batch's longest row: 8 short rows beside 8
    long ones run as two calls, each cut to its own length, and the logits are the eager model's."""
    model, _, _ = load_classifier(tiny_hf_dir("bert")[0])
    model.eval()
    rec = Recorder(model)
    wrapped = CompiledClassifier(model, graphs=(lambda ids, mask, tt, index: rec(ids, mask, tt, token_index=index),
                                                lambda ids, tt: rec(ids, None, tt)))
    ids, mask = padded_batch(0, lengths=(3, 60) * 8)  # interleaved: the groups are not contiguous rows
    with torch.no_grad():
        got, want = wrapped(ids, mask), model(ids, mask)
    assert sorted(rec.calls) == [((8, 3), False, True), ((8, 60), False, True)]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    rec.calls.clear()
    ids, mask = padded_batch(0, lengths=(9, 2, 2, 9))  # little to save: one call
    with torch.no_grad():
        wrapped(ids, mask)
    assert rec.calls == [((4, 9), False, True)]


def test_each_length_group_gets_its_own_rows_of_token_types(tiny_hf_dir):
    model, _, _ = load_classifier(tiny_hf_dir("bert")[0])
    model.eval()
    calls = []

    def packed(ids, mask, tt, index):
        calls.append((ids, tt))
        return model(ids, mask, tt, token_index=index)

    wrapped = CompiledClassifier(model, graphs=(packed, lambda ids, tt: model(ids, None, tt)))
    ids, mask = padded_batch(0, lengths=(3, 60) * 8)  # two groups of interleaved rows
    tt = (torch.arange(60) >= torch.tensor([2, 30] * 8)[:, None]).long() * mask  # a pair: its second text is type 1
    with torch.no_grad():
        got, want = wrapped(ids, mask, tt), model(ids, mask, tt)
    assert len(calls) == 2
    for call_ids, call_tt in calls:
        rows = torch.arange(16)[(mask.sum(1) <= 3) == (call_ids.shape[1] == 3)]  # the short rows, or the long
        assert torch.equal(call_ids, ids[rows, :call_ids.shape[1]])
        assert call_tt is not None and torch.equal(call_tt, tt[rows, :call_ids.shape[1]])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
