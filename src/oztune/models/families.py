"""Checkpoint families: Hugging Face config <-> ModelConfig, and templated key maps for the weights.

Each family is data: a config translator, a key map from oztune names to HF names (``{i}`` stands for
the layer), the HF names of its standard classification head, and the keys a checkpoint may carry
that oztune does not use (buffers, pre-training heads). Adding a family means adding one entry here.

Key-map values are one HF name (copied), a tuple of three HF names (concatenated into the fused QKV
projection on load, split on save), and for GPT-2 a ``"T:"`` prefix (Conv1D stores weights transposed).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch

from oztune.config import HeadConfig, ModelConfig
from oztune.errors import ModelError

def _bert_layer(p: str) -> dict:
    """Key map of one BERT/RoBERTa layer under prefix ``p`` (``encoder.layer.{i}.``)."""
    m = {}
    for t in ("weight", "bias"):
        m[f"layers.{{i}}.attn.qkv.{t}"] = tuple(f"{p}attention.self.{n}.{t}" for n in ("query", "key", "value"))
        m[f"layers.{{i}}.attn.o.{t}"] = f"{p}attention.output.dense.{t}"
        m[f"layers.{{i}}.attn_norm.{t}"] = f"{p}attention.output.LayerNorm.{t}"
        m[f"layers.{{i}}.ffn.up.{t}"] = f"{p}intermediate.dense.{t}"
        m[f"layers.{{i}}.ffn.down.{t}"] = f"{p}output.dense.{t}"
        m[f"layers.{{i}}.ffn_norm.{t}"] = f"{p}output.LayerNorm.{t}"
    return m


def _bert_embeddings() -> dict:
    m = {f"embed.{a}.weight": f"embeddings.{b}_embeddings.weight"
         for a, b in (("word", "word"), ("position", "position"), ("token_type", "token_type"))}
    m.update({f"embed.norm.{t}": f"embeddings.LayerNorm.{t}" for t in ("weight", "bias")})
    return m


def _distilbert_keys() -> dict:
    p = "transformer.layer.{i}."
    m = {"embed.word.weight": "embeddings.word_embeddings.weight",
         "embed.position.weight": "embeddings.position_embeddings.weight"}
    for t in ("weight", "bias"):
        m[f"embed.norm.{t}"] = f"embeddings.LayerNorm.{t}"
        m[f"layers.{{i}}.attn.qkv.{t}"] = tuple(f"{p}attention.{n}_lin.{t}" for n in ("q", "k", "v"))
        m[f"layers.{{i}}.attn.o.{t}"] = f"{p}attention.out_lin.{t}"
        m[f"layers.{{i}}.attn_norm.{t}"] = f"{p}sa_layer_norm.{t}"
        m[f"layers.{{i}}.ffn.up.{t}"] = f"{p}ffn.lin1.{t}"
        m[f"layers.{{i}}.ffn.down.{t}"] = f"{p}ffn.lin2.{t}"
        m[f"layers.{{i}}.ffn_norm.{t}"] = f"{p}output_layer_norm.{t}"
    return m


def _gpt2_keys() -> dict:
    p = "h.{i}."
    m = {"embed.word.weight": "wte.weight", "embed.position.weight": "wpe.weight"}
    for t in ("weight", "bias"):
        T = "T:" if t == "weight" else ""
        m[f"layers.{{i}}.attn.qkv.{t}"] = f"{T}{p}attn.c_attn.{t}"
        m[f"layers.{{i}}.attn.o.{t}"] = f"{T}{p}attn.c_proj.{t}"
        m[f"layers.{{i}}.attn_norm.{t}"] = f"{p}ln_1.{t}"
        m[f"layers.{{i}}.ffn.up.{t}"] = f"{T}{p}mlp.c_fc.{t}"
        m[f"layers.{{i}}.ffn.down.{t}"] = f"{T}{p}mlp.c_proj.{t}"
        m[f"layers.{{i}}.ffn_norm.{t}"] = f"{p}ln_2.{t}"
        m[f"final_norm.{t}"] = f"ln_f.{t}"
    return m


class ConfigError(ModelError):
    """A config.json field a family cannot use, in the field's words; the loader says which file."""


# Hugging Face's activation names -> oztune's (``oztune.config.ACTIVATIONS``); any other is refused by name.
_HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
                   "relu": "relu", "tanh": "tanh", "silu": "silu", "swish": "silu", "quick_gelu": "quick_gelu"}


def _activation(hf: dict, key: str, default: str) -> str:
    name = hf.get(key, default)
    if name not in _HF_ACTIVATIONS:
        raise ConfigError(f"{key} {name!r} is not one oztune computes ({', '.join(sorted(_HF_ACTIVATIONS))})")
    return _HF_ACTIVATIONS[name]


