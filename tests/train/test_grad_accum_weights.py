"""Audit (s10) of the training math: failing tests for confirmed bugs.

Gradient accumulation with micro-batches of unequal size: ``fit`` weighs every micro-batch's mean loss by
1 / (micro-batches in the step), so the examples of a short micro-batch (``train_batches`` makes one per epoch
whenever the number of examples is not a multiple of the batch size) weigh more than the others. The documented
contract (``SequenceClassifier.loss``; docs/training.md, "Imbalanced labels") is that a step's loss is the mean
over its examples, "the same however its examples are split into micro-batches (``--grad-accum``)".
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import oztune.train.loop as loop
from oztune.config import HeadConfig, ModelConfig
from oztune.data.dataset import EncodedData
from oztune.models.transformer import SequenceClassifier, init_weights
from oztune.train.loop import TrainConfig, fit


def tiny_model(problem_type: str = "single_label", num_labels: int = 3) -> SequenceClassifier:
    torch.manual_seed(0)
    model = SequenceClassifier(
        ModelConfig(vocab_size=50, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32, max_positions=64,
                    hidden_dropout=0.0, attention_dropout=0.0),
        HeadConfig(num_labels=num_labels, problem_type=problem_type, dropout=0.0))
    init_weights(model, 0.2)
    return model


def tiny_data(n: int, num_labels: int = 3, seed: int = 0) -> EncodedData:
    rng = np.random.default_rng(seed)
    encoded = []
    for _ in range(n):
        k = int(rng.integers(3, 13))
        encoded.append(([2] + rng.integers(4, 50, k - 2).tolist() + [3], [0] * k))
    return EncodedData(encoded, torch.tensor(rng.integers(0, num_labels, n), dtype=torch.long), 0)


def record_steps(monkeypatch, model, data, cfg):
    """Run ``fit`` and return, per optimizer step, (its example indices, its gradients, its logged loss)."""
    epoch_batches, grads = [], []
    real_batches, real_step = loop.train_batches, loop.clipped_step

    def batches(*args, **kw):
        out = real_batches(*args, **kw)
        epoch_batches.append(out)
        return out

    def step(opt, params, max_norm):
        grads.append([p.grad.detach().clone() for p in params])
        return real_step(opt, params, max_norm)

    monkeypatch.setattr(loop, "train_batches", batches)
    monkeypatch.setattr(loop, "clipped_step", step)
    result = fit(model, data, cfg)
    (bs,) = epoch_batches  # one epoch
    k = cfg.grad_accum
    groups = [np.concatenate(bs[s:s + k]) for s in range(0, len(bs), k)]
    assert len(groups) == len(grads) == len(result.log)
    return groups, grads, [row["loss"] for row in result.log], bs


@pytest.fixture
def accumulated_run(monkeypatch):
    # 14 examples, batch 4: train_batches gives batches of 4, 4, 4 and 2 (in a shuffled order); with grad_accum 2
    # one step holds the short batch. lr 0: the weights stay put, so every step's gradient is at the start weights.
    model, data = tiny_model(), tiny_data(14)
    cfg = TrainConfig(epochs=1, batch_size=4, grad_accum=2, lr=0.0, weight_decay=0.0, max_grad_norm=0.0,
                      warmup_ratio=0.0, precision="fp32", progress=False, bucket=1, seed=0)
    groups, grads, losses, batches = record_steps(monkeypatch, model, data, cfg)
    assert sorted(len(b) for b in batches) == [2, 4, 4, 4]
    return model, data, groups, grads, losses


def reference(model, data, idx):
    """Gradient and value of the mean loss over the step's examples, as one batch."""
    model.zero_grad(set_to_none=True)
    model.train()
    b = data.batch(idx)
    loss = model.loss(model(b["input_ids"], b["attention_mask"], b["token_type_ids"]), b["labels"])
    loss.backward()
    out = [p.grad.detach().clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    return out, float(loss.detach())


def test_grad_accum_step_gradient_is_that_of_the_mean_loss_over_its_examples(accumulated_run):
    """loop.py:337 scales each micro-batch by 1/group, not by its share of the step's examples: the step with the
    2-example micro-batch gets the gradient of (mean(4 examples) + mean(2 examples)) / 2, which weighs the two
    short-batch examples twice as much as the others, instead of the gradient of the mean over its 6 examples."""
    model, data, groups, grads, _ = accumulated_run
    for idx, got in zip(groups, grads):
        want, _ = reference(model, data, idx)
        err = max(float((g - w).abs().max() / w.abs().max().clamp_min(1e-12)) for g, w in zip(got, want))
        assert err < 1e-4, f"step over {len(idx)} examples: gradient off by {err:.3g} (relative) from the mean loss's"


def test_grad_accum_logged_step_loss_is_the_mean_over_its_examples(accumulated_run):
    """loop.py:343 logs the mean of the micro-batch means: for the step with the short micro-batch that is not the
    mean loss over the step's examples, so the logged loss changes with how the step is split into micro-batches
    (docs/training.md: --grad-accum "split[s] a step without changing it"). Same root cause as the test above."""
    model, data, groups, _, losses = accumulated_run
    for idx, got in zip(groups, losses):
        _, want = reference(model, data, idx)
        assert got == pytest.approx(want, rel=1e-5), f"step over {len(idx)} examples"
