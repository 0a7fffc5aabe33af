"""Int8 quantization of a classifier: ``quantize_(model, QuantConfig())``, torchao-style, in place.

Every ``nn.Linear`` becomes an :class:`Int8Linear`: int8 weights with one fp32 scale per output
channel, activations quantized dynamically to int8 with one scale per token, an int8 x int8 matmul
(:mod:`oztune.compress.int8_ops`). Activation codes are symmetric, except the feed-forward down-projection's
input: an activation's output with a known minimum (GELU: -0.17) is coded over [minimum, row max] (see
ACT_FLOORS). Token and position embeddings become :class:`Int8Embedding`
(int8 rows, one scale per row; weight-only). Modules named by ``skip`` stay fp32; a ``skip`` that leaves
nothing to quantize is refused. A model that runs compiled graphs (``compile=True``, an aoti export) is
refused by :func:`quantize_`, :func:`prepare_qat_` and ``prune_``: its graphs keep the old weights. Both take an
fp32 model (one from ``.half()`` or ``.to(torch.bfloat16)`` is a TypeError: their layers give fp32). Feed-forward blocks
become :class:`ChunkedFeedForward` (the same layers, run a few hundred tokens at a time so that the wide
intermediate stays in cache). For ``torch.compile`` on top see
:mod:`oztune.models.compiled`.

When post-training quantization loses too much, :func:`prepare_qat_` swaps the Linear and Embedding layers
for :class:`FakeQuantLinear` and :class:`FakeQuantEmbedding` (the same rounding, simulated in float with a
straight-through gradient) so the usual training loop can adapt the weights; :func:`quantize_` then converts
them.

Saving: quantized modules keep their state in buffers named like the float ones (``weight`` is int8,
plus ``weight_scale``), so ``save_classifier(..., quantization=quantization_record(cfg))`` writes them
to safetensors and ``load_classifier`` calls :func:`prepare_quantized` to rebuild the modules first
(``Int8Linear.weight_sums`` is not saved: it is derived from the weight on load).
"""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from oztune.compress.int8_ops import (WEIGHT_BITS, channel_scales, fake_quantize_from_floor, fake_quantize_per_channel,
                                      fake_quantize_per_token, fits_onednn, forget_pack, int8_linear, max_code,
                                      packed_weight, quantize_per_channel)
from oztune.errors import OztuneError
from oztune.models.transformer import FeedForward

SCHEMES = ("int8",)
EMBEDDINGS = ("int8", "none")
WEIGHT_BITS_CHOICES = (8, 7)
RECORD_VERSION = 1
# -floor <= act(x) <= max(max x, 0) for every x of a row: 0 <= act(x) <= x for x >= 0, and for x < 0 act(x) is
# in [-floor, 0] (GELU's minimum is -0.16997, tanh form -0.17004, near x = -0.75; ReLU gives 0). The int8
# feed-forward quantizes the down-projection's input over [-floor, max(max h, 0)] per row, both known before
# act(h) is computed: 255 steps over an interval barely wider than GELU's mostly positive values, where
# symmetric codes would spend half their levels on negative values that never come below -0.17. For GELU the
# upper bound exceeds the true maximum by max h - GELU(max h): 0.1% of it at max h = 3 (a feed-forward row's
# maximum is usually several units), 19% at 1, so a row's int8 step is at most that much coarser.
ACT_FLOORS = {"gelu": 0.1701, "gelu_tanh": 0.1701, "relu": 0.0}
CLIP_REFRESH = 16  # QAT: training passes between two searches of a 7-bit weight's clipping (FakeQuantLinear)
CHUNK_ROWS = 256  # tokens per thread in a feed-forward chunk: a (256, 1536) fp32 intermediate is 1.5 MB


