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

Without VNNI ``torch._int_mm`` is a reference loop too (3 GOP/s on a 2-core AVX2 EPYC, against 88 GFLOP/s for
an fp32 matmul there). oneDNN's kernel is exact there for weights of 7-bit codes (|code| <= 63: a pair of products
is at most 255 * 63 * 2 = 32130) and, quantization included, 1.2-1.5x as fast as an fp32 Linear at batch 64 (2-core
AVX2 EPYC, bench/int8.py --kernels; slower at batch 1): ``quantize_`` makes such weights on these
CPUs (:data:`WEIGHT_BITS`), and oneDNN's kernel then runs every size (:data:`ONEDNN_7BIT`; compiled graphs call it
through :func:`onednn_int8_mm`). A weight of wider codes
(quantized on a CPU with VNNI) goes through an fp32 matmul against its codes held as fp32 (:func:`pack_weight`),
every size: the products and sums are integers, exact in fp32 up to 2^24 (K * 127 * 128: about 1,000 inputs;
beyond, a relative 1e-7), so the result is the int8 one, at fp32 speed less the quantization passes, with the
weights 4x larger in memory (not on disk).

Per-token scales of large inputs come from ``amax`` and ``amin`` (two vectorised reductions; ``aminmax``
and the inf-norm are several times slower on CPU, ``abs()`` writes a temporary), rounding is in place,
and dequantization with the bias is one in-place ``addcmul``: besides the GEMMs, passes over memory and
(for small inputs) the number of ops are what int8 inference on CPU spends its time on.
"""

from __future__ import annotations

from typing import Callable

import torch

from oztune.models.kernels import cached_pack, forget

EPS = 1e-8  # smallest row amax: an all-zero (padding) row quantizes to zeros, never to NaN
ONEDNN_MIN_ROWS = 256  # from here on oneDNN's pre-packed kernel beats torch._int_mm


def _onednn_exact(code: int) -> bool:
    """Whether oneDNN's quantized linear is there and exact for weight codes up to ``code`` in size: on a CPU
    without VNNI (AVX2 only, or AVX-512 without VNNI) its u8 x s8 kernel sums pairs of products in int16
    (``vpmaddubsw``), which saturates at 32767 for large codes (255 * 127 * 2), and the outputs are wrong by up
    to half; with weight codes within +-63 the pairs fit (255 * 63 * 2 = 32130)."""
    try:
        if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")):
            return False
        wq = torch.full((2, 64), code, dtype=torch.int8)
        wq[1] = -code
        u8 = torch.full((1, 64), 255, dtype=torch.uint8)  # the largest products: saturated pairs show here
        y = torch.ops.onednn.qlinear_pointwise(u8, 1.0, 0, torch.ops.onednn.qlinear_prepack(wq, None),
                                               torch.ones(2), torch.zeros(2, dtype=torch.int64), None, 1.0, 0,
                                               torch.float32, "none", [], "")
        return y.tolist() == [[255.0 * code * 64, -255.0 * code * 64]]
    except (AttributeError, RuntimeError):
        return False


HAS_ONEDNN = _onednn_exact(127)  # exact for every int8 weight (a CPU with VNNI)
ONEDNN_7BIT = not HAS_ONEDNN and _onednn_exact(63)  # exact only for 7-bit weight codes (AVX2, AVX-512 without VNNI)
MAX_7BIT = 63  # the largest 7-bit weight code
WEIGHT_BITS = 7 if ONEDNN_7BIT else 8  # quantize_'s default: the widest weight codes this CPU's fast kernel takes


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


def max_code(bits: int) -> int:
    """The largest symmetric code of ``bits`` bits: 127 for 8, 63 for 7."""
    return 2 ** (bits - 1) - 1


def quantize_per_channel(w: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric quantization of each row of a weight ``w`` (N, K) to int8 codes of ``bits`` bits (8, or 7:
    each row's range then clipped as :func:`clip_ratios` finds best).

    Returns:
        (wq, scale): int8 codes (N, K) in [-m, m], m = 2^(bits-1) - 1, and fp32 scales (N,), ``w ~ wq * scale[:, None]``.
    """
    m = max_code(bits)
    w = w.detach().float()
    scale = channel_scales(w, bits)[0]  # (N, 1): the scales quantization-aware training rounds to
    return torch.round(w / scale).clamp_(-m, m).to(torch.int8), scale[:, 0]


