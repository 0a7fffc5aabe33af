"""A moving average of the weights (``finetune --ema-decay``): evaluated and kept instead of the last weights."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


class WeightEMA:
    """An exponential moving average of trainable weights (Polyak averaging), updated after each step.

    The decay warms up as ``min(decay, (1 + step) / (10 + step))`` so that the first steps do not leave the
    average stuck near the pre-trained weights. Averaged weights generalise slightly better than the last
    ones and are less sensitive to where an epoch ends.

    Args:
        params: the trainable parameters, in a fixed order.
        decay: weight of the old average at each step (0.999: an average over roughly the last 1,000 steps).
        shadow: the average to continue from (a resumed run); None starts it at the current weights.
    """

    def __init__(self, params: list[nn.Parameter], decay: float, shadow: list[torch.Tensor] | None = None):
        self.params, self.decay = params, decay
        self.shadow = shadow if shadow is not None else [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Move the average towards the current weights after optimizer step ``step`` (0-based)."""
        d = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - d)

    @contextmanager
    def applied(self):
        """Within the block the parameters hold the average; the training weights come back after it."""
        saved = [p.detach().clone() for p in self.params]
        self.copy_to_params()
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_([p.detach() for p in self.params], saved)

    @torch.no_grad()
    def copy_to_params(self) -> None:
        torch._foreach_copy_([p.detach() for p in self.params], self.shadow)