@dataclass
class QuantConfig:
    """What to quantize, and how.

    Args:
        scheme: "int8": dynamic per-token int8 activations x per-channel int8 weights in every Linear.
        embeddings: "int8" (weight-only, one scale per row) or "none" (keep fp32).
        skip: glob patterns of module names kept in fp32, e.g. ["head.*", "backbone.layers.5.*"]; a pattern
            naming a module also keeps everything inside it.
        weight_bits: 8, or 7: the Linear weights' codes within +-63, which oneDNN's int8 kernel computes exactly
            on x86 CPUs without VNNI (AVX2), 1.2-1.5x as fast as an fp32 Linear there; wider codes run through an
            fp32 matmul on such CPUs (exact, no faster than fp32). Default (None): :data:`WEIGHT_BITS`, 7 on such a
            CPU, else 8. Embeddings are 8-bit either way.
    """

    scheme: str = "int8"
    embeddings: str = "int8"
    skip: list[str] = field(default_factory=list)
    weight_bits: int | None = None

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise OztuneError(f"quantization scheme must be one of {', '.join(SCHEMES)}, not {self.scheme!r}")
        if self.embeddings not in EMBEDDINGS:
            raise OztuneError(f"embeddings must be one of {', '.join(EMBEDDINGS)}, not {self.embeddings!r}")
        skip = [] if self.skip is None else self.skip.split(",") if isinstance(self.skip, str) else self.skip
        if not isinstance(skip, (list, tuple)) or not all(isinstance(p, str) for p in skip):  # ("a.*,b.*": the CLI's)
            raise OztuneError(f"skip must be a list of glob patterns of module names, not {self.skip!r}")
        self.skip = [p.strip() for p in skip if p.strip()]
        if self.weight_bits is None:
            self.weight_bits = WEIGHT_BITS
        if type(self.weight_bits) is not int or self.weight_bits not in WEIGHT_BITS_CHOICES:  # (not True, 7.0)
            raise OztuneError(f"weight_bits must be 8 or 7, not {self.weight_bits!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def check_fp32_apply(fn, device: torch.device) -> None:
    """Refuse a ``Module._apply`` (``.half()``, ``.to(torch.bfloat16)``, ``.double()``) that would turn fp32
    tensors into another dtype: int8 layers take and give fp32, so the LayerNorms after them would get fp32
    inputs with half-precision weights and fail deep inside the forward pass. Checked here, on a probe tensor
    (``fn`` of one fp32 scalar), once per conversion, so that the forward pass checks nothing. A TypeError."""
    dtype = fn(torch.zeros((), device=device)).dtype
    if dtype != torch.float32:
        raise TypeError(f"an int8-quantized model runs in fp32 (its int8 layers take and give fp32 tensors): "
                        f"it cannot be converted to {dtype}; keep it in fp32")


class Fp32Only(nn.Module):
    """A module whose tensors stay fp32 (:class:`Int8Linear`, :class:`Int8Embedding`): ``.half()`` and the like
    are refused (:func:`check_fp32_apply`); ``SequenceClassifier._apply`` asks :meth:`check_apply` first."""

    def check_apply(self, fn) -> None:
        check_fp32_apply(fn, self.weight.device)

    def _apply(self, fn, recurse=True):
        self.check_apply(fn)
        return super()._apply(fn, recurse)


class Int8Linear(Fp32Only):
    """A Linear with int8 weights (one fp32 scale per output row) and per-token int8 activations.

    Buffers (saved): ``weight`` int8 (out, in), ``weight_scale`` fp32 (out,), ``bias`` fp32 (out,) or absent.
    Not saved: ``weight_sums`` (out,), each output's sum of dequantized weights (for asymmetric inputs, see
    ``forward``), set from the weight on creation and on load. The oneDNN-packed copy of the weight is a
    cache, rebuilt whenever ``weight`` changes (e.g. on load).

    Args:
        in_features: input width K.
        out_features: output width N.
        bias: whether there is a bias.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.register_buffer("weight_sums", torch.zeros(out_features), persistent=False)
        self.register_load_state_dict_post_hook(Int8Linear._loaded)
        self.fits_onednn = fits_onednn(self.weight)  # set again by sum_weights

    @staticmethod
    def _loaded(module: "Int8Linear", _incompatible) -> None:  # (a named function: modules stay picklable)
        module.sum_weights()

    def sum_weights(self) -> None:
        """Set ``weight_sums`` from ``weight`` and ``weight_scale`` (after they change), and ``fits_onednn``, and
        pack the weight again on the next call (a change through ``weight.data`` bumps no version counter)."""
        forget_pack(self.weight)
        self.weight_sums = self.weight.sum(1, dtype=torch.float32) * self.weight_scale
        self.fits_onednn = fits_onednn(self.weight)  # (what the compiled graphs' kernel depends on)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 8) -> "Int8Linear":
        """An Int8Linear of ``linear``'s weight in ``bits``-bit codes (8, or 7: within +-63) and its bias."""
        q = cls(linear.in_features, linear.out_features, linear.bias is not None)
        q.weight, q.weight_scale = quantize_per_channel(linear.weight, bits)
        if linear.bias is not None:
            q.bias = linear.bias.detach().float().clone()
        q.sum_weights()
        return q

    def dequantized_weight(self) -> torch.Tensor:
        """The fp32 weight (out, in) the int8 one stands for."""
        return self.weight.float() * self.weight_scale[:, None]

    def packed_weight(self) -> torch.Tensor | None:
        """The weight as this CPU's kernel takes it (:func:`~oztune.compress.int8_ops.packed_weight`: cached,
        packed again whenever ``weight`` changes, e.g. on load)."""
        return packed_weight(self.weight)

    takes_bounds = True  # forward takes x's floor and its rows' maxima (ChunkedFeedForward passes them)

    def forward(self, x: torch.Tensor, top: torch.Tensor | None = None, lower: float | None = None) -> torch.Tensor:
        """``x @ weight.T + bias`` for x (..., in).

        Args:
            x: fp32 (..., in).
            top: (..., 1) with ``lower``: each row's largest ``x`` (or a bound on it), if known.
            lower: a bound no ``x`` is below (an activation's minimum): each row's int8 codes then span
                [lower, max x] rather than [-max |x|, max |x|] (asymmetric; about twice as fine for GELU).
                Trusted, not checked (a check would cost a pass): an ``x`` below it gives wrong codes.

        After changing ``weight`` or ``weight_scale`` other than by loading a state dict, call
        :meth:`sum_weights`.
        """
        # inference only (no gradient flows through an int8 matmul): an input that requires grad (an fp32
        # LayerNorm's output, autograd on) is taken detached, which addcmul(out=) needs; under no_grad or
        # inference_mode, as predict runs, nothing is done
        if x.requires_grad:
            x = x.detach()
        if top is not None and top.requires_grad:
            top = top.detach()
        lead = x.shape[:-1]
        if x.numel() == 0 or self.in_features == 0 or self.out_features == 0:
            y = x.new_zeros(*lead, self.out_features)
            return y + self.bias if self.bias is not None else y
        rows = x.reshape(-1, self.in_features)
        if rows.dtype != torch.float32 or not rows.is_contiguous():
            rows = rows.float().contiguous()
        if top is not None:
            top = top.reshape(-1, 1).float()
        y = int8_linear(rows, self.weight, self.weight_scale, self.bias, self.packed_weight, top,
                        lower, self.weight_sums, self.fits_onednn)  # (M, N)
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Embedding(Fp32Only):
    """An embedding table stored as int8 rows with one fp32 scale per row (weight-only quantization).

    Buffers (saved): ``weight`` int8 (num, dim), ``weight_scale`` fp32 (num,).

    Args:
        num_embeddings: rows.
        embedding_dim: width of a row.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.register_buffer("weight", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(num_embeddings))

    @classmethod
    def from_embedding(cls, emb: nn.Embedding) -> "Int8Embedding":
        q = cls(emb.num_embeddings, emb.embedding_dim)
        q.weight, q.weight_scale = quantize_per_channel(emb.weight)
        return q

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight).float().mul_(self.weight_scale[ids].unsqueeze(-1))  # (..., dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


class BoundedFeedForward(nn.Module):
    """A feed-forward block that tells its down-projection the range of its input, known before the
    activation runs (int8 and QAT: asymmetric codes over [-floor, max(max h, 0)] per token, see ACT_FLOORS).
    Holds the original ``up``/``down``/``act``: state-dict names do not change.

    Args:
        ffn: the FeedForward block to wrap (or another BoundedFeedForward).
    """

    def __init__(self, ffn: nn.Module):
        super().__init__()
        self.up, self.down, self.act, self.activation = ffn.up, ffn.down, ffn.act, ffn.activation
        # For these activations a row of act(h) lies in [-floor, max(max h, 0)], known before act(h) is
        # computed (see ACT_FLOORS). Compiled, inductor would otherwise evaluate the activation (erf, for
        # GELU) twice per element: once for the row maxima that quantize the down-projection's input, once
        # for the codes. (Bounding with act(max h), exact, was slower still: inductor recomputed that scalar
        # erf for every 16 elements.)
        self.act_floor = ACT_FLOORS.get(ffn.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)  # (M, F)
        # (not for a down-projection kept in float; nor a feed-forward pruned to width 0)
        if self.act_floor is None or not getattr(self.down, "takes_bounds", False) or h.shape[-1] == 0:
            return self.down(self.act(h))
        top = h.amax(-1, keepdim=True).clamp_min_(0)  # (M, 1) >= max act(h) per row
        return self.down(self.act(h), top, -self.act_floor)  # asymmetric codes over [-floor, top]


class ChunkedFeedForward(BoundedFeedForward):
    """A feed-forward block evaluated ``CHUNK_ROWS`` tokens per thread at a time (inference only).

    The (rows, F) intermediate between the up- and down-projection (int32/fp32 output, activation,
    int8 codes) then stays in the core's cache instead of streaming (M, F) through memory: for a batch
    of 64 SST-2 sentences (M ~ 1,800 tokens) the int8 FFN takes ~45% less time. Rows are independent,
    so the result is the same.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # compiled, inductor fuses instead
            return super().forward(x)
        rows = x.reshape(-1, x.shape[-1])  # (M, C)
        chunk = CHUNK_ROWS * torch.get_num_threads()  # each thread's share of a chunk stays in its core's cache
        if rows.shape[0] <= chunk:
            return super().forward(x)
        out = rows.new_empty(rows.shape[0], self.down.out_features)
        for part, dst in zip(rows.split(chunk), out.split(chunk)):
            dst.copy_(super().forward(part))
        return out.view(*x.shape[:-1], -1)


class FakeQuantLinear(nn.Linear):
    """A Linear that trains as it will run in int8: per-channel weight and per-token activation fake
    quantization with a straight-through gradient. Same parameters and state-dict names as nn.Linear.
    A feed-forward's down-projection gets its input's bounds from :class:`BoundedFeedForward`, as the int8
    layer does, and fake-quantizes on the same asymmetric grid."""

    takes_bounds = True  # as Int8Linear
    bits = 8  # the weight's codes: as Int8Linear.from_linear's
    _ratios: tuple[int, torch.Tensor] | None = None  # (bits, each row's clipping ratio) from the last search
    _ratios_age = 0  # training passes run with _ratios since clip_ratios found them

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 8) -> "FakeQuantLinear":
        fq = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        fq.weight, fq.bias = linear.weight, linear.bias  # shared, not copied
        fq.bits = bits
        return fq

    def forward(self, x: torch.Tensor, top: torch.Tensor | None = None, lower: float | None = None) -> torch.Tensor:
        """Args as :meth:`Int8Linear.forward`'s."""
        if self.in_features == 0 or x.numel() == 0:
            return super().forward(x)
        x = fake_quantize_per_token(x) if lower is None else fake_quantize_from_floor(x, lower, top)
        return F.linear(x, fake_quantize_per_channel(self.weight, self.bits, self.weight_scales()), self.bias)

    def weight_scales(self) -> torch.Tensor | None:
        """The weight's per-row scales (N, 1) for 7-bit codes, as :func:`~oztune.compress.int8_ops.channel_scales`
        makes them; None for 8-bit codes and in a compiled graph (computed there). Their search of each row's
        clipping makes 31 passes over the weight (QAT ran at 60 examples/s searching on every pass, 105 with
        this, as 8-bit QAT: BENCHMARKS.md), so in training (``train()`` and grad) the rows' clipping ratios of a
        search are kept for :data:`CLIP_REFRESH` passes (a step moves the weight little; the ranges are always
        the current weight's). Evaluation and :func:`quantize_` always search: what the int8 model computes.
        (Not a cache keyed on the weight's version: the fused AdamW that training uses leaves it unchanged.)"""
        if torch.compiler.is_compiling():
            return None
        if self.bits >= 8:
            self._ratios = None  # (7-bit ratios kept from before would be as old as these passes)
            return None
        w = self.weight.detach().float()
        keep = (self.training and torch.is_grad_enabled() and self._ratios is not None
                and self._ratios[0] == self.bits and self._ratios[1].shape[0] == w.shape[0]
                and self._ratios_age < CLIP_REFRESH)
        scales, ratios = channel_scales(w, self.bits, self._ratios[1] if keep else None)
        self._ratios = None if ratios is None else (self.bits, ratios)  # (None: a weight of no rows)
        self._ratios_age = self._ratios_age + 1 if keep else 1
        return scales


