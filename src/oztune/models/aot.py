"""Compiled inference without compiling at start: the two graphs of :mod:`oztune.models.compiled`, built
ahead of time with AOTInductor and saved beside the model.

``torch.compile`` costs 20-65 s in every new process (a server's replicas, a CLI call) before the first
answer. :func:`build` exports the classifier's two inference graphs once (``torch.export``: one text
without a mask; every batch, packed) and compiles each with AOTInductor into a ``.pt2`` package; a process
then loads them in a few tenths of a second (:func:`load`) and runs at ``torch.compile``'s speed
(bench/int8.py). ``oztune export --format aoti`` writes a model directory with the packages in ``aoti/``;
``Classifier.from_pretrained`` and ``oztune serve`` use them when present.

A package is machine code for this torch version and this CPU's vector instructions, with the weights
compiled in (``aoti/meta.json`` records both and a digest of the weights file): where one differs, or a
package does not load, the model runs eager, with a warning. Shapes the graphs were not built for (one row
with padding, one token) run eager too, so the eager model stays loaded beside the packages' own weights.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn

from oztune.models.compiled import CompiledClassifier
from oztune.models.hub import sha256_file
from oztune.models.packing import token_index

AOT_DIR = "aoti"
PACKED, SINGLE, META = "packed.pt2", "single.pt2", "meta.json"


class _Packed(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids, b, t, query_rows=None):
        return self.model(input_ids, attention_mask, token_type_ids, token_index=(b, t, query_rows))


class _Single(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, token_type_ids):
        return self.model(input_ids, None, token_type_ids)


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def weights_digest(model_dir: str | Path) -> str | None:
    """SHA-256 of the directory's weights file (the packages hold a copy of those weights), or None."""
    for name in WEIGHT_FILES:
        f = Path(model_dir) / name
        if f.is_file():
            return sha256_file(f)
    return None


# What oztune compiles into a package, raised whenever the model computes differently: a package built before
# would run the old arithmetic for the shapes it takes, eager code the new one for the others.
# 2: the int8 feed-forward's down-projection codes its input asymmetrically (oztune.compress.int8_ops).
GRAPHS = 2


def machine() -> dict:
    """What a package depends on: the torch version, the CPU's vector instruction set and oztune's graphs."""
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "graphs": GRAPHS}


def _built_for(meta: dict) -> str:
    return f"{meta.get('torch')} / {meta.get('cpu_capability')} / oztune graphs {meta.get('graphs', 1)}"


def _example(model: nn.Module) -> tuple[torch.Tensor, ...]:
    """A padded batch whose sizes all differ (B 3, T 7, N 15 real tokens), so no two get one symbol; T is
    shorter where the position window is (2 tokens at least: :func:`oztune.serve.export.export_aoti` checks),
    and never B."""
    B = 3
    T = min(7, model.cfg.max_length)
    T -= T == B
    ids = torch.full((B, T), min(5, model.cfg.vocab_size - 1), dtype=torch.long)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, min(5, T - 1):] = 0
    mask[2, min(3, T - 1):] = 0
    return ids, mask, torch.zeros_like(ids)


