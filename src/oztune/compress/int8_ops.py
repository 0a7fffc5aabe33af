"""Int8 kernels for CPU inference: per-token activation quantization and int8 x int8 matmuls.

Scheme: a weight (N, K) is stored as int8 ``wq`` with one fp32 scale per output row (symmetric,
``w ~ wq * w_scale[:, None]``); an activation (M, K) is quantized at run time with one scale per row
(token), ``x ~ xq * amax / 127``. Then ``y = (xq @ wq.T) * amax / 127 * w_scale + bias``. An input known to be
``>= lower`` (an activation's output, GELU's >= -0.17) is coded asymmetrically instead, over [lower, row max]
(:func:`int8_linear_from_floor`).

Two int8 kernels, both oneDNN underneath, chosen by the number of rows M (measured on a 2-core AVX512-VNNI
EPYC, bench/int8.py --kernels; both reach ~400 GOP/s per thread on large matrices, like ONNX Runtime's MLAS):

- M < ``ONEDNN_MIN_ROWS``: ``torch._int_mm`` (int32 out), then ``* w_scale``. Fewer ops and no primitive
  to build: at batch 1 (M ~ 25) it takes ~0.75x the time of the other.
- M >= ``ONEDNN_MIN_ROWS``: ``torch.ops.onednn.qlinear_pointwise`` (the op PyTorch's inductor lowers
  quantized linears to) on a weight pre-packed once into oneDNN's blocked layout. It applies ``w_scale``
  and writes fp32 directly, saving the int32 tensor and a pass over it. It wants unsigned activations
  with zero point 128, so the int8 codes get their sign bit flipped (``q + 128`` as uint8, a byte pass;
  asymmetric codes are flipped the same way and go in with zero point 0). Only where that kernel is exact
  (:data:`HAS_ONEDNN`): without VNNI (an AVX2-only CPU) it saturates.

Where that kernel is not exact (no VNNI), ``torch._int_mm`` is a reference loop too (3 GOP/s on a 2-core AVX2
EPYC, against 88 GFLOP/s for an fp32 matmul there: int8 ran 20x slower than fp32): the int8 codes then go through an
fp32 matmul against the weight's codes held as fp32 (:func:`pack_weight`), every size. The products and sums are
integers, exact in fp32 up to 2^24 (K * 127 * 128: about 1,000 inputs; beyond, a relative 1e-7), so the result is
the int8 one, at fp32 speed less the quantization passes, with the weights 4x larger in memory (not on disk).

Per-token scales of large inputs come from ``amax`` and ``amin`` (two vectorised reductions; ``aminmax``
and the inf-norm are several times slower on CPU, ``abs()`` writes a temporary), rounding is in place,
and dequantization with the bias is one in-place ``addcmul``: besides the GEMMs, passes over memory and
(for small inputs) the number of ops are what int8 inference on CPU spends its time on.
"""

from __future__ import annotations

from typing import Callable

import torch

EPS = 1e-8  # smallest row amax: an all-zero (padding) row quantizes to zeros, never to NaN
ONEDNN_MIN_ROWS = 256  # from here on oneDNN's pre-packed kernel beats torch._int_mm


def _has_onednn() -> bool:
    """Whether oneDNN's quantized linear is there and exact: on a CPU without VNNI (AVX2 only, or AVX-512
    without VNNI) its u8 x s8 kernel sums pairs of products in int16 (``vpmaddubsw``), which saturates at
    32767 for large codes (255 * 127 * 2), and the outputs are wrong by up to half; torch._int_mm is exact."""
    try:
        if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")):
            return False
        wq = torch.full((2, 64), 127, dtype=torch.int8)
        wq[1] = -127
        u8 = torch.full((1, 64), 255, dtype=torch.uint8)  # the largest products: saturated pairs show here
        y = torch.ops.onednn.qlinear_pointwise(u8, 1.0, 0, torch.ops.onednn.qlinear_prepack(wq, None),
                                               torch.ones(2), torch.zeros(2, dtype=torch.int64), None, 1.0, 0,
                                               torch.float32, "none", [], "")
        return y.tolist() == [[255.0 * 127 * 64, -255.0 * 127 * 64]]
    except (AttributeError, RuntimeError):
        return False


HAS_ONEDNN = _has_onednn()