class FakeQuantEmbedding(nn.Embedding):
    """An Embedding that trains as it will run in int8 (:class:`Int8Embedding`: each row on its own symmetric
    grid), rounding only the rows it looks up, with a straight-through gradient. Same parameter and state-dict
    names as nn.Embedding."""

    @classmethod
    def from_embedding(cls, emb: nn.Embedding) -> "FakeQuantEmbedding":
        fq = cls(emb.num_embeddings, emb.embedding_dim, emb.padding_idx, device="meta")
        fq.weight = emb.weight  # shared, not copied
        return fq

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return fake_quantize_per_token(super().forward(ids))  # a looked-up row's grid is its table row's


def _skipped(name: str, patterns: list[str]) -> bool:
    """Whether a pattern matches the module's name or the name of a module containing it."""
    parts = name.split(".")
    prefixes = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    return any(fnmatch.fnmatchcase(p, pat) for pat in patterns for p in prefixes)


def _targets(model: nn.Module, config: QuantConfig) -> list[tuple[str, nn.Module]]:
    """(name, module) of every Linear and (unless embeddings is "none") Embedding to quantize.

    Token-type embeddings stay fp32: two rows gain nothing, and the backbone reads their weight directly.
    """
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Embedding)) and _converts(name, m, config)]


def _converts(name: str, m: nn.Module, config: QuantConfig) -> bool:
    """Whether ``config`` makes (or made) the module ``name`` int8: a Linear, or an Embedding other than the
    token-type one unless embeddings is "none", not skipped (``m`` float, or already int8). A Linear of one input
    feature stays fp32 (a feed-forward block pruned to one neuron: torch._int_mm on CPU gives garbage for K = 1,
    different on every call; the layer is a few numbers, so nothing is lost)."""
    if _skipped(name, config.skip):
        return False
    if isinstance(m, (nn.Linear, Int8Linear)):
        return m.in_features > 1
    return (isinstance(m, (nn.Embedding, Int8Embedding)) and config.embeddings == "int8"
            and not name.endswith("token_type"))


