"""Pruning: structured (heads, FFN neurons, whole layers: smaller matrices, less CPU time) and unstructured.

Structured pruning ranks every attention head, FFN neuron and layer by first-order Taylor importance,
|dL/dg| of a gate g = 1 multiplying its output (Michel et al., 2019; Molchanov et al., 2019), summed
over training batches, then slices the fused QKV rows, output columns and FFN rows/columns of what is
removed. The per-layer sizes go into ``ModelConfig.layer_heads`` / ``layer_ffn`` / ``num_layers``, so
the saved model reloads with the smaller shapes.

Unstructured pruning zeroes the globally smallest encoder weights on a gradual cubic schedule during
fine-tuning (Zhu & Gupta, 2017) and stores each sparse matrix as a bitmask plus its non-zero values.

Vocabulary pruning keeps only the token-embedding rows of tokens seen in training (the table is half
of MiniLM's weights); ids are remapped inside the model, so the tokenizer stays as it is.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from oztune.data.dataset import EncodedData, train_batches
from oztune.errors import OztuneError
from oztune.models.hub import save_classifier
from oztune.models.transformer import SequenceClassifier
from oztune.train.finetune import RecipeOptions
from oztune.train.loop import TrainConfig, evaluate

ENCODER_LINEARS = ("attn.qkv", "attn.o", "ffn.up", "ffn.down")
_HF_LAYER_KEY = {"bert": "num_hidden_layers", "roberta": "num_hidden_layers", "distilbert": "n_layers",
                 "gpt2": "n_layer"}


@dataclass
class PruneConfig:
    """What to prune.

    Args:
        sparsity: unstructured: share of encoder Linear weights set to zero, by global magnitude, in [0, 1).
        heads: structured: share of the attention heads (of the layers kept) to remove, in [0, 1).
        ffn: structured: share of the feed-forward neurons (of the layers kept) to remove, in [0, 1).
        layers: structured: number of whole layers to remove.
        importance_batches: training batches over which importance is measured.
        batch_size: examples per importance batch.
    """

    sparsity: float = 0.0
    heads: float = 0.0
    ffn: float = 0.0
    layers: int = 0
    importance_batches: int = 32
    batch_size: int = 32

    def __post_init__(self) -> None:
        for name in ("sparsity", "heads", "ffn"):
            v = getattr(self, name)
            if not 0 <= v < 1:
                raise OztuneError(f"--{name} must be in [0, 1), not {v}")
        if self.layers < 0:
            raise OztuneError(f"--layers must be 0 or more, not {self.layers}")

    @property
    def structured(self) -> bool:
        return bool(self.heads or self.ffn or self.layers)


def prune_(model: SequenceClassifier, config: PruneConfig, data: EncodedData | None = None) -> SequenceClassifier:
    """Prune ``model`` in place: structured parts first (ranked on ``data``), then one-shot magnitude sparsity.

    Args:
        model: the classifier.
        config: what to prune.
        data: labelled training data; needed for structured pruning (importance).
    """
    if config.structured:
        if data is None or data.labels is None:
            raise OztuneError("structured pruning needs labelled training data to rank heads, neurons and layers")
        if config.layers >= model.cfg.num_layers:
            raise OztuneError(f"--layers {config.layers}: the model has only {model.cfg.num_layers} layers")
        scores = importance(model, data, config.importance_batches, config.batch_size)
        shrink_(model, *choose(model, scores, config))
    if config.sparsity:
        magnitude_prune_(model, config.sparsity)
    return model


# --- structured ---------------------------------------------------------------------------------------------

@dataclass
class Importance:
    """Taylor importance: per layer, one score per head (H,), per FFN neuron (F,), and one per layer (L,)."""

    heads: list[torch.Tensor]
    ffn: list[torch.Tensor]
    layers: torch.Tensor


def importance(model: SequenceClassifier, data: EncodedData, batches: int = 32, batch_size: int = 32,
               seed: int = 0) -> Importance:
    """Sum over training batches of |dL/dg| for gates on every head, FFN neuron and layer (hard-label loss).

    Gates: head outputs are scaled before ``attn.o``, neurons before ``ffn.down``, and a layer's output
    is ``x + g * (block(x) - x)`` so that g = 0 is the layer removed.
    """
    cfg = model.cfg
    heads = [torch.ones(h, requires_grad=True) for h in cfg.layer_heads]
    ffn = [torch.ones(f, requires_grad=True) for f in cfg.layer_ffn]
    layer = torch.ones(cfg.num_layers, requires_grad=True)
    hooks = []
    for i, block in enumerate(model.backbone.layers):
        D = block.attn.head_dim
        hooks.append(block.attn.o.register_forward_pre_hook(
            lambda m, a, g=heads[i], D=D: (a[0] * g.repeat_interleave(D),)))  # (B, T, H*D)
        hooks.append(block.ffn.down.register_forward_pre_hook(lambda m, a, g=ffn[i]: (a[0] * g,)))  # (B, T, F)
        hooks.append(block.register_forward_hook(lambda m, a, out, i=i: a[0] + layer[i] * (out - a[0])))
    sums = Importance([torch.zeros(h) for h in cfg.layer_heads], [torch.zeros(f) for f in cfg.layer_ffn],
                      torch.zeros(cfg.num_layers))
    was_training, grads_on = model.training, [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)  # only the gates need gradients
    try:
        for idx in train_batches(data.lengths, batch_size, seed)[:max(1, batches)]:
            b = data.batch(idx)
            logits = model(b["input_ids"], b["attention_mask"], b["token_type_ids"], all_tokens=True)  # gates see every row
            loss = model.loss(logits, b["labels"])
            g = torch.autograd.grad(loss, [*heads, *ffn, layer], allow_unused=True)
            L = cfg.num_layers
            for i in range(L):
                sums.heads[i] += _abs(g[i], heads[i])
                sums.ffn[i] += _abs(g[L + i], ffn[i])
            sums.layers += _abs(g[-1], layer)
    finally:
        for h in hooks:
            h.remove()
        for p, on in zip(model.parameters(), grads_on):
            p.requires_grad_(on)
        model.train(was_training)
    return sums


def _abs(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return grad.abs() if grad is not None else torch.zeros_like(like)


def choose(model: SequenceClassifier, scores: Importance, config: PruneConfig
           ) -> tuple[list[int], list[list[int]], list[list[int]]]:
    """Which layers, heads and neurons to keep: (layers, heads per kept layer, neurons per kept layer).

    The ``config.layers`` least important layers go; heads and neurons are ranked across the kept layers
    on scores normalised per layer (L2), keeping at least one head and one neuron in each layer.
    """
    L = model.cfg.num_layers
    drop = set(torch.argsort(scores.layers)[:config.layers].tolist())
    layers = [i for i in range(L) if i not in drop]
    heads = _global_keep([scores.heads[i] for i in layers], config.heads)
    ffn = _global_keep([scores.ffn[i] for i in layers], config.ffn)
    return layers, heads, ffn


def _global_keep(per_layer: list[torch.Tensor], share: float) -> list[list[int]]:
    """Indices kept in each layer after removing ``share`` of all units by per-layer-normalised score."""
    norm = [s / s.norm().clamp_min(1e-12) for s in per_layer]
    flat = torch.cat([s.double() for s in norm])
    n_remove = round(share * flat.numel())
    layer_of = torch.cat([torch.full((len(s),), i) for i, s in enumerate(norm)])
    unit_of = torch.cat([torch.arange(len(s)) for s in norm])
    left = [len(s) for s in norm]
    removed = [set() for _ in norm]
    for j in torch.argsort(flat, stable=True).tolist():
        if n_remove == 0:
            break
        i = int(layer_of[j])
        if left[i] > 1:
            removed[i].add(int(unit_of[j]))
            left[i] -= 1
            n_remove -= 1
    return [[u for u in range(len(s)) if u not in removed[i]] for i, s in enumerate(norm)]


def _sliced(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    """A new Linear holding the given output rows and input columns of ``linear``."""
    w = linear.weight.detach()
    w = w[rows] if rows is not None else w
    w = w[:, cols] if cols is not None else w
    new = nn.Linear(w.shape[1], w.shape[0], bias=linear.bias is not None)
    with torch.no_grad():
        new.weight.copy_(w)
        if linear.bias is not None:
            new.bias.copy_(linear.bias.detach()[rows] if rows is not None else linear.bias.detach())
    return new


def shrink_(model: SequenceClassifier, layers: list[int], heads: list[list[int]], ffn: list[list[int]]
            ) -> SequenceClassifier:
    """Physically remove what is not kept: layers, then heads and neurons within each kept layer.

    Args:
        model: the classifier, changed in place (its ``cfg`` too).
        layers: indices of the layers kept, in order.
        heads: for each kept layer, indices of its heads kept.
        ffn: for each kept layer, indices of its FFN neurons kept.
    """
    cfg = model.cfg
    blocks = [model.backbone.layers[i] for i in layers]
    for block, keep_h, keep_f in zip(blocks, heads, ffn):
        attn, H, D = block.attn, block.attn.num_heads, block.attn.head_dim
        if len(keep_h) < H:
            h = torch.as_tensor(keep_h, dtype=torch.long)
            cols = (h[:, None] * D + torch.arange(D)).reshape(-1)  # (H'*D,) columns of o
            rows = torch.cat([part * H * D + cols for part in range(3)])  # q, k, v rows of qkv
            attn.qkv, attn.o, attn.num_heads = _sliced(attn.qkv, rows=rows), _sliced(attn.o, cols=cols), len(keep_h)
        if len(keep_f) < block.ffn.up.out_features:
            f = torch.as_tensor(keep_f, dtype=torch.long)
            block.ffn.up, block.ffn.down = _sliced(block.ffn.up, rows=f), _sliced(block.ffn.down, cols=f)
    model.backbone.layers = nn.ModuleList(blocks)
    cfg.num_layers = len(blocks)
    cfg.layer_heads = [b.attn.num_heads for b in blocks]
    cfg.layer_ffn = [b.ffn.up.out_features for b in blocks]
    hf = getattr(model, "hf_config", None)
    if hf and _HF_LAYER_KEY.get(cfg.family) in hf:
        hf[_HF_LAYER_KEY[cfg.family]] = cfg.num_layers  # a model with fewer full layers stays HF-loadable
    return model


def drop_layers_(model: SequenceClassifier, keep: list[int]) -> SequenceClassifier:
    """Keep only the layers ``keep`` (whole, unpruned inside)."""
    blocks = [model.backbone.layers[i] for i in keep]
    return shrink_(model, keep, [list(range(b.attn.num_heads)) for b in blocks],
                   [list(range(b.ffn.up.out_features)) for b in blocks])


def evenly_spaced(num_layers: int, n: int) -> list[int]:
    """``n`` layer indices spread evenly over ``num_layers``, first and last included (6, 3 -> 0, 2, 5)."""
    if not 1 <= n <= num_layers:
        raise OztuneError(f"--student-layers must be between 1 and {num_layers} (the teacher's layers), not {n}")
    return sorted({int(x) for x in np.round(np.linspace(0, num_layers - 1, n))})


def describe(model: SequenceClassifier) -> str:
    """One line on the encoder's shape: layers, heads and FFN widths."""
    c = model.cfg
    return f"{c.num_layers} layers, heads {c.layer_heads}, ffn {c.layer_ffn}"


