"""R-Drop: two dropout passes per batch, task loss of both plus their symmetric KL divergence."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from oztune.cli import main
from oztune.config import HeadConfig, ModelConfig
from oztune.models.transformer import SequenceClassifier, init_weights
from oztune.train.loop import TrainConfig, default_loss, fit, weighted_loss
from oztune.train.rdrop import consistency, rdrop_loss


def model(problem_type="single_label", num_labels=3, dropout=0.0) -> SequenceClassifier:
    torch.manual_seed(0)
    m = SequenceClassifier(
        ModelConfig(vocab_size=40, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32, max_positions=32,
                    hidden_dropout=dropout, attention_dropout=dropout),
        HeadConfig(num_labels=num_labels, problem_type=problem_type, dropout=dropout))
    init_weights(m, 0.2)
    return m.train()


def batch(problem_type="single_label", num_labels=3):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 40, (5, 7), generator=g)
    mask = torch.ones(5, 7, dtype=torch.long)
    mask[1, 4:] = 0
    labels = {"single_label": torch.tensor([0, 1, 2, 1, 0]),
              "multi_label": torch.randint(0, 2, (5, num_labels), generator=g).float(),
              "regression": torch.randn(5, generator=g)}[problem_type]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_consistency_is_the_symmetric_kl_of_the_two_distributions():
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    pa, pb = a.softmax(-1), b.softmax(-1)
    kl = lambda p, q: (p * (p / q).log()).sum(-1)  # noqa: E731
    assert consistency(a, b, "single_label") == pytest.approx(float(0.5 * (kl(pa, pb) + kl(pb, pa)).mean()), rel=1e-5)
    sa, sb = a.sigmoid(), b.sigmoid()
    bern = lambda p, q: p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()  # noqa: E731
    expect = 0.5 * (bern(sa, sb) + bern(sb, sa)).sum(-1).mean()
    assert consistency(a, b, "multi_label") == pytest.approx(float(expect), rel=1e-5)
    assert consistency(a[:, :1], b[:, :1], "regression") == pytest.approx(float(((a[:, 0] - b[:, 0]) ** 2).mean()))
    assert consistency(a, a, "single_label") == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("problem_type", ["single_label", "multi_label", "regression"])
def test_without_dropout_it_is_the_task_loss(problem_type):
    n = 1 if problem_type == "regression" else 3
    m, b = model(problem_type, n), batch(problem_type, n)
    assert rdrop_loss(1.0)(m, b).item() == pytest.approx(default_loss(m, b).item(), rel=1e-5)


def test_with_dropout_the_two_passes_differ_and_the_gap_is_added():
    m, b = model(dropout=0.3), batch()
    torch.manual_seed(3)
    with_gap = rdrop_loss(5.0)(m, b)
    torch.manual_seed(3)
    no_gap = rdrop_loss(0.0)(m, b)  # the same dropout masks: only the consistency term differs
    assert with_gap.item() > no_gap.item() + 1e-4
    with_gap.backward()
    assert m.backbone.layers[0].attn.qkv.weight.grad.abs().sum() > 0


def test_class_weights_weigh_both_passes():
    m, b = model(), batch()
    w = [0.5, 2.0, 1.0]
    assert rdrop_loss(1.0, w)(m, b).item() == pytest.approx(weighted_loss(w)(m, b).item(), rel=1e-5)


def test_fit_uses_it_and_refuses_it_with_another_loss():
    from oztune.data.dataset import EncodedData

    data = EncodedData([([2, 5, 6, 3], [0] * 4), ([2, 7, 3], [0] * 3)] * 4, torch.tensor([0, 1] * 4), 0)
    calls = []
    m = model(dropout=0.1)
    real = m.forward
    m.forward = lambda ids, *a, **k: calls.append(ids.shape[0]) or real(ids, *a, **k)
    fit(m, data, TrainConfig(epochs=1, batch_size=4, rdrop=1.0, progress=False, precision="fp32"))
    assert calls and all(n == 8 for n in calls[:2])  # each batch of 4 ran as one stacked call of 8
    with pytest.raises(ValueError, match="rdrop adds to the default loss"):
        fit(m, data, TrainConfig(epochs=1, batch_size=4, rdrop=1.0, progress=False), loss_fn=lambda mm, bb: F.mse_loss(
            mm(bb["input_ids"]).sum(), torch.tensor(0.0)))
    with pytest.raises(ValueError, match="rdrop must be 0 or more"):
        TrainConfig(rdrop=-1.0)


def test_finetune_rdrop_is_recorded(tiny_base, sentiment_files, tmp_path):
    train, dev = sentiment_files
    out = tmp_path / "m"
    assert main(["finetune", "--train", str(train), "--eval", str(dev), "--output", str(out), "--model", str(tiny_base),
                 "--epochs", "1", "--lr", "3e-3", "--batch-size", "16", "--no-progress", "--rdrop", "0.5",
                 "--max-train-examples", "64"]) == 0
    assert json.loads((out / "run.json").read_text())["args"]["rdrop"] == 0.5
    assert "R-Drop 0.5" in (out / "README.md").read_text()
    assert main(["finetune", "--train", str(train), "--output", str(tmp_path / "x"), "--rdrop", "-1"]) == 2


def test_rdrop_keeps_the_token_type_ids_of_text_pairs():
    """Both passes read the segment ids (without dropout the loss is the plain one): dropped, a pair model
    trained with --rdrop would not see which text a token is in."""
    m, b = model(), batch()
    b["token_type_ids"] = torch.tensor([[0, 0, 0, 1, 1, 1, 1]] * 5)
    assert rdrop_loss(1.0)(m, b).item() == pytest.approx(default_loss(m, b).item(), rel=1e-5)


def test_weighted_rdrop_averages_the_task_loss_of_both_passes():
    m, b = model(), batch()
    weights = [0.5, 2.0, 1.0]
    real = m.forward

    def second_pass_differs(ids, *args, **kw):  # (as dropout would make it)
        out = real(ids, *args, **kw)
        return torch.cat([out[:len(out) // 2], out[len(out) // 2:] + torch.tensor([3.0, -1.0, 0.5])])

    m.forward = second_pass_differs
    first, second = second_pass_differs(b["input_ids"].repeat(2, 1), b["attention_mask"].repeat(2, 1), None).chunk(2)
    w = torch.tensor(weights)
    want = (m.loss(first, b["labels"], w) + m.loss(second, b["labels"], w)) / 2
    assert rdrop_loss(0.0, weights)(m, b).item() == pytest.approx(want.item(), rel=1e-5)