CLIP_RATIOS = [1 - i / 100 for i in range(31)]  # 1.0, 0.99, ..., 0.70: the clippings clip_ratios tries


def clip_ratios(w: torch.Tensor, scale: torch.Tensor, m: int) -> torch.Tensor:
    """Each row's clipping ratio r (N,) among :data:`CLIP_RATIOS` whose scale ``scale * r`` gives codes (clamped to
    +-m) that reconstruct the row of ``w`` (N, K) with the least squared error (the widest where tied). For 7-bit
    codes a few clipped outliers buy a finer step for the rest (on the 8,000-example SST-2 MiniLM, a scratch
    comparison found the logits closer to fp32's); for 8-bit codes it did not, so they keep the full range. 31
    passes over ``w``: quantization-aware training keeps a weight's ratios for a few steps (``FakeQuantLinear``)."""
    best, best_err = torch.ones_like(scale), None
    for r in CLIP_RATIOS:
        s = (scale * r)[:, None]  # (N, 1)
        err = torch.round(w / s).clamp_(-m, m).mul_(s).sub_(w).square_().sum(-1)  # (N,)
        if best_err is None:
            best_err = err
        else:
            better = err < best_err
            best, best_err = torch.where(better, r, best), torch.where(better, err, best_err)
    return best


def fake_quantize_per_token(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded (in fp32) to its per-token int8 grid, with a straight-through gradient (identity)."""
    x = x.float()
    scale = (torch.maximum(x.amax(-1, keepdim=True), -x.amin(-1, keepdim=True)).clamp_min(EPS) / 127).detach()
    return x + ((x / scale).round() * scale - x).detach()


def fake_quantize_from_floor(x: torch.Tensor, lower: float, top: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` (all ``>= lower``) rounded to its per-token asymmetric grid of :func:`int8_linear_from_floor`
    (255 steps over [lower, top], ``top`` (..., 1) each row's bound, by default its max, as int8's), with a
    straight-through gradient (identity). The codes are computed as int8's are, ``x / scale + (-lower / scale
    - 128)`` rounded: in another order a value at a rounding boundary can round the other way."""
    x = x.float()
    top = x.amax(-1, keepdim=True) if top is None else top.float()
    scale = ((top - lower).clamp_min(EPS) / 255).detach()
    codes = (x.detach() / scale + ((-lower / scale) - 128)).round() + 128  # u in [0, 255]
    return x + (codes * scale + lower - x).detach()


def fake_quantize_per_channel(w: torch.Tensor, bits: int = 8, scale: torch.Tensor | None = None) -> torch.Tensor:
    """``w`` rounded (in fp32) to its per-output-row grid of ``bits``-bit codes (:func:`quantize_per_channel`'s),
    with a straight-through gradient (identity); ``scale`` (N, 1): the rows' scales if known (by default
    :func:`channel_scales`)."""
    w = w.float()
    m = max_code(bits)
    if scale is None:
        scale = channel_scales(w.detach(), bits)[0]
    return w + ((w / scale).round().clamp(-m, m) * scale - w).detach()


def channel_scales(w: torch.Tensor, bits: int = 8,
                   ratios: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The scales (N, 1) of :func:`fake_quantize_per_channel` for a float weight ``w`` (N, K): max |w| / m per row
    (m = 2^(bits-1) - 1; 1 for a row of zeros, or of values under EPS: its codes are zeros), for 7-bit codes times
    each row's clipping ratio: ``ratios`` (N,) if given, else :func:`clip_ratios`'s. Returns (scales, the ratios
    used: None for 8-bit codes)."""
    m = max_code(bits)
    amax = w.abs().amax(-1) if w.shape[-1] else w.new_zeros(w.shape[0])  # (amax of no columns raises)
    scale = torch.where(amax > EPS, amax / m, torch.ones_like(amax))
    if bits < 8 and w.numel():
        ratios = clip_ratios(w, scale, m) if ratios is None else ratios
        return (scale * ratios)[:, None], ratios
    return scale[:, None], None


def fits_onednn(wq: torch.Tensor) -> bool:
    """Whether oneDNN's kernel computes this int8 weight exactly on this CPU: every weight where
    :data:`HAS_ONEDNN`, one of 7-bit codes (within +-63) where :data:`ONEDNN_7BIT`."""
    return HAS_ONEDNN or (ONEDNN_7BIT and (wq.numel() == 0 or bool(-MAX_7BIT <= wq.min() and wq.max() <= MAX_7BIT)))


def pack_weight(wq: torch.Tensor) -> torch.Tensor | None:
    """The int8 weight (N, K) as the CPU's kernel for many rows takes it: pre-packed for oneDNN's (an int8 tensor)
    where that kernel is exact for these codes (:func:`fits_onednn`), else its codes as fp32 (N, K) for an fp32
    matmul; None off the CPU (``torch._int_mm``)."""
    if wq.device.type != "cpu":
        return None
    return torch.ops.onednn.qlinear_prepack(wq, None) if fits_onednn(wq) else wq.float()


_PACKS: dict[int, tuple] = {}  # wq.data_ptr() -> (weakref to wq, wq._version, pack_weight(wq))


def packed_weight(wq: torch.Tensor) -> torch.Tensor | None:
    """:func:`pack_weight` of ``wq``, cached while ``wq`` lives and is unchanged (packed again after an in-place
    change, e.g. a state dict loaded into it: :func:`~oztune.models.kernels.cached_pack`). The one cache of both
    paths: an eager Int8Linear passes its weight, a compiled graph (through :func:`onednn_int8_mm`) the same
    tensor on every call."""
    return cached_pack(_PACKS, wq, pack_weight)


def forget_pack(wq: torch.Tensor) -> None:
    """Drop ``wq``'s cached pack: for a change the version counter does not see (``wq.data`` written in place)."""
    forget(_PACKS, wq)


@torch.library.custom_op("oztune::onednn_int8_mm", mutates_args=())
def onednn_int8_mm(u8: torch.Tensor, zero_point: int, wq: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """``((u8 - zero_point) @ wq.T) * w_scale`` in fp32 (M, N) by oneDNN's kernel, for compiled graphs: inductor
    cannot trace oneDNN's packed weights, so the graph calls this op as it is, and the op packs ``wq`` once
    (:func:`packed_weight`; only for a ``wq`` that :func:`fits_onednn`)."""
    return torch.ops.onednn.qlinear_pointwise(u8, 1.0, zero_point, packed_weight(wq), w_scale,
                                              _zeros(w_scale.shape[0]), None, 1.0, 0, torch.float32, "none", [], "")


@onednn_int8_mm.register_fake
def _(u8: torch.Tensor, zero_point: int, wq: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    return u8.new_empty((u8.shape[0], wq.shape[0]), dtype=torch.float32)


IN_GRAPH = object()  # int8_linear's "packed weight" in a compiled graph: oneDNN's kernel through onednn_int8_mm


def _onednn_mm(u8: torch.Tensor, zero_point: int, pw, wq: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """``((u8 - zero_point) @ wq.T) * w_scale`` by oneDNN's kernel on ``pw``, wq packed (eager), or through
    :func:`onednn_int8_mm` (``pw`` is :data:`IN_GRAPH`: compiled)."""
    if pw is IN_GRAPH:
        return torch.ops.oztune.onednn_int8_mm(u8, zero_point, wq, w_scale)
    return torch.ops.onednn.qlinear_pointwise(u8, 1.0, zero_point, pw, w_scale, _zeros(w_scale.shape[0]), None,
                                              1.0, 0, torch.float32, "none", [], "")


def _codes_mm(q: torch.Tensor, wq: torch.Tensor, wf: torch.Tensor | None) -> torch.Tensor:
    """Int8 codes q (M, K) times the weight's (N, K), transposed: int32 from ``torch._int_mm``, or fp32 from an
    fp32 matmul with ``wf``, the weight's codes as fp32 (the CPUs where ``torch._int_mm`` is slow)."""
    return torch._int_mm(q, wq.t()) if wf is None else torch.mm(q.float(), wf.t())


def int8_linear(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                packed: Callable[[], torch.Tensor | None], top: torch.Tensor | None = None,
                lower: float | None = None, weight_sums: torch.Tensor | None = None,
                onednn: bool = False) -> torch.Tensor:
    """``x @ w.T + bias`` for a float ``x`` (M, K) and an int8 weight, activations quantized here per row.

    Below ``ONEDNN_MIN_ROWS`` rows ``torch._int_mm`` is faster (oneDNN's kernel costs more per call and
    builds a primitive for every new M); from there on oneDNN's saves the int32 output and a pass over it.

    Args:
        x: fp32 activations (M, K), contiguous.
        wq: int8 weight (N, K).
        w_scale: fp32 per-row weight scales (N,).
        bias: fp32 (N,) or None.
        packed: returns :func:`pack_weight` of ``wq`` (called only when oneDNN's kernel is used: eager, many
            rows; compiled, inductor fuses around ``torch._int_mm`` instead; or, eager, for every size on a CPU
            without VNNI: packed for oneDNN for 7-bit codes, else the weight's codes as fp32).
        lower: a bound no ``x`` is below (an activation's minimum, e.g. GELU's -0.17), for asymmetric codes:
            each row's 256 levels then span [lower, max x] instead of [-max |x|, max |x|], a step about half
            as large for an activation that is mostly positive (see :func:`int8_linear_from_floor`).
        top: (M, 1) with ``lower``: each row's largest ``x`` or a bound on it, when the caller knows it.
        weight_sums: (N,) ``wq.sum(1) * w_scale`` (each output's sum of weights), required with ``lower``.
        onednn: :func:`fits_onednn` of ``wq`` (known to the caller; the compiled graphs of a CPU without VNNI then
            call oneDNN's kernel through :func:`onednn_int8_mm`, where they otherwise run an fp32 matmul of the
            codes; not ``torch.export``, whose ahead-of-time packages cannot call a Python op).

    Returns:
        fp32 (M, N).
    """
    # compiled: one formula and one kernel for every size (inductor fuses around torch._int_mm; a branch on
    # the number of rows would be a guard, and a second graph to compile)
    compiling = torch.compiler.is_compiling()
    few_rows = compiling or x.shape[0] < ONEDNN_MIN_ROWS
    pw = wf = None
    if not HAS_ONEDNN and x.device.type == "cpu":  # torch._int_mm is slow here: oneDNN (7-bit weights) or fp32
        if compiling:  # (inductor fuses the quantization around either)
            if onednn and not torch.compiler.is_exporting():
                pw = IN_GRAPH
            else:
                wf = wq.float()
        else:  # every size
            pw = packed()
            if pw is not None and pw.dtype == torch.float32:  # the weight's codes as fp32: wider than oneDNN's here
                pw, wf = None, pw
    elif not few_rows:
        pw = packed()
    if lower is not None:
        return int8_linear_from_floor(x, wq, w_scale, bias, pw, top, lower, weight_sums, wf)
    q, scale = quantize_per_token(x, few_rows)
    if pw is not None:
        u8 = q.view(torch.uint8).bitwise_xor_(128)  # q + 128: oneDNN's fast kernel takes u8 with zero point 128
        y = _onednn_mm(u8, 128, pw, wq, w_scale)  # (q @ wq.T) * w_scale
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
        y = _onednn_mm(u8, 0, pw, wq, w_scale)  # (u @ wq.T) * w_scale
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
