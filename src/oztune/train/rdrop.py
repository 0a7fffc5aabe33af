"""R-Drop (Liang et al., 2021): each batch runs twice with different dropout, and the loss adds how far the
two predictions are apart (a symmetric KL divergence) to the task loss of both.

The two passes are one forward call on the batch stacked on itself, (2B, T): the same work as two calls in
larger matrix products, and every row draws its own dropout mask. A step costs about twice one without.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def consistency(a: torch.Tensor, b: torch.Tensor, problem_type: str) -> torch.Tensor:
    """How far two predictions (B, L) of the same examples are apart, averaged over examples.

    Single-label: the symmetric KL divergence of the two softmax distributions, (KL(a||b) + KL(b||a)) / 2,
    summed over labels. Multi-label: the same for each label's Bernoulli distribution, summed over labels.
    Regression: the squared difference of the two values.
    """
    a, b = a.float(), b.float()
    if problem_type == "single_label":
        la, lb = a.log_softmax(-1), b.log_softmax(-1)
        return 0.5 * ((la.exp() * (la - lb)).sum(-1) + (lb.exp() * (lb - la)).sum(-1)).mean()
    if problem_type == "multi_label":  # log p and log (1 - p) of each label, from the logits
        pa, qa, pb, qb = F.logsigmoid(a), F.logsigmoid(-a), F.logsigmoid(b), F.logsigmoid(-b)
        kl_ab = pa.exp() * (pa - pb) + qa.exp() * (qa - qb)
        kl_ba = pb.exp() * (pb - pa) + qb.exp() * (qb - qa)
        return 0.5 * (kl_ab + kl_ba).sum(-1).mean()
    return ((a - b) ** 2).mean()


def rdrop_loss(alpha: float, class_weights: list[float] | None = None, label_smoothing: float = 0.0):
    """A ``loss_fn(model, batch)`` for :func:`oztune.train.loop.fit`: the mean task loss of two dropout passes
    (with ``class_weights`` and ``label_smoothing`` as ``SequenceClassifier.loss`` takes them) plus ``alpha`` x
    their :func:`consistency`."""
    w = None if class_weights is None else torch.tensor(class_weights, dtype=torch.float32)

    def loss_fn(model: nn.Module, batch: dict) -> torch.Tensor:
        tt = batch.get("token_type_ids")
        logits = model(batch["input_ids"].repeat(2, 1), batch["attention_mask"].repeat(2, 1),
                       None if tt is None else tt.repeat(2, 1))  # (2B, L): two passes, two dropout masks
        a, b = logits.chunk(2)
        labels = batch["labels"]
        task = (model.loss(a, labels, w, label_smoothing) + model.loss(b, labels, w, label_smoothing)) / 2
        return task + alpha * consistency(a, b, model.head_cfg.problem_type)

    return loss_fn