# --- unstructured -------------------------------------------------------------------------------------------

def encoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The encoder's Linear layers (QKV, attention output, FFN up and down) by module name."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.startswith("backbone.layers.") and n.endswith(ENCODER_LINEARS)}


@torch.no_grad()
def magnitude_masks(model: nn.Module, sparsity: float) -> dict[str, torch.Tensor]:
    """Boolean keep-masks zeroing the globally smallest ``sparsity`` share of encoder Linear weights."""
    linears = encoder_linears(model)
    flat = torch.cat([m.weight.detach().abs().reshape(-1).float() for m in linears.values()])
    k = int(sparsity * flat.numel())
    threshold = flat.kthvalue(k).values if k > 0 else flat.new_tensor(-1.0)
    return {n: m.weight.detach().abs() > threshold for n, m in linears.items()}


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        modules[name].weight.mul_(mask)


def magnitude_prune_(model: nn.Module, sparsity: float) -> dict[str, torch.Tensor]:
    """One-shot global magnitude pruning; returns the masks."""
    masks = magnitude_masks(model, sparsity)
    apply_masks(model, masks)
    return masks


def sparsity_of(model: nn.Module) -> float:
    """Share of exact zeros among the encoder's Linear weights."""
    ws = [m.weight.detach() for m in encoder_linears(model).values()]
    return sum(int((w == 0).sum()) for w in ws) / max(1, sum(w.numel() for w in ws))


