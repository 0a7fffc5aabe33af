"""The fp32 Linear kernel of CPU inference: oneDNN's, on a weight pre-packed once, in place of MKL's sgemm.

PyTorch's ``F.linear`` on CPU calls MKL's sgemm, which on AMD CPUs takes its AVX2 path and at a few dozen rows
(one SST-2 sentence is ~25 tokens) gains little from a second thread. oneDNN's kernel on a weight packed into its
blocked layout (``torch.ops.mkldnn._linear_pointwise``, the op PyTorch's inductor lowers bf16 linears to) splits
the work: on a 2-core AVX2 EPYC (session 25's ``bench/int8.py --kernels``) MiniLM's four Linear shapes at 25 rows
take 0.73-0.96x MKL's time, at 2,560 rows 0.94-1.12x; end to end the fine-tuned MiniLM runs batch 1 at 1.10-1.23x
MKL's speed, batches of 64 level (``bench/inference.py``, ``bench/int8.py``; BENCHMARKS.md).

Where it applies (:func:`fast`): a plain ``nn.Linear`` of a model whose weights are final (:func:`freeze_`: a
model loaded for inference by ``oztune.Classifier``, a variant timed by ``oztune compress``), with fp32 weight
and input on the CPU, at inference (grad off), with no hooks on the module, and not while a graph is traced
(``torch.compile``, ``torch.export``, the TorchScript ONNX exporter: they see ``F.linear``). Everything else
(training and the evaluations during it, GPUs, int8, sparse, LoRA layers) calls the module as before.

Why "final": the pack is a second copy of the weight, made on first use, and a copy can go stale. It is made
again when the weight's version counter moves (``load_state_dict``, an in-place op), but PyTorch's fused AdamW
updates weights without moving it; so packs are only for frozen models, and ``SequenceClassifier.train()``
thaws a model (:func:`thaw_`) before any training step. Results differ from MKL's in the last bits only
(~1e-6 relative). ``OZTUNE_ONEDNN_LINEAR=0`` turns the kernel off.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable

import torch
from torch import nn

ONEDNN_LINEAR = (os.environ.get("OZTUNE_ONEDNN_LINEAR", "1") != "0" and torch.backends.mkldnn.is_available()
                 and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def cached_pack(packs: dict, w: torch.Tensor, pack: Callable[[torch.Tensor], object]):
    """``pack(w)``, kept in ``packs`` while ``w`` lives and is unchanged: packed again after an in-place change
    (an optimizer step, a state dict loaded into it), dropped when ``w`` is freed. ``packs`` maps
    ``w.data_ptr()`` to (weakref to w, w's version, the pack); a view sharing w's address is another tensor."""
    key = w.data_ptr()
    hit = packs.get(key)
    if hit is not None and hit[0]() is w and hit[1] == w._version:
        return hit[2]

    def drop(ref, key=key):  # the weight is gone: so is its pack (unless another weight took the address since)
        if packs.get(key, (None,))[0] is ref:
            del packs[key]

    packed = pack(w)
    packs[key] = (weakref.ref(w, drop), w._version, packed)
    return packed


def forget(packs: dict, w: torch.Tensor) -> None:
    """Drop ``w``'s pack from ``packs``: for a change its version counter does not see (``w.data`` written)."""
    hit = packs.get(w.data_ptr())
    if hit is not None and hit[0]() is w:
        del packs[w.data_ptr()]


_PACKS: dict[int, tuple] = {}  # fp32 weights packed for oneDNN (cached_pack)

# Multiply-adds (rows x in x out) from which a layer runs oneDNN's kernel. A call of it costs ~40 us more than
# MKL's (scratch timings: 35-50 us for a 2 x 8 x 8 product, against 6-8): a tiny layer (a head's output row) stays
# with MKL. In the whole model the bound mattered little: at batch 1, 2^20, 2^22, 2^23 and no bound took 0.81-0.91x
# MKL's time in two scratch runs of 400 sentences taking turns (the machine's noise is as large as their differences).
MIN_WORK = 1 << 20


def _pack(w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(w.detach(), None)


def freeze_(model: nn.Module) -> nn.Module:
    """Mark ``model``'s weights final: its plain Linear layers run oneDNN's kernel at inference on a packed copy
    of their weights (see above) until :func:`thaw_`. Returns ``model``."""
    for m in model.modules():
        if type(m) is nn.Linear:
            m.__dict__["_frozen"] = True
    return model


def thaw_(model: nn.Module) -> nn.Module:
    """Undo :func:`freeze_` (packs dropped): the weights may change again. Returns ``model``."""
    for m in model.modules():
        if m.__dict__.pop("_frozen", False):
            forget(_PACKS, m.weight)
    return model


def fast(m: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``linear(m, x)`` runs oneDNN's kernel (the conditions above, and :data:`MIN_WORK`; only a plain
    ``nn.Linear`` is ever frozen)."""
    if not (ONEDNN_LINEAR and m.__dict__.get("_frozen", False)) or torch.is_grad_enabled():
        return False
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    w = m._parameters["weight"]
    return (x.numel() * w.shape[0] >= MIN_WORK and x.dtype == torch.float32
            and w.dtype == torch.float32 and x.device.type == "cpu" and not (m._forward_hooks or m._forward_pre_hooks))


def linear(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``m(x)``, by oneDNN's kernel where :func:`fast`, else by the module (any module taking ``x``: an int8 or
    sparse layer is simply called). (oneDNN's fused GELU is slower than PyTorch's GELU after it: not used.)"""
    if fast(m, x):
        return torch.ops.mkldnn._linear_pointwise(x, cached_pack(_PACKS, m.weight, _pack), m.bias, "none", [], "")
    return m(x)
