"""Pruning: structured (heads, FFN neurons, whole layers: smaller matrices, less CPU time) and unstructured
(:mod:`oztune.compress.sparse`); the vocabulary (:mod:`oztune.compress.vocab`); the ``oztune prune`` recipe.

Structured pruning ranks every attention head, FFN neuron and layer by first-order Taylor importance,
|dL/dg| of a gate g = 1 multiplying its output (Michel et al., 2019; Molchanov et al., 2019), summed
over training batches, then slices the fused QKV rows, output columns and FFN rows/columns of what is
removed. The per-layer sizes go into ``ModelConfig.layer_heads`` / ``layer_ffn`` / ``num_layers``, so
the saved model reloads with the smaller shapes.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from torch import nn

from oztune.compress.args import IMPORTANCE_BATCHES, PruneArgs
from oztune.compress.sparse import (GradualPruner, SparseLinear, apply_masks, magnitude_prune_, sparsity_of,
                                   swap_sparse, to_sparse_)
from oztune.compress.quantize import check_not_compiled, is_int8, is_qat
from oztune.compress.vocab import VocabEmbedding
from oztune.data.dataset import EncodedData, train_batches
from oztune.errors import OztuneError, check_at_least_1
from oztune.models.families import FAMILIES
from oztune.models.hub import save_classifier
from oztune.models.transformer import SequenceClassifier
from oztune.train import distributed
from oztune.train.loop import TrainConfig, evaluate


@dataclass
class PruneConfig:
    """What to prune.

    Args:
        sparsity: unstructured: share of encoder Linear weights set to zero, by global magnitude, in [0, 1). The
            zeros already there count (pruning never restores a weight): a model already sparser is left as is.
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
    importance_batches: int = IMPORTANCE_BATCHES
    batch_size: int = 32

    def __post_init__(self) -> None:
        for name in ("sparsity", "heads", "ffn"):
            v = getattr(self, name)
            if not 0 <= v < 1:
                raise OztuneError(f"--{name} must be in [0, 1), not {v}")
        if isinstance(self.layers, bool) or not isinstance(self.layers, int) or self.layers < 0:
            raise OztuneError(f"--layers must be a whole number of layers, 0 or more, not {self.layers!r}")
        for name in ("importance_batches", "batch_size"):
            check_at_least_1(f"--{name.replace('_', '-')}", getattr(self, name))

    @property
    def structured(self) -> bool:
        return bool(self.heads or self.ffn or self.layers)


def prune_(model: SequenceClassifier, config: PruneConfig, data: EncodedData | None = None) -> SequenceClassifier:
    """Prune ``model`` in place: structured parts first (ranked on ``data``), then one-shot magnitude sparsity.

    Args:
        model: the classifier, fp32 (an int8 one is refused; for structured pruning, one from prepare_qat_ too:
            prune first, then prepare_qat_).
        config: what to prune.
        data: labelled training data, not empty; needed for structured pruning (importance).
    """
    check_not_compiled(model, "prune")
    if is_int8(model):
        raise OztuneError("an int8 model cannot be pruned: prune the fp32 model it was quantized from, then quantize")
    if config.structured and is_qat(model):  # (the sliced layers would be plain Linear ones, silently)
        raise OztuneError("structured pruning of a model prepared with prepare_qat_ would turn its fake-quantized "
                          "layers into plain Linear ones: prune the fp32 model first, then prepare_qat_")
    if config.structured:
        if data is None or data.labels is None or not len(data):  # (on no examples every score is 0: a blind cut)
            raise OztuneError("structured pruning needs labelled training data to rank heads, neurons and layers"
                              + (" (the data given holds no examples)" if data is not None and not len(data) else ""))
        if config.layers >= model.cfg.num_layers:
            raise OztuneError(f"--layers {config.layers}: the model has only {model.cfg.num_layers} layers")
        scores = importance(model, data, config.importance_batches, config.batch_size)
        if distributed.world_size() > 1:  # under torchrun every rank cuts the same parts: rank 0's ranking (a
            scores = distributed.broadcast_object(scores)  # rank with other threads could break a near-tie otherwise)
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


