"""oztune: fine-tune pre-trained transformers in plain PyTorch, then make them small and fast for CPU."""

from oztune.api import Classifier
from oztune.config import HeadConfig, ModelConfig
from oztune.errors import DataError, ModelError, OztuneError

__version__ = "0.1.0"
__all__ = ["Classifier", "HeadConfig", "ModelConfig", "OztuneError", "DataError", "ModelError", "__version__"]
