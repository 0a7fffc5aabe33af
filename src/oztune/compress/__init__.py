"""Compression: int8 quantization, pruning and distillation, each a config dataclass and one function.

    from oztune.compress import (QuantConfig, quantize_, prepare_qat_, PruneConfig, prune_, DistillConfig, distill,
                                 TrainConfig)

(``prepare_qat_`` swaps in fake-quantized layers for quantization-aware fine-tuning before ``quantize_``;
``TrainConfig``, the shared training loop's settings, is :class:`oztune.train.loop.TrainConfig`: ``distill``
takes one.)
"""

from oztune.compress.distill import DistillConfig, distill
from oztune.compress.prune import PruneConfig, prune_
from oztune.compress.quantize import QuantConfig, prepare_qat_, quantize_
from oztune.train.loop import TrainConfig

__all__ = ["QuantConfig", "quantize_", "prepare_qat_", "PruneConfig", "prune_", "DistillConfig", "distill",
           "TrainConfig"]
