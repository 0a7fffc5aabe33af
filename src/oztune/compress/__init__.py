"""Compression: int8 quantization, pruning and distillation, each a config dataclass and one function.

    from oztune.compress import QuantConfig, quantize_, PruneConfig, prune_, DistillConfig, distill
"""

from oztune.compress.distill import DistillConfig, distill
from oztune.compress.prune import PruneConfig, prune_
from oztune.compress.quantize import QuantConfig, quantize_

__all__ = ["QuantConfig", "quantize_", "PruneConfig", "prune_", "DistillConfig", "distill"]