def _refuse(hf: dict, options: dict) -> None:
    """Config options that change what the network computes and that oztune does not implement: an error
    naming them, not a model that silently computes something else than the checkpoint's."""
    for key, fine in options.items():
        if key in hf and hf[key] != fine:
            raise ConfigError(f"{key}: {hf[key]!r} changes the network in a way oztune does not "
                             f"implement (it computes {key}: {fine!r})")


def _bert_config(hf: dict, family: str, position_offset: int = 0) -> ModelConfig:
    act = _activation(hf, "hidden_act", "gelu")
    _refuse(hf, {"is_decoder": False, "position_embedding_type": "absolute"})
    return ModelConfig(
        family=family, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
        intermediate_size=hf["intermediate_size"], max_positions=hf.get("max_position_embeddings", 512),
        type_vocab_size=hf.get("type_vocab_size", 2), layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
        activation=act, position_offset=position_offset, pad_token_id=hf.get("pad_token_id", 0) or 0,
        hidden_dropout=hf.get("hidden_dropout_prob", 0.1), attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
    )


def _roberta_config(hf: dict, family: str) -> ModelConfig:
    """BERT's, with position ids numbered from ``pad_token_id + 1`` (RoBERTa, XLM-RoBERTa, CamemBERT)."""
    pad = hf.get("pad_token_id", 1)
    if not isinstance(pad, int) or isinstance(pad, bool):
        said = "null" if pad is None else repr(pad)
        raise ConfigError(f"pad_token_id is {said}; a {family} model numbers its positions from pad_token_id + 1: "
                          "expected an integer (RoBERTa's is 1)")
    return _bert_config(hf, family, position_offset=pad + 1)


def _distilbert_config(hf: dict, family: str) -> ModelConfig:
    return ModelConfig(
        family=family, vocab_size=hf["vocab_size"], hidden_size=hf["dim"], num_layers=hf["n_layers"],
        num_heads=hf["n_heads"], intermediate_size=hf["hidden_dim"],
        max_positions=hf.get("max_position_embeddings", 512), type_vocab_size=0, layer_norm_eps=1e-12,
        activation=_activation(hf, "activation", "gelu"), pad_token_id=hf.get("pad_token_id", 0) or 0,
        hidden_dropout=hf.get("dropout", 0.1), attention_dropout=hf.get("attention_dropout", 0.1),
    )