def check_record(model: nn.Module, quantization: dict | None) -> None:
    """Refuse to save ``model`` with a :func:`quantization_record` (or None) that would not rebuild its int8
    layers on load (:func:`prepare_quantized`): the directory written would not load. A model that still holds
    :func:`prepare_qat_`'s fake-quantized layers is refused too: saved, they are plain Linear and Embedding
    weights, and the model would reload as an fp32 one whose outputs differ from the fake-quantized model's."""
    fake = sorted(n for n, m in model.named_modules() if isinstance(m, (FakeQuantLinear, FakeQuantEmbedding)))
    if fake:
        raise OztuneError(f"the model holds fake-quantized layers from prepare_qat_ ({', '.join(fake[:3])}, ...): "
                          "convert it to int8 with quantize_(model, config) first, then save it with "
                          "quantization=quantization_record(config) (saved as it is, it would reload as a plain "
                          "fp32 model whose outputs differ)")
    int8 = {n for n, m in model.named_modules() if isinstance(m, (Int8Linear, Int8Embedding))}
    if not quantization:
        if int8:
            raise OztuneError(f"the model holds int8 layers ({', '.join(sorted(int8)[:3])}, ...): save it with "
                              "quantization=quantization_record(config), config the QuantConfig it was quantized with")
        return
    config = QuantConfig.from_dict(quantization)
    wanted = {n for n, m in model.named_modules() if _converts(n, m, config)}
    if int8 != wanted:
        odd = sorted(wanted - int8) or sorted(int8 - wanted)
        raise OztuneError(f"the quantization record (skip {config.skip}, embeddings {config.embeddings}) does not "
                          f"describe the model's int8 layers ({odd[0]} is {'not ' if odd[0] in wanted else ''}int8"
                          f"{'' if int8 else ': it holds no int8 layer'}): save it with the record of the QuantConfig "
                          "it was quantized with")