def importance(model: SequenceClassifier, data: EncodedData, batches: int = IMPORTANCE_BATCHES, batch_size: int = 32,
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
    key = FAMILIES[cfg.family].layers_key if cfg.family in FAMILIES else None
    if hf and key in hf:
        hf[key] = cfg.num_layers  # a model with fewer full layers stays HF-loadable
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
        swap_sparse(model, name, modules[name])
    if record.get("vocab_rows"):
        word = model.backbone.embed.word
        model.backbone.embed.word = VocabEmbedding(word.num_embeddings, record["vocab_rows"], word.embedding_dim)


# --- the prune recipe ---------------------------------------------------------------------------------------

def prune_config(a: PruneArgs) -> PruneConfig:
    """The pruning that --sparsity, --structured, --heads, --ffn and --layers ask for; refuses options that prune
    nothing or that the chosen kind ignores."""
    if not 0 <= a.sparsity < 1:
        raise OztuneError(f"--sparsity must be in [0, 1), not {a.sparsity}")
    if not a.structured:
        given = [f"--{n}" for n in ("heads", "ffn", "layers") if getattr(a, n)]
        if given:
            raise OztuneError(f"{', '.join(given)} prune{'s' if len(given) == 1 else ''} whole parts: add "
                              "--structured (without it, --sparsity zeroes single weights)")
        if a.importance_batches is not None:  # (it would be ignored)
            raise OztuneError("--importance-batches ranks the heads, neurons and layers that --structured removes: add "
                              "--structured (without it, --sparsity zeroes the smallest weights)")
        if not a.sparsity:  # (refused before any work: the run would only retrain the model)
            raise OztuneError("--sparsity 0 prunes nothing: give a --sparsity above 0 (the share of weights to "
                              "zero), or --structured with --heads, --ffn or --layers")
        return PruneConfig(sparsity=a.sparsity)
    config = PruneConfig(heads=a.sparsity if a.heads is None else a.heads,
                         ffn=a.sparsity if a.ffn is None else a.ffn, layers=a.layers,
                         importance_batches=IMPORTANCE_BATCHES if a.importance_batches is None else a.importance_batches,
                         batch_size=a.batch_size)
    if not config.structured:  # (heads and ffn 0, whether given or taken from --sparsity, and --layers 0)
        given = ["--structured", *(f"--{n} {getattr(a, n):g}" for n in ("heads", "ffn")
                                   if getattr(a, n) is not None)]
        uses_sparsity = a.heads is None or a.ffn is None  # (both given: --sparsity is not used)
        if uses_sparsity:
            given.insert(1, f"--sparsity {a.sparsity:g}")
        shares = "--sparsity, --heads or --ffn" if uses_sparsity else "--heads or --ffn"
        raise OztuneError(f"{' '.join(given)} prunes nothing (no heads, FFN neurons or layers removed): give "
                          f"{shares} above 0, or --layers 1 or more")
    return config


def run_prune(a: PruneArgs) -> dict:
    """The prune recipe; returns the run record (saved with the model).

    Under torchrun every process runs this and trains its share of each batch of the recovery; only rank 0
    evaluates and saves, the others wait for it (as :func:`oztune.compress.distillation.run_distill`).
    """
    from oztune.compress.distillation import DistillConfig, check_train_options  # (distill builds on this module)

    pcfg = prune_config(a)
    if a.structured:  # (the run record names the value used)
        a = replace(a, importance_batches=pcfg.importance_batches)
    check_train_options(a)
    dcfg = DistillConfig(a.temperature, a.alpha)
    with distributed.joined() as env:  # (the other ranks wait while rank 0 saves)
        return _run_prune(a, pcfg, dcfg, env.is_main)


def _run_prune(a: PruneArgs, pcfg: PruneConfig, dcfg, saves: bool) -> dict:
    from oztune.compress.distillation import distill, load_task_data, load_trained, recipe_card

    teacher, enc, meta = load_trained(a.model, "--model", a.max_length)
    data = load_task_data(teacher, enc, meta, a.train, a.eval, a.columns(), a.max_train_examples, a.seed)
    before = evaluate(teacher, data.eval) if saves else {}  # (reported by rank 0 alone)
    cfg = TrainConfig(epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, precision=a.precision, seed=a.seed,
                      freeze_embeddings=True, progress=a.progress)
    student = copy.deepcopy(teacher)
    if a.structured:
        prune_(student, pcfg, data.train)
        if describe(student) == describe(teacher):  # (the shares round to no whole part: the run would only retrain)
            raise OztuneError(f"--structured with --heads {pcfg.heads:g}, --ffn {pcfg.ffn:g} and --layers "
                              f"{pcfg.layers} removes nothing from this model ({describe(teacher)}): the shares are "
                              "rounded to whole heads and neurons over all its layers; give larger ones")
        # (an unstructured-pruned model's zeros stay zero through the recovery: see distill)
        result = distill(teacher, student, data.train, cfg, dcfg, data.eval)
    else:  # no per-epoch best: an earlier, less sparse epoch must not win
        pruner = GradualPruner(student, pcfg.sparsity)
        result = distill(teacher, student, data.train, cfg, dcfg, on_step=pruner)
        apply_masks(student, pruner.masks)
        to_sparse_(student)
    after = evaluate(student, data.eval) if saves else {}
    run = {"command": "prune", "args": asdict(a), "metrics_before": before, "metrics": after,
           "sparsity": sparsity_of(student), "shape": describe(student), "history": result.history,
           "parameters": sum(p.numel() for p in student.parameters()), "train_seconds": round(result.seconds, 1),
           "train_examples": len(data.train)}
    if not saves:
        return run
    shape = f"{run['shape']}, {run['parameters'] / 1e6:.3g}M parameters, encoder sparsity {run['sparsity']:.1%}"
    save_classifier(student, enc, a.output, meta["id2label"], run=run,
                    card=recipe_card("pruned classifier (oztune prune)", [f"Source: `{a.model}`; this model: {shape}"],
                                     before, after, a.output, text_pairs=data.text_pairs),
                    text_pairs=data.text_pairs)
    return run