def _gpt2_config(hf: dict, family: str) -> ModelConfig:
    n_embd = hf["n_embd"]
    act = _activation(hf, "activation_function", "gelu_new")
    _refuse(hf, {"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "add_cross_attention": False})
    pad = hf.get("pad_token_id")
    pad = hf.get("eos_token_id", 50256) if pad is None else pad
    if pad is None:
        raise ConfigError("pad_token_id and eos_token_id are both null; GPT-2 pads batches with one of "
                         "them: expected an integer in either (GPT-2's eos is 50256)")
    if hf.get("pad_token_id") is None and not isinstance(pad, int):  # (transformers takes a list of eos ids)
        raise ConfigError(f"pad_token_id is not set and eos_token_id, which GPT-2 pads batches with then, is "
                          f"{pad!r}: expected an integer pad_token_id (e.g. one of the eos ids)")
    return ModelConfig(
        family=family, vocab_size=hf["vocab_size"], hidden_size=n_embd, num_layers=hf["n_layer"],
        num_heads=hf["n_head"], intermediate_size=hf.get("n_inner") or 4 * n_embd,
        max_positions=hf.get("n_positions", 1024), type_vocab_size=0,
        layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        activation=act,
        pre_norm=True, causal=True, pad_token_id=pad,
        hidden_dropout=hf.get("resid_pdrop", 0.1), attention_dropout=hf.get("attn_pdrop", 0.1),
    )


@dataclass
class Family:
    """What oztune needs to know to read and write one checkpoint family.

    Args:
        name: the family's ``model_type``.
        architecture: HF class name written to ``architectures`` for a sequence classifier.
        base_prefix: prefix of backbone keys inside a task model (``bert.``).
        keys: oztune template -> HF template (relative to base_prefix).
        head_keys: oztune head module -> HF module of the family's classification head.
        head: the family's standard head (what its ``ForSequenceClassification`` does).
        config: HF config dict -> ModelConfig.
        layers_key: the HF config's field holding the number of layers (kept right when pruning drops layers).
        ignore: regexes of checkpoint keys oztune does not use (buffers, pre-training heads).
        head_dropout_key: the HF config's field of its head's dropout (the HeadConfig's ``dropout``, written on
            save, read on load as transformers reads it), None where its head has none (GPT-2's ``score`` is
            one linear layer).
        head_dropout_fallback: what transformers uses when head_dropout_key is missing or null: another field of
            the HF config (BERT's ``hidden_dropout_prob``, 0.1 when missing too) or a number (DistilBERT's 0.2).
    """

    name: str
    architecture: str
    base_prefix: str
    keys: dict
    head_keys: dict
    head: dict
    config: Callable[[dict, str], ModelConfig]
    layers_key: str
    ignore: tuple = ()
    head_dropout_key: str | None = None
    head_dropout_fallback: str | float = 0.1


def _roberta_family(name: str, architecture: str) -> Family:
    """RoBERTa and the models that are RoBERTa under another ``model_type`` (XLM-RoBERTa, CamemBERT: the same
    network, the same key names under ``roberta.``; their tokenizers differ, and come with the checkpoint)."""
    return Family(
        name, architecture, "roberta.",
        {**_bert_embeddings(), **_bert_layer("encoder.layer.{i}.")},
        {"hidden.0": "classifier.dense", "out": "classifier.out_proj"},
        {"pooling": "cls", "hidden_sizes": ["C"], "activation": "tanh"},
        _roberta_config, "num_hidden_layers", (r"position_ids$", r"^lm_head\.", r"^pooler\.", r"^roberta\.pooler\."),
        "classifier_dropout", "hidden_dropout_prob",
    )


FAMILIES: dict[str, Family] = {
    "bert": Family(
        "bert", "BertForSequenceClassification", "bert.",
        {**_bert_embeddings(), **_bert_layer("encoder.layer.{i}.")},
        # BERT's pooler lives inside the base model: "bert.pooler.dense"
        {"hidden.0": "bert.pooler.dense", "out": "classifier"},
        {"pooling": "cls", "hidden_sizes": ["C"], "activation": "tanh"},
        _bert_config, "num_hidden_layers", (r"position_ids$", r"^cls\.", r"^bert\.embeddings\.position_ids"),
        "classifier_dropout", "hidden_dropout_prob",
    ),
    **{name: _roberta_family(name, arch) for name, arch in (
        ("roberta", "RobertaForSequenceClassification"), ("xlm-roberta", "XLMRobertaForSequenceClassification"),
        ("camembert", "CamembertForSequenceClassification"))},
    "distilbert": Family(
        "distilbert", "DistilBertForSequenceClassification", "distilbert.", _distilbert_keys(),
        {"hidden.0": "pre_classifier", "out": "classifier"},
        {"pooling": "cls", "hidden_sizes": ["C"], "activation": "relu"},
        _distilbert_config, "n_layers", (r"position_ids$", r"^vocab_(transform|layer_norm|projector)\."),
        "seq_classif_dropout", 0.2,
    ),
    "gpt2": Family(
        "gpt2", "GPT2ForSequenceClassification", "transformer.", _gpt2_keys(),
        {"out": "score"},
        {"pooling": "last", "hidden_sizes": [], "activation": "none", "out_bias": False},
        _gpt2_config, "n_layer", (r"\.attn\.(masked_)?bias$", r"^lm_head\."),
    ),
}


NATIVE_PREFIX = "oztune-"  # model_type of a directory in oztune's own format, which transformers must refuse


def family_of(hf_config: dict, where: str) -> Family:
    """The Family of an HF config dict; ModelError naming ``where`` if unsupported."""
    mt = hf_config.get("model_type")
    if isinstance(mt, str):  # oztune's own format: "oztune-bert" (see hub.save_classifier)
        mt = mt.removeprefix(NATIVE_PREFIX)
    if mt not in FAMILIES:
        raise ModelError(f"{where}: model_type {mt!r} is not supported; supported: {', '.join(FAMILIES)}")
    return FAMILIES[mt]


def hf_head_dropout(family: Family, hf_config: dict) -> float | None:
    """The dropout of the family's HF head as transformers builds it from ``hf_config`` (config.json): its
    head_dropout_key, or the fallback where that is missing or null (BERT's ``classifier_dropout`` null means
    ``hidden_dropout_prob``); None where the family's head has no dropout."""
    key, fallback = family.head_dropout_key, family.head_dropout_fallback
    if key is None:
        return None
    p, field = hf_config.get(key), key
    if p is None:
        p, field = (hf_config.get(fallback, 0.1), fallback) if isinstance(fallback, str) else (fallback, key)
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
        raise ConfigError(f"{field} {p!r} is not a dropout probability (a number in [0, 1))")
    return float(p)


def default_head(family: Family, hidden_size: int, num_labels: int, problem_type: str,
                 hf_config: dict | None = None) -> HeadConfig:
    """The family's standard classification head, as HF's ``ForSequenceClassification`` builds it; with
    ``hf_config`` (a checkpoint's config.json) its dropout is the one transformers reads from it."""
    h = dict(family.head)
    h["hidden_sizes"] = [hidden_size if s == "C" else s for s in h["hidden_sizes"]]
    p = hf_head_dropout(family, hf_config) if hf_config else None
    if p is not None:
        h["dropout"] = p
    return HeadConfig(num_labels=num_labels, problem_type=problem_type, **h)


def is_default_head(family: Family, cfg: ModelConfig, head: HeadConfig) -> bool:
    """Whether ``head`` has the shape of the family's HF head (so HF can load the saved model)."""
    d = default_head(family, cfg.hidden_size, head.num_labels, head.problem_type)
    return (d.pooling, d.hidden_sizes, d.activation, d.out_bias) == (
        head.pooling, head.hidden_sizes, head.activation, head.out_bias)


def expand(keys: dict, num_layers: int) -> dict:
    """Expand ``{i}`` templates into one entry per layer."""
    out = {}
    for oz, hf in keys.items():
        layers = range(num_layers) if "{i}" in oz else [None]
        for i in layers:
            fmt = (lambda s: s.format(i=i)) if i is not None else (lambda s: s)
            out[fmt(oz)] = tuple(fmt(h) for h in hf) if isinstance(hf, tuple) else fmt(hf)
    return out


def hf_to_oztune(sd: dict[str, torch.Tensor], family: Family, cfg: ModelConfig, where: str,
                 expect_head: bool, head_in_oztune_names: bool = False) -> tuple[dict, dict]:
    """Convert an HF state dict to oztune's (backbone, head) state dicts.

    Strict: a backbone key the checkpoint lacks, or a checkpoint key that is neither mapped nor in the
    family's ignore list, is a ModelError naming it. Head keys are optional unless ``expect_head``.
    """
    prefix = family.base_prefix if any(k.startswith(family.base_prefix) for k in sd) else ""
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        transpose = name.startswith("T:")
        name = name[2:] if transpose else name
        key = prefix + name
        if key not in sd:
            raise ModelError(f"{where}: missing weight {key!r} (needed for a {family.name} model)")
        used.add(key)
        return sd[key].t() if transpose else sd[key]

    backbone = {}
    for oz, hf in expand(family.keys, cfg.num_layers).items():
        if oz.startswith("embed.token_type") and not cfg.type_vocab_size:
            continue
        backbone[oz] = torch.cat([take(h) for h in hf]) if isinstance(hf, tuple) else take(hf)

    head = {}
    if head_in_oztune_names:
        for k in sd:
            if k.startswith("head."):
                head[k[5:]] = sd[k]
                used.add(k)
    else:
        for oz_mod, hf_mod in family.head_keys.items():
            # The BERT pooler lives in the base model; it also appears without the prefix in bare checkpoints.
            candidates = [hf_mod, hf_mod[len(family.base_prefix):]] if hf_mod.startswith(family.base_prefix) else [hf_mod]
            for cand in candidates:
                if f"{cand}.weight" in sd or f"{cand}.bias" in sd:  # a lone bias: _load_head names the weight
                    for t in ("weight", "bias"):
                        if f"{cand}.{t}" in sd:
                            head[f"{oz_mod}.{t}"] = sd[f"{cand}.{t}"]
                            used.add(f"{cand}.{t}")
                    break
    if expect_head and "out.weight" not in head:
        raise ModelError(f"{where}: no classification head in the checkpoint (expected {family.head_keys['out']}.weight)")
    unexpected = [k for k in sd if k not in used and not any(re.search(p, k) for p in family.ignore)]
    if unexpected:
        more = f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        raise ModelError(f"{where}: unexpected weight(s) {', '.join(unexpected[:5])}{more} for a {family.name} model")
    return backbone, head


def oztune_to_hf(backbone: dict, head: dict, family: Family, cfg: ModelConfig, hf_head: bool) -> dict:
    """Convert oztune's state dicts to HF names (the inverse of :func:`hf_to_oztune`)."""
    out = {}
    for oz, hf in expand(family.keys, cfg.num_layers).items():
        if oz not in backbone:
            continue
        t = backbone[oz]
        if isinstance(hf, tuple):
            for name, part in zip(hf, t.chunk(3)):
                out[family.base_prefix + name] = part
        elif hf.startswith("T:"):
            out[family.base_prefix + hf[2:]] = t.t()
        else:
            out[family.base_prefix + hf] = t
    for k, t in head.items():
        if hf_head:
            mod, _, kind = k.rpartition(".")
            out[f"{family.head_keys[mod]}.{kind}"] = t
        else:
            out[f"head.{k}"] = t
    return {k: v.contiguous() for k, v in out.items()}