@torch.no_grad()
def build(model: nn.Module, out_dir: str | Path, weights: str | None = None) -> Path:
    """Export and compile ``model``'s two inference graphs into ``out_dir`` (``packed.pt2``, ``single.pt2``,
    ``meta.json``). Takes about a minute on 2 cores.

    Args:
        model: an eval-mode SequenceClassifier (float or int8), unchanged afterwards.
        out_dir: folder to write (created).
        weights: :func:`weights_digest` of the model directory the packages will sit in (checked at load).
    """
    model = model.eval()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids, mask, tt = _example(model)
    b, t, q = token_index(mask, model.pooled_positions(ids, mask))
    max_t = int(model.cfg.max_length)  # the position window (RoBERTa: the table's rows - 2)
    B = torch.export.Dim("batch", min=2, max=1 << 16)
    T = torch.export.Dim("tokens", min=2, max=max(3, max_t))
    N = torch.export.Dim("real_tokens", min=2, max=1 << 24)
    row = {0: B, 1: T}
    packed_args = (ids, mask, tt, b, t) + (() if q is None else (q,))
    packed_dims = (row, row, row, {0: N}, {0: N}) + (() if q is None else ({0: B},))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # export's notes on specialised constants are expected here
        packed = torch.export.export(_Packed(model), packed_args, dynamic_shapes=packed_dims, strict=True)
        single = torch.export.export(_Single(model), (ids[:1, :5], tt[:1, :5]),
                                     dynamic_shapes=({1: T}, {1: T}), strict=True)
        torch._inductor.aoti_compile_and_package(packed, package_path=str(out / PACKED))
        torch._inductor.aoti_compile_and_package(single, package_path=str(out / SINGLE))
    meta = {**machine(), "max_tokens": max_t, "query_rows": q is not None, "weights_sha256": weights}
    (out / META).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def _load_package(path: Path):
    """A package as a function of its input tensors returning its one output tensor.

    Through the package loader itself: ``torch._inductor.aoti_load_package`` does the same but first imports
    inductor's compiler (~2 s in a fresh process) and converts arguments through pytrees on every call.
    """
    loader_cls = getattr(getattr(torch._C, "_aoti", None), "AOTIModelPackageLoader", None)
    if loader_cls is None:  # another torch: the public way
        run = torch._inductor.aoti_load_package(str(path))
        return lambda *tensors: run(*tensors)
    loader = loader_cls(str(path), "model", False, 1, -1)  # model name, single-threaded, runners, device
    return lambda *tensors: loader.boxed_run(list(tensors))[0]


def load(model: nn.Module, model_dir: str | Path) -> CompiledClassifier | None:
    """``model`` wrapped to run the packages in ``model_dir``/aoti; None when there are none or they do not
    fit this machine (a warning says why)."""
    folder = Path(model_dir) / AOT_DIR
    if not (folder / META).is_file():
        return None
    try:  # written by build(); unreadable (cut short, edited by hand): the packages cannot be trusted either
        meta = json.loads((folder / META).read_text())
        max_t, with_query = int(meta["max_tokens"]), bool(meta["query_rows"])
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError) as e:
        warnings.warn(f"{folder / META}: unreadable ({type(e).__name__}: {e}): running eager (export it again)",
                      stacklevel=2)
        return None
    here = machine()
    if any(meta.get(k) != v for k, v in here.items()):
        warnings.warn(f"{folder}: built for {_built_for(meta)}, this is {_built_for(here)}: running eager "
                      f"(export it again here)", stacklevel=2)
        return None
    if meta.get("weights_sha256") and meta["weights_sha256"] != weights_digest(model_dir):
        warnings.warn(f"{folder}: built for other weights than {model_dir}'s: running eager (export it again)",
                      stacklevel=2)
        return None
    try:
        packed, single = _load_package(folder / PACKED), _load_package(folder / SINGLE)
    except Exception as e:  # noqa: BLE001 - any failure to load means: run eager
        warnings.warn(f"{folder}: the compiled packages do not load ({e}): running eager", stacklevel=2)
        return None

    def run_packed(ids, mask, tt, index):
        b, t, q = index
        if ids.shape[0] < 2 or ids.shape[1] < 2 or ids.shape[1] > max_t or b.shape[0] < 2:
            return None
        tt = torch.zeros_like(ids) if tt is None else tt
        return packed(ids, mask, tt, b, t, q) if with_query else packed(ids, mask, tt, b, t)

    def run_single(ids, tt):
        if ids.shape[0] != 1 or ids.shape[1] < 2 or ids.shape[1] > max_t:
            return None
        return single(ids, torch.zeros_like(ids) if tt is None else tt)

    return CompiledClassifier(model.eval(), graphs=(run_packed, run_single))