def cubic_sparsity(step: int, total: int, final: float, begin: float = 0.0, end: float = 0.7) -> float:
    """Target sparsity after ``step`` of ``total`` steps: 0 until ``begin``, cubic up to ``final`` at ``end``.

    s(t) = final * (1 - (1 - p)^3), p the progress from ``begin * total`` to ``end * total`` (Zhu & Gupta, 2017):
    fast at first, while many weights are redundant, then slower; after ``end`` the model recovers at ``final``.
    """
    t0, t1 = begin * total, max(end * total, begin * total + 1)
    p = min(1.0, max(0.0, (step - t0) / (t1 - t0)))
    return final * (1 - (1 - p) ** 3)


class GradualPruner:
    """An ``on_step`` callback for :func:`oztune.train.loop.fit` that prunes on the cubic schedule.

    Masks are recomputed ``updates`` times over the ramp (and at its end) and re-applied after every
    optimizer step, so pruned weights stay zero while the rest recover.

    Args:
        model: the model being trained.
        final: sparsity to reach.
        begin: share of training before pruning starts.
        end: share of training at which ``final`` is reached.
        updates: number of mask recomputations over the ramp.
    """

    def __init__(self, model: nn.Module, final: float, begin: float = 0.0, end: float = 0.7, updates: int = 32):
        self.model, self.final, self.begin, self.end, self.updates = model, final, begin, end, updates
        self.masks: dict[str, torch.Tensor] = {}
        self.target = 0.0

    def __call__(self, step: int, total: int) -> None:
        every = max(1, int((self.end - self.begin) * total / self.updates))
        ramp_end = int(np.ceil(self.end * total))
        if step % every == 0 or step == ramp_end or step == total:
            target = cubic_sparsity(step, total, self.final, self.begin, self.end)
            if target > self.target:
                self.target = target
                self.masks = magnitude_masks(self.model, target)
        apply_masks(self.model, self.masks)


