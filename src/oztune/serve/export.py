"""Export a saved classifier to ONNX, fp32 or int8, with its tokenizer and label map beside it.

The graph is traced with the TorchScript exporter (``dynamo=False``: the torch.export-based exporter
needs onnxscript, and the model's "is anything padded?" branch is data-dependent; tracing with a
padded example keeps the masked path, which gives the same result when nothing is padded). Batch and
sequence axes are dynamic.

Int8 is oztune's own scheme (:mod:`oztune.compress.quantize`), written out op for op, so the ONNX
model gives the labels of ``oztune quantize``'s model: int8 weights with one scale per output
channel, activations quantized per token at run time, a ``MatMulInteger``. A quantized model
directory always exports as int8; ``int8=True`` quantizes a float model with the default
``QuantConfig`` first. (onnxruntime's own dynamic quantization uses one activation scale per batch,
which changed 1.3% of SST-2 dev labels against oztune's int8 model; this graph changed none, at about
the same speed.)

The output directory holds ``model.onnx``, the tokenizer files and a ``config.json`` whose
``oztune`` section describes the model, head and export; :class:`oztune.serve.backends.OnnxClassifier`
and ``oztune serve --backend onnx`` load it.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch
from torch import nn

from oztune.data.tokenize import TextEncoder
from oztune.errors import ModelError
# (ONNX_FILE and is_onnx_export are hub's, whose load_classifier refuses exports: hub cannot import this module)
from oztune.models.hub import ONNX_FILE, is_onnx_export, load_classifier, read_config, require_trained, resolve_model
from oztune.outdir import check_output_dir, is_model_file, staged_dir
from oztune.models.transformer import SequenceClassifier

OPSET = 17
FLOAT, UINT8 = 1, 2  # ONNX TensorProto data types


# The int8 weights are written as uint8 codes + 128 with this zero point: onnxruntime's u8 x s8 kernel sums pairs
# of products in int16 on CPUs without VNNI (AVX2, AVX-512 without VNNI), which saturates for large codes (wrong
# by up to half: seen on an AVX2 EPYC, 255 * 127 * 64 came out as 1,048,544, not 2,072,640); its u8 x u8 kernel
# is exact on every CPU, and ran as fast there (222 against 224 GOP/s at 1,600 x 384 x 1,152; s8 x s8: 45).
WEIGHT_ZERO_POINT = 128


def _const(g, v, dtype=torch.float32):
    """An ONNX Constant node holding ``v``."""
    return g.op("Constant", value_t=torch.tensor(v, dtype=dtype))


def _weight_zero_point(g):
    return _const(g, WEIGHT_ZERO_POINT, torch.uint8)


def _weight(wu_t: torch.Tensor) -> torch.Tensor:
    """The float weight (in, out) of uint8 codes + :data:`WEIGHT_ZERO_POINT` (the tracing arithmetic)."""
    return wu_t.float() - WEIGHT_ZERO_POINT


class _Int8LinearOp(torch.autograd.Function):
    """``x @ W.T + bias`` the way :class:`oztune.compress.quantize.Int8Linear` computes it, as ONNX ops.

    amax = max(ReduceMax(|x|), eps) per token;
    q = uint8(Round(x * 127 / amax) + 128);
    y = float(MatMulInteger(q, Wq.T + 128, zero points 128 and 128)) * amax / 127 * w_scale + bias.
    Codes and weights both go in as uint8 (:data:`WEIGHT_ZERO_POINT`), a u8 x u8 product, exact on every CPU.
    ``forward`` is the same arithmetic in float; it only runs while tracing.
    """

    @staticmethod
    def forward(ctx, x, wu_t, w_scale, bias):
        from oztune.compress.int8_ops import EPS

        amax = x.abs().amax(-1, keepdim=True).clamp_min(EPS)  # (..., 1)
        return ((x * (127.0 / amax)).round() @ _weight(wu_t)) * (amax * (1 / 127)) * w_scale + bias

    @staticmethod
    def symbolic(g, x, wu_t, w_scale, bias):
        from oztune.compress.int8_ops import EPS

        if g.opset >= 18:  # from opset 18 on, ReduceMax takes its axes as an input
            amax = g.op("ReduceMax", g.op("Abs", x), _const(g, [-1], torch.int64), keepdims_i=1)
        else:
            amax = g.op("ReduceMax", g.op("Abs", x), axes_i=[-1], keepdims_i=1)
        amax = g.op("Max", amax, _const(g, EPS))
        q = g.op("Mul", x, g.op("Div", _const(g, 127.0), amax))
        q = g.op("Cast", g.op("Add", g.op("Round", q), _const(g, 128.0)), to_i=UINT8)
        y = g.op("Cast", g.op("MatMulInteger", q, wu_t, _const(g, 128, torch.uint8), _weight_zero_point(g)), to_i=FLOAT)
        y = g.op("Mul", y, g.op("Mul", amax, _const(g, 1 / 127)))
        return g.op("Add", g.op("Mul", y, w_scale), bias)


class _Int8LinearFloorOp(torch.autograd.Function):
    """:class:`_Int8LinearOp` with asymmetric codes, for inputs known to be ``>= lower`` (the int8
    feed-forward's down-projection; :func:`oztune.compress.int8_ops.int8_linear_from_floor`):

    scale = max(top - lower, eps) / 255 per token (``top``: each row's max x, or a bound on it);
    u = uint8(Round((x - lower) / scale));
    y = float(MatMulInteger(u, Wq.T + 128, zero points 0 and 128)) * scale * w_scale + const,
    const = bias + lower * W.sum(1).
    """

    @staticmethod
    def forward(ctx, x, wu_t, w_scale, const, top, lower):
        from oztune.compress.int8_ops import EPS

        scale = (top - lower).clamp_min(EPS) / 255  # (..., 1)
        return (((x - lower) / scale).round() @ _weight(wu_t)) * scale * w_scale + const

    @staticmethod
    def symbolic(g, x, wu_t, w_scale, const, top, lower):
        from oztune.compress.int8_ops import EPS

        scale = g.op("Div", g.op("Max", g.op("Sub", top, _const(g, lower)), _const(g, EPS)), _const(g, 255.0))
        u = g.op("Cast", g.op("Round", g.op("Div", g.op("Sub", x, _const(g, lower)), scale)), to_i=UINT8)
        y = g.op("Cast", g.op("MatMulInteger", u, wu_t, _const(g, 0, torch.uint8), _weight_zero_point(g)), to_i=FLOAT)
        return g.op("Add", g.op("Mul", g.op("Mul", y, scale), w_scale), const)


class OnnxInt8Linear(nn.Module):
    """An exportable stand-in for an ``Int8Linear`` (same int8 weights and scales).

    Args:
        q: the quantized layer; its weight must have no zero-size dimension.
    """

    def __init__(self, q: nn.Module):
        super().__init__()
        wu = q.weight.t().to(torch.int16).add_(WEIGHT_ZERO_POINT).to(torch.uint8)  # the int8 codes + 128
        self.register_buffer("wu_t", wu.contiguous())  # uint8 (in, out)
        self.register_buffer("w_scale", q.weight_scale.float().clone())
        self.register_buffer("bias", q.bias.float().clone() if q.bias is not None else torch.zeros(q.out_features))
        self.register_buffer("weight_sums", q.weight_sums.float().clone())

    takes_bounds = True  # as Int8Linear: the int8 feed-forward passes its input's floor and rows' maxima

    def forward(self, x: torch.Tensor, top: torch.Tensor | None = None, lower: float | None = None) -> torch.Tensor:
        """As ``Int8Linear.forward``; with ``lower``, ``top`` is required (the int8 feed-forward passes both)."""
        if lower is None:
            return _Int8LinearOp.apply(x, self.wu_t, self.w_scale, self.bias)
        const = self.bias + lower * self.weight_sums  # (out,): folded into one constant by the exporter
        return _Int8LinearFloorOp.apply(x, self.wu_t, self.w_scale, const, top, float(lower))


def prepare_for_onnx(model: nn.Module) -> nn.Module:
    """Swap oztune's quantized modules (in place) for exportable ones that compute the same.

    Int8Linear -> :class:`OnnxInt8Linear` (or a float Linear when pruning left a zero-size weight).
    ``Int8Embedding`` exports as it is (Gather of the int8 rows and of their scales, Cast, Mul): the table
    stays int8.
    """
    from oztune.compress.quantize import Int8Linear

    for name, m in list(model.named_modules()):
        if isinstance(m, Int8Linear):
            if m.weight.numel():
                model.set_submodule(name, OnnxInt8Linear(m))
            else:
                linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
                if m.bias is not None:
                    linear.bias.data.copy_(m.bias)
                model.set_submodule(name, linear)
    return model


def _example_inputs(model: SequenceClassifier) -> tuple[torch.Tensor, ...]:
    """(input_ids, attention_mask[, token_type_ids]) of shape (2, 8), or shorter where the position window is
    (2 tokens at least: :func:`_load_exportable`), with padding in the second row; token types only where the
    model reads them (one row, RoBERTa's, ignores them: the graph would have no such input)."""
    T = min(8, model.cfg.max_length)
    ids = torch.full((2, T), min(5, model.cfg.vocab_size - 1), dtype=torch.long)
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, min(5, T - 1):] = 0  # padded, so that the trace records the masked attention path
    if model.cfg.type_vocab_size > 1:
        return ids, mask, torch.zeros_like(ids)
    return ids, mask


def export_torch_to_onnx(model: SequenceClassifier, path: Path, opset: int = OPSET) -> list[str]:
    """Trace a classifier (float, or int8 after :func:`prepare_for_onnx`) into an ONNX file; returns its input names."""
    args = _example_inputs(model)
    names = ["input_ids", "attention_mask", "token_type_ids"][:len(args)]
    axes = {n: {0: "batch", 1: "sequence"} for n in names} | {"logits": {0: "batch"}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the legacy-exporter and tracer warnings are expected here
        torch.onnx.export(model.eval(), args, str(path), input_names=names, output_names=["logits"],
                          dynamic_axes=axes, opset_version=opset, dynamo=False)
    return names


def export_onnx(model_dir: str | Path, output: str | Path, int8: bool = False, opset: int = OPSET) -> Path:
    """Export a saved model to ``output``/model.onnx with tokenizer and config.json; written atomically.

    Args:
        model_dir: a model directory (fine-tuned, pruned or quantized) or anything load_classifier takes.
        output: directory to write; replaced as a whole.
        int8: quantize a float model with oztune's default int8 scheme first (a quantized model is int8 anyway).
        opset: ONNX opset version (17 or later: LayerNormalization is one op).
    """
    from oztune.compress.sparse import to_dense_

    src, out = _source_and_output(model_dir, output)
    model, enc, meta = _load_exportable(src)
    to_dense_(model)  # unstructured-pruned layers: the exporter reads weights from the state dict
    quantization = read_config(src).get("oztune", {}).get("quantization")
    if int8 and not quantization:
        from oztune.compress.quantize import QuantConfig, quantization_record, quantize_

        quantize_(model, QuantConfig())
        quantization = quantization_record(QuantConfig())
    if quantization:
        prepare_for_onnx(model)
    with staged_dir(out) as tmp:
        inputs = export_torch_to_onnx(model, tmp / ONNX_FILE, opset)
        enc.save(tmp)
        (tmp / "config.json").write_text(json.dumps(_export_config(src, model, meta, enc.max_length, {
            "file": ONNX_FILE, "inputs": inputs, "opset": opset, "int8": bool(quantization),
            "quantization": quantization, "source": str(src)}), indent=2) + "\n")
    return out


def export_aoti(model_dir: str | Path, output: str | Path) -> Path:
    """Copy a saved model to ``output`` with its inference graphs compiled ahead of time in ``output``/aoti
    (:mod:`oztune.models.aot`), so that loading it runs compiled at once; written atomically.

    Args:
        model_dir: a model directory (fine-tuned, pruned or quantized).
        output: directory to write; replaced as a whole.
    """
    from oztune.compress.quantize import is_int8
    from oztune.models import aot

    src, out = _source_and_output(model_dir, output)
    model, _, meta = _load_exportable(src)
    with staged_dir(out) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True, ignore=lambda folder, names: _not_copied(src, folder, names))
        aot.build(model, tmp / aot.AOT_DIR, aot.weights_digest(tmp))
        # its own card: the source's (e.g. "int8 classifier (oztune quantize)", --model <the source>) was copied
        (tmp / "README.md").write_text(aoti_card(str(model_dir), str(output), meta["text_pairs"], is_int8(model)))
    return out


def _not_copied(src: Path, folder: str, names: list[str]) -> list[str]:
    """What an aoti export leaves out of the model directory ``src`` it copies: the top level's entries that a
    model save does not write (a user's notes: :func:`oztune.outdir.is_model_file`), the source's own graphs
    (built again) and the variants of a compress run (the kept model is the one at the top)."""
    if Path(folder) != src:
        return []
    from oztune.models import aot

    return [n for n in names if n in (aot.AOT_DIR, "variants") or not is_model_file(n)]


def aoti_card(source: str, output: str, text_pairs: bool | None, int8: bool) -> str:
    """The model card README.md of an aoti export: what it is, the command that made it, how to run it."""
    from oztune.models import aot
    from oztune.train.finetune import predict_usage

    command, call = predict_usage(output, text_pairs)
    return f"""# ahead-of-time compiled classifier (oztune export --format aoti)

- A copy of `{source}` ({'int8' if int8 else 'float'} weights, the same predictions) with its inference graphs compiled
  ahead of time (AOTInductor) in `{aot.AOT_DIR}/`, for this machine's CPU and torch version ({aot.AOT_DIR}/{aot.META}
  records them): loading it runs compiled at once; on another machine or torch version it runs eager, with a warning.
- Made with: `oztune export --model {source} --format aoti --output {output}`
- Metrics and training: see the source model's card, `{source}/README.md`.

```bash
{command}
oztune evaluate --model {output} --data dev.tsv
oztune serve --model {output}
```

```python
{call}
```
"""


def _source_and_output(model_dir: str | Path, output: str | Path) -> tuple[Path, Path]:
    """The model directory to export and the output, checked: not an export itself, not inside each other."""
    src, out = resolve_model(model_dir), Path(output)
    check_output_dir(output, inputs=(src,))  # (refuses the model directory, one inside it and one holding it)
    if is_onnx_export(src):  # (not another tool's model.onnx beside the weights)
        raise ModelError(f"{src}: already an ONNX export; give the model directory it was exported from")
    return src, out


def _load_exportable(src: Path) -> tuple[SequenceClassifier, TextEncoder, dict]:
    """:func:`load_classifier`'s model, encoder and meta, checked: a fine-tuned classifier whose position window
    holds the padded example batch the exports trace (2 tokens at least: one real, one padding)."""
    model, enc, meta = load_classifier(src)
    require_trained(meta, src)
    if model.cfg.max_length < 2:
        raise ModelError(f"{src}: its position window holds {model.cfg.max_length} token(s); exporting traces a "
                         "padded batch, which needs at least 2")
    return model, enc, meta


def _export_config(src: Path, model: SequenceClassifier, meta: dict, max_length: int, onnx_info: dict) -> dict:
    """The source's config.json with the resolved model, head, labels (and whether it was fine-tuned on text
    pairs, as :func:`load_classifier`'s ``meta`` says), tokenizer length and the export's description."""
    hf = {k: v for k, v in read_config(src).items() if k != "oztune"}
    id2label = meta["id2label"]
    hf.update(id2label={str(i): n for i, n in id2label.items()}, label2id={n: i for i, n in id2label.items()})
    hf["oztune"] = {"format": "onnx", "model": model.cfg.to_dict(), "head": model.head_cfg.to_dict(),
                    "max_length": max_length, "text_pairs": meta["text_pairs"], "onnx": onnx_info}
    return hf
