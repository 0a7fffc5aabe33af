"""Compression: int8 quantization, pruning and distillation, each a config dataclass and one function.

    from oztune.compress import (QuantConfig, quantize_, prepare_qat_, PruneConfig, prune_, DistillConfig, distill,
                                 TrainConfig)

(``prepare_qat_`` swaps in fake-quantized layers for quantization-aware fine-tuning before ``quantize_``;
``TrainConfig``, the shared training loop's settings, is :class:`oztune.train.loop.TrainConfig`: ``distill``
takes one.)

These names are imported on first use: they import torch, which the package itself does not, so that the command
line reads the compression commands' options (:mod:`oztune.compress.args`) without it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from oztune.compress.distillation import DistillConfig, distill  # noqa: F401
    from oztune.compress.prune import PruneConfig, prune_  # noqa: F401
    from oztune.compress.quantize import QuantConfig, prepare_qat_, quantize_  # noqa: F401
    from oztune.train.loop import TrainConfig  # noqa: F401

_HOMES = {"QuantConfig": "oztune.compress.quantize", "quantize_": "oztune.compress.quantize",
          "prepare_qat_": "oztune.compress.quantize", "PruneConfig": "oztune.compress.prune",
          "prune_": "oztune.compress.prune", "DistillConfig": "oztune.compress.distillation",
          "distill": "oztune.compress.distillation", "TrainConfig": "oztune.train.loop"}
__all__ = list(_HOMES)


def __getattr__(name: str):
    if name in _HOMES:
        value = getattr(importlib.import_module(_HOMES[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'oztune.compress' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