def quantize_per_token(x: torch.Tensor, few_rows: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantization of each row of ``x`` (M, K).

    Args:
        x: fp32 (M, K).
        few_rows: compute the row maxima with the fewest operators (``|x|`` then one reduction), rather
            than with two vectorised reductions and no ``|x|`` temporary (faster on many rows, eager).

    Returns:
        (q, scale): int8 codes (M, K) in [-127, 127] and the row scales (M, 1), ``x ~ q * scale``.
    """
    if few_rows:
        amax = x.abs().amax(-1, keepdim=True)
    else:  # two vectorised reductions, no |x| temporary
        amax = torch.maximum(x.amax(-1, keepdim=True), x.amin(-1, keepdim=True).neg_())
    scale = amax.clamp_min_(EPS).div_(127)
    return torch.div(x, scale).round_().to(torch.int8), scale


def quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantization of each row of a weight ``w`` (N, K).

    Returns:
        (wq, scale): int8 codes (N, K) and fp32 scales (N,), ``w ~ wq * scale[:, None]``.
    """
    w = w.detach().float()
    amax = w.abs().amax(-1) if w.shape[-1] else w.new_zeros(w.shape[0])
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    return torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8), scale


def fake_quantize_per_token(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded (in fp32) to its per-token int8 grid, with a straight-through gradient (identity)."""
    x = x.float()
    scale = (torch.maximum(x.amax(-1, keepdim=True), -x.amin(-1, keepdim=True)).clamp_min(EPS) / 127).detach()
    return x + ((x / scale).round() * scale - x).detach()


def fake_quantize_from_floor(x: torch.Tensor, lower: float, top: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` (all ``>= lower``) rounded to its per-token asymmetric grid of :func:`int8_linear_from_floor`
    (255 steps over [lower, top], ``top`` (..., 1) each row's bound, by default its max, as int8's), with a
    straight-through gradient (identity)."""
    x = x.float()
    top = x.amax(-1, keepdim=True) if top is None else top.float()
    scale = ((top - lower).clamp_min(EPS) / 255).detach()
    return x + (((x - lower) / scale).round() * scale + lower - x).detach()


def fake_quantize_per_channel(w: torch.Tensor) -> torch.Tensor:
    """``w`` rounded (in fp32) to its per-output-row int8 grid, with a straight-through gradient (identity)."""
    w = w.float()
    scale = (w.abs().amax(-1, keepdim=True).clamp_min(EPS) / 127).detach()
    return w + ((w / scale).round() * scale - w).detach()


def pack_weight(wq: torch.Tensor) -> torch.Tensor | None:
    """The int8 weight (N, K) as the CPU's kernel for many rows takes it: pre-packed for oneDNN's, or, where that
    kernel is missing or not exact (:data:`HAS_ONEDNN`), its codes as fp32 (N, K) for an fp32 matmul; None off
    the CPU (``torch._int_mm``)."""
    if wq.device.type != "cpu":
        return None
    return torch.ops.onednn.qlinear_prepack(wq, None) if HAS_ONEDNN else wq.float()


def _codes_mm(q: torch.Tensor, wq: torch.Tensor, wf: torch.Tensor | None) -> torch.Tensor:
    """Int8 codes q (M, K) times the weight's (N, K), transposed: int32 from ``torch._int_mm``, or fp32 from an
    fp32 matmul with ``wf``, the weight's codes as fp32 (the CPUs where ``torch._int_mm`` is slow)."""
    return torch._int_mm(q, wq.t()) if wf is None else torch.mm(q.float(), wf.t())


def int8_linear(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                packed: Callable[[], torch.Tensor | None], top: torch.Tensor | None = None,
                lower: float | None = None, weight_sums: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ w.T + bias`` for a float ``x`` (M, K) and an int8 weight, activations quantized here per row.

    Below ``ONEDNN_MIN_ROWS`` rows ``torch._int_mm`` is faster (oneDNN's kernel costs more per call and
    builds a primitive for every new M); from there on oneDNN's saves the int32 output and a pass over it.

    Args:
        x: fp32 activations (M, K), contiguous.
        wq: int8 weight (N, K).
        w_scale: fp32 per-row weight scales (N,).
        bias: fp32 (N,) or None.
        packed: returns :func:`pack_weight` of ``wq`` (called only when oneDNN's kernel is used: eager, many
            rows; compiled, inductor fuses around ``torch._int_mm`` instead; or, eager, for every size where
            that kernel is not exact: the weight's codes as fp32).
        lower: a bound no ``x`` is below (an activation's minimum, e.g. GELU's -0.17), for asymmetric codes:
            each row's 256 levels then span [lower, max x] instead of [-max |x|, max |x|], a step about half
            as large for an activation that is mostly positive (see :func:`int8_linear_from_floor`).
        top: (M, 1) with ``lower``: each row's largest ``x`` or a bound on it, when the caller knows it.
        weight_sums: (N,) ``wq.sum(1) * w_scale`` (each output's sum of weights), required with ``lower``.

    Returns:
        fp32 (M, N).
    """
    # compiled: one formula and one kernel for every size (inductor fuses around torch._int_mm; a branch on
    # the number of rows would be a guard, and a second graph to compile)
    compiling = torch.compiler.is_compiling()
    few_rows = compiling or x.shape[0] < ONEDNN_MIN_ROWS
    if not HAS_ONEDNN and x.device.type == "cpu":  # torch._int_mm is slow here too: fp32 matmul of the codes
        pw, wf = None, (wq.float() if compiling else packed())
    else:
        pw, wf = (None if few_rows else packed()), None
    if lower is not None:
        return int8_linear_from_floor(x, wq, w_scale, bias, pw, top, lower, weight_sums, wf)
    q, scale = quantize_per_token(x, few_rows)
    if pw is not None:
        u8 = q.view(torch.uint8).bitwise_xor_(128)  # q + 128: oneDNN's fast kernel takes u8 with zero point 128
        y = torch.ops.onednn.qlinear_pointwise(u8, 1.0, 128, pw, w_scale, _zeros(w_scale.shape[0]), None,
                                               1.0, 0, torch.float32, "none", [], "")  # (q @ wq.T) * w_scale
    else:
        y = _codes_mm(q, wq, wf).mul(w_scale)  # int32 (or fp32) * fp32 -> fp32 in one pass
    if bias is None:
        return y.mul_(scale)
    return torch.addcmul(bias, y, scale, out=y)


def int8_linear_from_floor(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                           pw: torch.Tensor | None, top: torch.Tensor | None, lower: float,
                           weight_sums: torch.Tensor, wf: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`int8_linear` with asymmetric codes, for inputs known to be ``>= lower`` (``pw``: the packed
    weight, or None for ``torch._int_mm``, or for an fp32 matmul with ``wf``, the weight's codes as fp32;
    ``top``: each row's max or a bound on it, None: its max, as for :func:`fake_quantize_from_floor`, which QAT
    trains with).

    Each row is ``x ~ u * scale + lower`` with codes u = round((x - lower) / scale) in [0, 255] and
    scale = (max x - lower) / 255. So ``x @ W.T + b = scale * (u @ W.T) + (b + lower * W.sum(1))``: the
    lower bound is a constant, so its term is a per-output constant, not a per-token one. The codes are made
    as int8 ``u - 128`` (float to uint8 conversion is ~9x slower than to int8 on CPU, and ``addcdiv`` ~4x
    slower than ``div``: one in-place add per element more than symmetric codes); oneDNN gets them as
    uint8 u (the sign bit flipped, as in :func:`int8_linear`) with zero point 0, ``torch._int_mm`` as they
    are, with ``128 * W.sum(1)`` added back.
    """
    if top is None:
        top = x.amax(-1, keepdim=True)
    scale = (top - lower).clamp_min_(EPS).div_(255)  # (M, 1)
    start = (-lower / scale).sub_(128)  # (M, 1): the code of x = 0, minus 128
    codes = torch.div(x, scale).add_(start).round_().to(torch.int8)  # (M, K): u - 128
    if pw is not None:
        u8 = codes.view(torch.uint8).bitwise_xor_(128)  # u
        y = torch.ops.onednn.qlinear_pointwise(u8, 1.0, 0, pw, w_scale, _zeros(w_scale.shape[0]), None, 1.0, 0,
                                               torch.float32, "none", [], "")  # (u @ wq.T) * w_scale
    else:
        y = torch.addcmul(weight_sums * 128, _codes_mm(codes, wq, wf), w_scale)
    const = weight_sums * lower if bias is None else torch.add(bias, weight_sums, alpha=lower)  # (N,)
    return torch.addcmul(const, y, scale, out=y)


_ZEROS: dict[int, torch.Tensor] = {}


def _zeros(n: int) -> torch.Tensor:
    """The (n,) int64 zero points oneDNN's op takes for the weight (cached: it is called per layer)."""
    z = _ZEROS.get(n)
    if z is None:
        z = _ZEROS[n] = torch.zeros(n, dtype=torch.int64)
    return z
