"""``torch.compile`` for inference: one graph for one text, one for every batch, padding skipped.

Eager PyTorch spends most of a small forward pass dispatching ~500 small operators one by one (an
int8 Linear alone is about ten: quantize, matmul, dequantize); inductor fuses them into a few C++
loops around the matmuls. On the bundled MiniLM in int8 with 2 threads that takes batch 1 from 4.9 ms
to 2.0 ms a sentence; batches of 16 in file order gain 29%, length-sorted batches of 64 22%
(bench/compiled.py, BENCHMARKS.md).

Batches are packed as in eager inference (:mod:`oztune.models.packing`: row-wise layers on the real
tokens only), in one attention group: the real tokens' coordinates come from ``nonzero``, whose size
depends on the data, so :class:`CompiledClassifier` finds them outside the graph and passes them in
(:func:`~oztune.models.packing.token_index`); inside, every step has a size the graph can follow. Before,
padded batches ran eager (packing could not be compiled): a server's batches of mixed lengths got nothing
from compiling.

Costs: compiling takes 20-65 s on 2 cores (less once inductor's disk cache holds the graphs), and the
compiled graphs are guarded on shapes only, not on the modules' attributes
(``torch.compiler.skip_guard_on_all_nn_modules_unsafe``, see :data:`OPTIONS`): build the wrapper after
the model's last change, for inference only.
"""

from __future__ import annotations

import torch
from torch import nn

from oztune.models.packing import length_groups, token_index

OPTIONS = {
    "cpp_wrapper": True,  # C++ calls the kernels: less overhead per kernel than a Python wrapper
    # inductor's pattern passes turn the explicit matmul-softmax-matmul into SDPA's flash kernel, slower at
    # SST-2 lengths (bench/compiled.py); no pass oztune relies on is lost: its int8 matmuls are explicit
    "pattern_matcher": False,
    # shapes only: dynamo's checks of every module attribute cost ~10% of a batch-1 call
    "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe,
}


# A graph packs the real tokens in one attention group, as long as the batch's longest row: a batch of very
# different lengths is cut into groups of similar ones, each its own call, where the attention work saved
# (rows x length^2 over all groups) exceeds this many units per extra call.
GROUP_COST = 10000


class CompiledClassifier(nn.Module):
    """A sequence classifier run compiled at inference.

    Compiled (dynamic shapes, C++ wrapper): one unpadded text without a mask, every other batch packed.
    Eager: training (grad enabled), ``all_tokens`` calls, and a batch whose pooled position is padding
    (cls pooling of a left-padded row: packing drops it). Attributes the wrapper lacks (``head_cfg``,
    ``scores``, ...) are the wrapped model's.

    Args:
        model: the (eval-mode) classifier to wrap; it is shared, not copied.
        options: inductor options over :data:`OPTIONS` (bench/compiled.py compares them); an option
            set to None is dropped (``guard_filter_fn=None``: dynamo's default guards).
        graphs: instead of compiling here, the two graphs already built ahead of time
            (:mod:`oztune.models.aot`): ``packed(input_ids, attention_mask, token_type_ids, token_index)`` and
            ``single(input_ids, token_type_ids)``, each returning None where it cannot take the shapes.
    """

    def __init__(self, model: nn.Module, options: dict | None = None, graphs: tuple | None = None):
        super().__init__()
        self.eager = model
        if graphs is None:
            opts = {k: v for k, v in {**OPTIONS, **(options or {})}.items() if v is not None}
            compiled = torch.compile(model, dynamic=True, options=opts)
            graphs = (lambda ids, mask, tt, index: compiled(ids, mask, tt, token_index=index),
                      lambda ids, tt: compiled(ids, None, tt))
        # not submodules: state_dict() holds each weight once
        object.__setattr__(self, "packed", graphs[0])
        object.__setattr__(self, "single", graphs[1])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, all_tokens: bool = False) -> torch.Tensor:
        if all_tokens or torch.is_grad_enabled():
            return self.eager(input_ids, attention_mask, token_type_ids, all_tokens=all_tokens)
        split = attention_mask is not None and input_ids.shape[0] > 1
        groups = length_groups(attention_mask, GROUP_COST) if split else []
        if len(groups) < 2:
            return self._run(input_ids, attention_mask, token_type_ids)
        out = None  # rows of very different lengths: one call per group of similar ones, cut to its length
        for rows, T in groups:
            tt = None if token_type_ids is None else token_type_ids[rows, :T]
            y = self._run(input_ids[rows, :T], attention_mask[rows, :T], tt)
            if out is None:
                out = y.new_empty(input_ids.shape[0], *y.shape[1:])
            out[rows] = y
        return out

    def _run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
             token_type_ids: torch.Tensor | None) -> torch.Tensor:
        """One batch through one graph (or eager, where neither graph takes it)."""
        if attention_mask is not None and (input_ids.shape[0] > 1 or not bool(attention_mask.all())):
            # packed: the real tokens' coordinates are found here, outside the graph (data-dependent sizes)
            index = token_index(attention_mask, self.eager.pooled_positions(input_ids, attention_mask))
            out = None if index is None else self.packed(input_ids, attention_mask, token_type_ids, index)
        else:  # one unpadded text (or no mask): no mask
            out = self.single(input_ids, token_type_ids)
        if out is None:  # a pooled position is padding (cls pooling of a left-padded row), or shapes the
            return self.eager(input_ids, attention_mask, token_type_ids)  # ahead-of-time graphs do not take
        return out

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["eager"], name)


def compile_for_inference(model: nn.Module, options: dict | None = None) -> CompiledClassifier:
    """``model`` (put in eval mode) wrapped in a :class:`CompiledClassifier`; compiles on first use."""
    return CompiledClassifier(model.eval(), options)
