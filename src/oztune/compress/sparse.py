"""Unstructured pruning: the globally smallest encoder weights set to zero, and stored compactly.

Zeroes the smallest encoder Linear weights by global magnitude, at once or on a gradual cubic schedule
during fine-tuning (Zhu & Gupta, 2017, :class:`GradualPruner`), and stores each sparse matrix as a bitmask
plus its non-zero values (:class:`SparseLinear`). The zeros make the file smaller, not the CPU time: for
that, structured pruning (:mod:`oztune.compress.prune`) removes whole heads, neurons and layers.
Training such a model again (distillation into it, structured pruning's recovery) keeps its zeros zero
(:func:`zeros_keeper`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

ENCODER_LINEARS = ("attn.qkv", "attn.o", "ffn.up", "ffn.down")


def encoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The encoder's Linear layers (QKV, attention output, FFN up and down) by module name."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.startswith("backbone.layers.") and n.endswith(ENCODER_LINEARS)}


@torch.no_grad()
def magnitude_masks(model: nn.Module, sparsity: float) -> dict[str, torch.Tensor]:
    """Boolean keep-masks zeroing the globally smallest ``sparsity`` share of encoder Linear weights."""
    linears = encoder_linears(model)
    flat = torch.cat([m.weight.detach().abs().reshape(-1).float() for m in linears.values()])
    k = int(sparsity * flat.numel())
    threshold = flat.kthvalue(k).values if k > 0 else flat.new_tensor(-1.0)
    return {n: m.weight.detach().abs() > threshold for n, m in linears.items()}


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        modules[name].weight.mul_(mask)


def magnitude_prune_(model: nn.Module, sparsity: float) -> dict[str, torch.Tensor]:
    """One-shot global magnitude pruning; returns the masks."""
    masks = magnitude_masks(model, sparsity)
    apply_masks(model, masks)
    return masks


def _sparse(linear: nn.Module, min_sparsity: float) -> bool:
    """Whether at least ``min_sparsity`` of the layer's weights are exact zeros (unstructured pruning's)."""
    return float((linear.weight == 0).float().mean()) >= min_sparsity


def zeros_keeper(model: nn.Module, min_sparsity: float = 0.1):
    """An ``on_step`` callback for ``fit`` that keeps the zeros of the encoder's sparse Linears (at least
    ``min_sparsity`` zeros: an unstructured-pruned model) zero while the model trains; None if it has none.

    Without it, training a pruned model again (distillation into it, structured pruning's recovery) trains
    every zero back, and the layers saved as bitmask + values take more room than dense ones.
    """
    masks = {n: m.weight.detach() != 0 for n, m in encoder_linears(model).items() if _sparse(m, min_sparsity)}
    return (lambda step, total: apply_masks(model, masks)) if masks else None


def sparsity_of(model: nn.Module) -> float:
    """Share of exact zeros among the encoder's Linear weights."""
    ws = [m.weight.detach() for m in encoder_linears(model).values()]
    return sum(int((w == 0).sum()) for w in ws) / max(1, sum(w.numel() for w in ws))


def cubic_sparsity(step: int, total: int, final: float, begin: float = 0.0, end: float = 0.7) -> float:
    """Target sparsity after ``step`` of ``total`` steps: 0 until ``begin``, cubic up to ``final`` at ``end``.

    s(t) = final * (1 - (1 - p)^3), p the progress from ``begin * total`` to ``end * total`` (Zhu & Gupta, 2017):
    fast at first, while many weights are redundant, then slower; after ``end`` the model recovers at ``final``.
    """
    t0, t1 = begin * total, max(end * total, begin * total + 1)
    p = min(1.0, max(0.0, (step - t0) / (t1 - t0)))
    return final * (1 - (1 - p) ** 3)


class GradualPruner:
    """An ``on_step`` callback for :func:`oztune.train.loop.fit` that prunes on the cubic schedule.

    Masks are recomputed ``updates`` times over the ramp (and at its end) and re-applied after every
    optimizer step, so pruned weights stay zero while the rest recover.

    Args:
        model: the model being trained.
        final: sparsity to reach.
        begin: share of training before pruning starts.
        end: share of training at which ``final`` is reached.
        updates: number of mask recomputations over the ramp.
    """

    def __init__(self, model: nn.Module, final: float, begin: float = 0.0, end: float = 0.7, updates: int = 32):
        self.model, self.final, self.begin, self.end, self.updates = model, final, begin, end, updates
        self.masks: dict[str, torch.Tensor] = {}
        self.target = 0.0

    def __call__(self, step: int, total: int) -> None:
        every = max(1, int((self.end - self.begin) * total / self.updates))
        ramp_end = int(np.ceil(self.end * total))
        if step % every == 0 or step == ramp_end or step == total:
            target = cubic_sparsity(step, total, self.final, self.begin, self.end)
            if target > self.target:
                self.target = target
                self.masks = magnitude_masks(self.model, target)
        apply_masks(self.model, self.masks)


class SparseLinear(nn.Linear):
    """A Linear whose weight is stored as a bitmask of non-zeros plus their values (dense in memory).

    State dict: ``weight_mask`` (uint8, 8 weights per byte, row-major), ``weight_values`` (the non-zeros
    in row-major order) and ``bias``. At 90% sparsity that is about 4.2 bits per weight instead of 32.
    """

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        w = self.weight.detach()
        nz = w != 0
        destination[prefix + "weight_mask"] = pack_bits(nz.reshape(-1))
        destination[prefix + "weight_values"] = w[nz]
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        mask_key, values_key = prefix + "weight_mask", prefix + "weight_values"
        if mask_key in state_dict and values_key in state_dict:
            mask = unpack_bits(state_dict.pop(mask_key), self.weight.numel()).view(self.weight.shape)
            values = state_dict.pop(values_key)
            if int(mask.sum()) != values.numel():
                error_msgs.append(f"{prefix}weight: bitmask has {int(mask.sum())} ones but {values.numel()} values")
                return
            dense = torch.zeros_like(self.weight)
            dense[mask] = values.to(dense.dtype)
            state_dict[prefix + "weight"] = dense
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """(N,) bool -> (ceil(N / 8),) uint8, first bit in the high bit."""
    b = torch.nn.functional.pad(bits.to(torch.uint8), (0, -len(bits) % 8)).view(-1, 8)
    return (b << torch.arange(7, -1, -1, dtype=torch.uint8)).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of :func:`pack_bits`: (n,) bool."""
    return ((packed[:, None] >> torch.arange(7, -1, -1, dtype=torch.uint8)) & 1).view(-1)[:n].bool()


def to_sparse_(model: nn.Module, min_sparsity: float = 0.1) -> list[str]:
    """Swap encoder Linears with at least ``min_sparsity`` zeros for SparseLinear (compact when saved).

    Returns the names swapped. ``save_classifier`` records them (:func:`pruning_record`) so that
    ``load_classifier`` rebuilds the same modules (:func:`prepare_pruned`) before loading the weights.
    """
    names = []
    for name, m in encoder_linears(model).items():
        if type(m) is nn.Linear and _sparse(m, min_sparsity):
            swap_sparse(model, name, m)
            names.append(name)
    return names


def swap_sparse(model: nn.Module, name: str, linear: nn.Linear) -> None:
    """Put a :class:`SparseLinear` with ``linear``'s weights in place of the module called ``name``."""
    parent, _, child = name.rpartition(".")
    new = SparseLinear(linear.in_features, linear.out_features, bias=linear.bias is not None)
    with torch.no_grad():
        new.weight.copy_(linear.weight)
        if linear.bias is not None:
            new.bias.copy_(linear.bias)
    setattr(model.get_submodule(parent), child, new)


def to_dense_(model: nn.Module) -> list[str]:
    """Swap every :class:`SparseLinear` back for the plain ``nn.Linear`` it computes (same weights), in place.

    For tracers that read a module's weights through its state dict (the ONNX exporter): a SparseLinear's
    holds the bitmask and values, not ``weight``. Returns the names swapped.
    """
    names = []
    for name, m in list(model.named_modules()):
        if isinstance(m, SparseLinear):
            dense = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            with torch.no_grad():
                dense.weight.copy_(m.weight)
                if m.bias is not None:
                    dense.bias.copy_(m.bias)
            model.set_submodule(name, dense)
            names.append(name)
    return names