def check_not_compiled(model: nn.Module, action: str) -> None:
    """Refuse a model wrapped for compiled inference (``from_pretrained`` of an ``oztune export --format aoti``
    directory, or ``compile=True``): its graphs hold the weights as they were, so an in-place change would
    not reach most predictions (only the shapes that run eager)."""
    from oztune.models.compiled import CompiledClassifier

    if isinstance(model, CompiledClassifier):
        raise OztuneError(f"cannot {action} a model that runs compiled graphs (an aoti export or compile=True): "
                          "its graphs keep the weights they were built with; load it with "
                          "Classifier.from_pretrained(path, aot=False) or change its .eager model, then export again")


def _check_skip(model: nn.Module, config: QuantConfig) -> None:
    names = [n for n, _ in model.named_modules() if n]
    for pat in config.skip:
        if not any(_skipped(n, [pat]) for n in names):
            example = next((n for n in names if n.endswith(".qkv")), names[0] if names else "")
            raise OztuneError(f"skip pattern {pat!r} matches no module of the model "
                              f"(names look like {example!r}, 'head.out')")


def _chunk_feed_forwards(model: nn.Module) -> None:
    for name, m in list(model.named_modules()):
        if isinstance(m, FeedForward) or type(m) is BoundedFeedForward:  # (a QAT model's: see prepare_qat_)
            model.set_submodule(name, ChunkedFeedForward(m))