class SparseLinear(nn.Linear):
    """A Linear whose weight is stored as a bitmask of non-zeros plus their values (dense in memory).

    State dict: ``weight_mask`` (uint8, 8 weights per byte, row-major), ``weight_values`` (the non-zeros
    in row-major order) and ``bias``. At 90% sparsity that is about 4.2 bits per weight instead of 32.
    """

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        w = self.weight.detach()
        nz = w != 0
        destination[prefix + "weight_mask"] = pack_bits(nz.reshape(-1))
        destination[prefix + "weight_values"] = w[nz]
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        mask_key, values_key = prefix + "weight_mask", prefix + "weight_values"
        if mask_key in state_dict and values_key in state_dict:
            mask = unpack_bits(state_dict.pop(mask_key), self.weight.numel()).view(self.weight.shape)
            values = state_dict.pop(values_key)
            if int(mask.sum()) != values.numel():
                error_msgs.append(f"{prefix}weight: bitmask has {int(mask.sum())} ones but {values.numel()} values")
                return
            dense = torch.zeros_like(self.weight)
            dense[mask] = values.to(dense.dtype)
            state_dict[prefix + "weight"] = dense
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """(N,) bool -> (ceil(N / 8),) uint8, first bit in the high bit."""
    b = torch.nn.functional.pad(bits.to(torch.uint8), (0, -len(bits) % 8)).view(-1, 8)
    return (b << torch.arange(7, -1, -1, dtype=torch.uint8)).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of :func:`pack_bits`: (n,) bool."""
    return ((packed[:, None] >> torch.arange(7, -1, -1, dtype=torch.uint8)) & 1).view(-1)[:n].bool()


def to_sparse_(model: nn.Module, min_sparsity: float = 0.1) -> list[str]:
    """Swap encoder Linears with at least ``min_sparsity`` zeros for SparseLinear (compact when saved).

    Returns the names swapped. ``save_classifier`` records them (:func:`pruning_record`) so that
    ``load_classifier`` rebuilds the same modules (:func:`prepare_pruned`) before loading the weights.
    """
    names = []
    for name, m in encoder_linears(model).items():
        if type(m) is nn.Linear and float((m.weight == 0).float().mean()) >= min_sparsity:
            _swap(model, name, m)
            names.append(name)
    return names


def _swap(model: nn.Module, name: str, linear: nn.Linear) -> None:
    parent, _, child = name.rpartition(".")
    new = SparseLinear(linear.in_features, linear.out_features, bias=linear.bias is not None)
    with torch.no_grad():
        new.weight.copy_(linear.weight)
        if linear.bias is not None:
            new.bias.copy_(linear.bias)
    setattr(model.get_submodule(parent), child, new)


# --- vocabulary ---------------------------------------------------------------------------------------------

class VocabEmbedding(nn.Module):
    """A token embedding keeping only some rows: ids map through ``remap`` (tokenizer id -> row), the rest to [UNK].

    The tokenizer is unchanged; ``remap`` (int32, one entry per tokenizer id) is saved with the weights.

    Args:
        vocab_size: ids the tokenizer produces.
        rows: rows kept.
        dim: embedding width.
    """

    def __init__(self, vocab_size: int, rows: int, dim: int):
        super().__init__()
        self.register_buffer("remap", torch.zeros(vocab_size, dtype=torch.int32))
        self.table = nn.Embedding(rows, dim)

    @property
    def weight(self) -> torch.Tensor:
        return self.table.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table(self.remap[ids].long())  # (..., dim)


def tokens_seen(data: EncodedData, vocab_size: int) -> torch.Tensor:
    """(vocab_size,) bool: which token ids occur in ``data``."""
    seen = torch.zeros(vocab_size, dtype=torch.bool)
    for ids, _ in data.encoded:
        seen[ids] = True
    return seen


def prune_vocab_(model: SequenceClassifier, keep: torch.Tensor, unk_id: int) -> SequenceClassifier:
    """Keep the token-embedding rows where ``keep`` is True (plus [UNK] and padding); other ids read [UNK]'s row.

    With ``keep`` the tokens of the training data, the table shrinks about 3x on SST-2; a text with a
    token never seen in training reads [UNK] for it (on SST-2 dev: -0.1 to -0.2 points for the fp32 model).

    Args:
        model: the classifier, changed in place.
        keep: (vocab_size,) bool, tokenizer ids to keep.
        unk_id: the tokenizer's unknown-token id.
    """
    word = model.backbone.embed.word
    if not isinstance(word, nn.Embedding):
        raise OztuneError("the vocabulary is already pruned or quantized; prune it before quantizing")
    keep = keep.clone()
    keep[[unk_id, model.cfg.pad_token_id]] = True
    kept = torch.nonzero(keep).squeeze(1)  # (rows,)
    new = VocabEmbedding(word.num_embeddings, len(kept), word.embedding_dim)
    with torch.no_grad():
        new.table.weight.copy_(word.weight[kept])
        new.remap.fill_(int((kept < unk_id).sum()))  # the row of [UNK]
        new.remap[kept] = torch.arange(len(kept), dtype=torch.int32)
    model.backbone.embed.word = new
    return model


def unk_id(encoder) -> int | None:
    """The tokenizer's unknown-token id, or None (byte-level BPE has none: no vocabulary pruning then)."""
    token = getattr(encoder.tokenizer.model, "unk_token", None)
    return encoder.tokenizer.token_to_id(token) if token else None


