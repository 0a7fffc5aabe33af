"""oztune: fine-tune pre-trained transformers in plain PyTorch, then make them small and fast for CPU."""

from __future__ import annotations

from typing import TYPE_CHECKING

from oztune.config import HeadConfig, ModelConfig
from oztune.errors import DataError, ModelError, OztuneError

if TYPE_CHECKING:
    from oztune.api import Classifier

__version__ = "0.1.0"
__all__ = ["Classifier", "HeadConfig", "ModelConfig", "OztuneError", "DataError", "ModelError", "__version__"]


def __getattr__(name: str):
    """``oztune.Classifier``, imported on first use: it imports torch (~1.5 s), which the package itself does not,
    so that the command line (``oztune.cli``, imported through this package) starts, and takes Ctrl-C as a stop
    (exit 130), before torch is imported."""
    if name == "Classifier":
        from oztune.api import Classifier

        globals()["Classifier"] = Classifier
        return Classifier
    raise AttributeError(f"module 'oztune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
