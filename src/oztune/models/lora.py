"""LoRA: train a low-rank update ``B @ A`` beside each frozen linear layer, then merge it into the weight.

``y = base(x) + (alpha / r) * dropout(x) @ A.T @ B.T`` with A (r, in) random and B (out, r) zero, so
training starts exactly at the pre-trained model. Only the LoRA matrices and the task head train.
:func:`merge_lora` folds each update into its base weight and puts the plain ``nn.Linear`` back, so the
saved model is an ordinary checkpoint (Hugging Face and ``oztune compress`` load it).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from oztune.config import LORA_TARGETS
from oztune.errors import OztuneError, check_at_least_1
from oztune.models.transformer import Dropout, SequenceClassifier


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable rank-``rank`` update scaled by ``alpha / rank``.

    Args:
        base: the pre-trained layer (its parameters are frozen).
        rank: rank r of the update.
        alpha: scale numerator; the update is multiplied by ``alpha / rank``.
        dropout: dropout on the input of the update.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))  # (r, in)
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.scaling = alpha / rank
        self.dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = (self.dropout(x) @ self.lora_a.T) @ self.lora_b.T  # (..., in) -> (..., r) -> (..., out)
        return self.base(x) + self.scaling * update

    def merged(self) -> nn.Linear:
        """The base layer with ``scaling * B @ A`` added to its weight (trainable again)."""
        with torch.no_grad():
            self.base.weight += self.scaling * (self.lora_b @ self.lora_a).to(self.base.weight.dtype)
        return self.base.requires_grad_(True)


def _parent_and_name(block: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, name = path.rsplit(".", 1)
    return block.get_submodule(parent_path), name


def check_targets(targets: list[str]) -> None:
    """A --lora-targets list :func:`apply_lora` can take: one or more names from :data:`LORA_TARGETS`."""
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown:
        raise OztuneError(f"--lora-targets: unknown {', '.join(unknown)}; choose from {', '.join(LORA_TARGETS)}")
    if not targets:
        raise OztuneError(f"--lora-targets: give at least one of {', '.join(LORA_TARGETS)}")


def lora_alpha(rank: int, alpha: float | None) -> float:
    """The scale numerator ``alpha``, by default ``2 * rank`` (a scale of 2)."""
    return float(alpha if alpha is not None else 2 * rank)


def apply_lora(model: SequenceClassifier, rank: int, alpha: float | None = None, targets: list[str] | None = None,
               dropout: float = 0.0) -> int:
    """Wrap the target linears of every block in :class:`LoRALinear` and freeze everything but LoRA and the head.

    Args:
        model: the classifier, changed in place.
        rank: LoRA rank r (at least 1).
        alpha: scale numerator (default ``2 * rank``, so the scale is 2).
        targets: names from :data:`LORA_TARGETS` (default all: qkv, o, up, down).
        dropout: dropout on the LoRA input.

    Returns:
        The number of trainable parameters.
    """
    targets = list(dict.fromkeys(LORA_TARGETS if targets is None else targets))  # a name given twice is one target
    check_targets(targets)
    check_at_least_1("--lora-rank", rank)
    alpha = lora_alpha(rank, alpha)
    model.requires_grad_(False)
    for i, block in enumerate(model.backbone.layers):
        for t in targets:
            parent, name = _parent_and_name(block, LORA_TARGETS[t])
            layer = getattr(parent, name)
            if type(layer) is not nn.Linear:
                raise OztuneError(f"LoRA needs plain linear layers; layers.{i}.{LORA_TARGETS[t]} is a "
                                  f"{type(layer).__name__} (quantized or sparse models cannot take LoRA)")
            if rank > max(layer.in_features, layer.out_features):  # (a huge rank: no overflow or giant allocation)
                raise OztuneError(f"--lora-rank {rank} is more than the layers it adapts are wide "
                                  f"(layers.{i}.{LORA_TARGETS[t]}: {layer.in_features} -> {layer.out_features})")
            if layer.in_features and layer.out_features:  # a fully pruned layer has nothing to adapt
                setattr(parent, name, LoRALinear(layer, rank, alpha, dropout))
    model.head.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merge_lora(model: nn.Module) -> int:
    """Fold every :class:`LoRALinear` into its base weight and put the plain linear back; returns how many."""
    wrapped = [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name, m in wrapped:
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, m.merged())
    model.requires_grad_(True)
    return len(wrapped)