# --- saving -------------------------------------------------------------------------------------------------

def pruning_record(model: nn.Module) -> dict:
    """What ``load_classifier`` needs to rebuild a pruned model's modules: sparse layers, kept vocabulary rows."""
    record = {}
    sparse = [n for n, m in model.named_modules() if isinstance(m, SparseLinear)]
    if sparse:
        record.update(sparse_format="bitmask", sparse_modules=sparse)
    word = model.backbone.embed.word if hasattr(model, "backbone") else None
    if isinstance(word, VocabEmbedding):
        record["vocab_rows"] = word.table.num_embeddings
    return record


def prepare_pruned(model: nn.Module, record: dict) -> None:
    """Rebuild the modules a :func:`pruning_record` names (empty), ready for ``load_state_dict``."""
    modules = dict(model.named_modules())
    for name in record.get("sparse_modules", []):
        _swap(model, name, modules[name])
    if record.get("vocab_rows"):
        word = model.backbone.embed.word
        model.backbone.embed.word = VocabEmbedding(word.num_embeddings, record["vocab_rows"], word.embedding_dim)


# --- the prune recipe ---------------------------------------------------------------------------------------

@dataclass
class PruneArgs(RecipeOptions):
    """Prune a fine-tuned model, recovering accuracy by distillation from the unpruned model.

    Unstructured (default): the smallest encoder weights, globally, are zeroed on a cubic schedule while
    the model trains, reaching --sparsity at 70% of training; saved as bitmask + values. --structured:
    attention heads and FFN neurons (and --layers whole layers) are removed by importance, which
    shrinks the matrices and the CPU time, then the smaller model is trained.

    Args:
        model: fine-tuned model directory.
        train: training file (.csv, .tsv or .jsonl) with the model's labels.
        eval: evaluation file.
        output: directory to write the pruned model to.
        sparsity: share of weights removed, in [0, 1); with --structured, the share of heads and neurons.
        structured: remove whole heads, neurons and layers instead of single weights.
        heads: with --structured, share of heads to remove (default: --sparsity).
        ffn: with --structured, share of FFN neurons to remove (default: --sparsity).
        layers: with --structured, number of whole layers to remove.
        importance_batches: training batches over which importance is measured.
        epochs: passes over the training data while pruning or recovering.
        batch_size: examples per step.
        lr: peak learning rate.
        temperature: softmax temperature of the distillation loss.
        alpha: weight of the unpruned model's soft loss (1 - alpha: the hard labels).
    """

    model: str = ""
    train: str = ""
    eval: str = ""
    output: str = ""
    sparsity: float = 0.5
    structured: bool = False
    heads: float | None = None
    ffn: float | None = None
    layers: int = 0
    importance_batches: int = 32
    epochs: int = 2
    batch_size: int = 32
    lr: float = 1e-4
    temperature: float = 2.0
    alpha: float = 0.5

    def prune_config(self) -> PruneConfig:
        if not 0 <= self.sparsity < 1:
            raise OztuneError(f"--sparsity must be in [0, 1), not {self.sparsity}")
        if not self.structured:
            return PruneConfig(sparsity=self.sparsity)
        return PruneConfig(heads=self.sparsity if self.heads is None else self.heads,
                           ffn=self.sparsity if self.ffn is None else self.ffn, layers=self.layers,
                           importance_batches=self.importance_batches, batch_size=self.batch_size)