def check_fp32_model(model: nn.Module, action: str, why: str) -> None:
    """Refuse a model with floating parameters other than fp32 (``.half()``, ``.to(torch.bfloat16)``) before
    ``action`` changes anything: its converted layers compute in fp32, so the LayerNorms after them would get
    fp32 inputs with half-precision weights and fail deep inside the next forward. A TypeError."""
    name, p = next(((n, p) for n, p in model.named_parameters()
                    if p.is_floating_point() and p.dtype != torch.float32), (None, None))
    if p is not None:
        raise TypeError(f"{action} takes an fp32 model ({why}); it holds {p.dtype} weights (e.g. {name}): "
                        ".float() it first")


def quantize_(model: nn.Module, config: QuantConfig | None = None) -> nn.Module:
    """Quantize ``model`` in place (Linear -> Int8Linear, Embedding -> Int8Embedding) and return it.

    FakeQuantLinear and FakeQuantEmbedding layers from :func:`prepare_qat_` are converted like any Linear and
    Embedding.

    Args:
        model: a SequenceClassifier (any module works: every nn.Linear / nn.Embedding found is converted).
        config: what to quantize (default: QuantConfig()).
    """
    config = config or QuantConfig()
    check_not_compiled(model, "quantize")
    check_fp32_model(model, "quantize_", "int8 layers take and give fp32 tensors")
    _check_skip(model, config)
    targets = _targets(model, config)
    if not targets and is_int8(model):
        raise OztuneError("nothing to quantize: the model is already int8 (quantize_ converts it in place)")
    if not targets:  # a model recorded as quantized with no int8 layer: every later step would refuse it
        raise OztuneError(f"nothing to quantize: the skip patterns {', '.join(config.skip) or '(none)'} keep every "
                          f"Linear layer in fp32 (and the embeddings are {config.embeddings})")
    for name, m in targets:
        if isinstance(m, nn.Linear):
            q = Int8Linear.from_linear(m, config.weight_bits)
        else:
            q = Int8Embedding.from_embedding(m)
        model.set_submodule(name, q)
    _chunk_feed_forwards(model)
    return model


