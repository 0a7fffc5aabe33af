"""Saving over an existing model directory: the new model replaces the old one and nothing is left beside it."""

from __future__ import annotations

import json

import torch

from oztune.models.hub import load_classifier, save_classifier


def test_saving_twice_to_one_directory_holds_the_second_model_and_leaves_no_dot_entries(tiny_base, tmp_path):
    model, enc, _ = load_classifier(tiny_base, num_labels=2)
    out = save_classifier(model, enc, tmp_path / "m", {0: "x", 1: "y"}, run={"save": 1})
    with torch.no_grad():
        model.head.out.bias.fill_(3.0)
    assert save_classifier(model, enc, out, {0: "neg", 1: "pos"}, run={"save": 2}) == out

    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no .m.old-PID, no .m.tmp-*
    again, _, meta = load_classifier(out)
    assert meta["id2label"] == {0: "neg", 1: "pos"}
    assert json.loads((out / "run.json").read_text()) == {"save": 2}
    torch.testing.assert_close(again.head.out.bias, torch.full((2,), 3.0), rtol=0, atol=0)