def run_prune(a: PruneArgs) -> dict:
    """The prune recipe; returns the run record (saved with the model)."""
    from oztune.compress.distill import (DistillConfig, check_train_options, distill, load_task_data,
                                         load_trained)  # imported here: distill builds on this module

    pcfg = a.prune_config()
    check_train_options(a)
    dcfg = DistillConfig(a.temperature, a.alpha)
    teacher, enc, meta = load_trained(a.model, "--model", a.max_length)
    data = load_task_data(teacher, enc, meta, a.train, a.eval, a.columns(), a.max_train_examples, a.seed)
    before = evaluate(teacher, data.eval)
    cfg = TrainConfig(epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, precision=a.precision, seed=a.seed,
                      freeze_embeddings=True, progress=a.progress)
    student = copy.deepcopy(teacher)
    if a.structured:
        prune_(student, pcfg, data.train)
        result = distill(teacher, student, data.train, cfg, dcfg, data.eval)
    else:  # no per-epoch best: an earlier, less sparse epoch must not win
        pruner = GradualPruner(student, pcfg.sparsity)
        result = distill(teacher, student, data.train, cfg, dcfg, on_step=pruner)
        apply_masks(student, pruner.masks)
        to_sparse_(student)
    after = evaluate(student, data.eval)
    run = {"command": "prune", "args": asdict(a), "metrics_before": before, "metrics": after,
           "sparsity": sparsity_of(student), "shape": describe(student), "history": result.history,
           "parameters": sum(p.numel() for p in student.parameters()), "train_seconds": round(result.seconds, 1),
           "train_examples": len(data.train)}
    save_classifier(student, enc, a.output, meta["id2label"], run=run)
    return run