def prepare_quantized(model: nn.Module, quant: dict) -> None:
    """Swap in empty quantized modules where ``quant`` (a :func:`quantization_record`) put them, so that
    the saved int8 state dict loads. Called by ``load_classifier`` before ``load_state_dict``."""
    config = QuantConfig.from_dict(quant)
    for name, m in _targets(model, config):
        if isinstance(m, nn.Linear):
            q = Int8Linear(m.in_features, m.out_features, m.bias is not None)
        else:
            q = Int8Embedding(m.num_embeddings, m.embedding_dim)
        model.set_submodule(name, q)
    _chunk_feed_forwards(model)


def slow_codes_note(model: nn.Module) -> str | None:
    """Why this CPU runs a loaded int8 model slowly, or None: on a CPU without VNNI, int8 layers of 8-bit weight
    codes (quantized on a CPU with VNNI, or with ``weight_bits=8``) run exactly only through an fp32 matmul, slower
    than the fp32 model there."""
    from oztune.compress import int8_ops

    layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    wide = sum(not m.fits_onednn for m in layers)
    if not (int8_ops.ONEDNN_7BIT and wide):  # (a CPU with neither kernel: every int8 model runs that way)
        return None
    return (f"{wide} of its {len(layers)} int8 layers hold 8-bit weight codes, which this CPU (no VNNI) computes "
            "exactly only through fp32 matmuls, slower than the fp32 model; for int8 speed here, quantize the fp32 "
            "model on this CPU (oztune quantize gives 7-bit codes here)")


def quantization_record(config: QuantConfig) -> dict:
    """What ``save_classifier(..., quantization=...)`` stores in config.json: the config plus a description."""
    return {**asdict(config), "version": RECORD_VERSION,
            "weights": f"int8, symmetric, codes within +-{max_code(config.weight_bits)}, one scale per output channel "
                       "(embeddings: 8-bit, per row)",
            "activations": "int8, one scale per token, computed at run time: symmetric, except the "
                           "feed-forward down-projection's input (asymmetric, over [activation minimum, row max])"}


def prepare_qat_(model: nn.Module, config: QuantConfig | None = None) -> nn.Module:
    """Swap every Linear and Embedding that :func:`quantize_` would convert for a FakeQuantLinear or
    FakeQuantEmbedding (sharing its parameters), in place, for quantization-aware fine-tuning with the usual
    ``fit``: its forward computes what the int8 model will (up to the int8 kernel's rounding), so the
    evaluations during training are the int8 model's. Returns ``model``; one that already holds int8 layers
    is refused."""
    config = config or QuantConfig()
    check_not_compiled(model, "fine-tune with fake quantization")
    check_fp32_model(model, "prepare_qat_", "fake-quantized layers give fp32 tensors, as the int8 ones will")
    if is_int8(model):  # (its int8 layers would not train, and fit refuses the model)
        raise OztuneError("the model is already int8: quantization-aware fine-tuning starts from the fp32 model "
                          "(prepare_qat_, fit, then quantize_)")
    _check_skip(model, config)
    for name, m in _targets(model, config):
        if type(m) is not FakeQuantLinear and isinstance(m, nn.Linear):
            model.set_submodule(name, FakeQuantLinear.from_linear(m, config.weight_bits))
        elif type(m) is FakeQuantLinear:
            m.bits = config.weight_bits
        elif type(m) is not FakeQuantEmbedding and isinstance(m, nn.Embedding):
            model.set_submodule(name, FakeQuantEmbedding.from_embedding(m))
    for name, ffn in list(model.named_modules()):  # down-projections told their input's range, as in int8
        if isinstance(ffn, FeedForward):  # (one kept in fp32, or another activation: BoundedFeedForward runs it plainly)
            model.set_submodule(name, BoundedFeedForward(ffn))
    return model


def is_qat(model: nn.Module) -> bool:
    """Whether any layer of ``model`` is fake-quantized (from :func:`prepare_qat_`)."""
    return any(isinstance(m, (FakeQuantLinear, FakeQuantEmbedding)) for m in model.modules())


def is_int8(model: nn.Module) -> bool:
    """Whether any layer of ``model`` holds int8 weights (from :func:`quantize_`): they do not train."""
    return any(isinstance(m, (Int8Linear, Int8Embedding)) for m in model.modules())
