"""The one training loop that fine-tuning, pruning recovery and distillation share.

AdamW (fused where available) with linear warm-up and decay, gradient clipping and accumulation,
bf16 autocast on CPUs with native bf16, per-epoch evaluation with early stopping that keeps the best
weights, a tqdm bar with loss and examples/s, and one log row per optimizer step; resumable
checkpoints and data-parallel training under torchrun. What differs between recipes is the ``loss_fn``.
"""

from __future__ import annotations

import math
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from oztune.data.dataset import EncodedData, inference_batches, train_batches
from oztune.errors import OztuneError
from oztune.runtime import tune_malloc
from oztune.train import distributed
from oztune.train.args import PRECISIONS
from oztune.train.checkpoint import Checkpointer, HeldSigterm, Progress
from oztune.train.ema import WeightEMA
from oztune.train.metrics import MAIN_METRIC, evaluation_metrics, metric_values
from oztune.train.rdrop import rdrop_loss
from oztune.train.tensorboard import Board


def _finite_from_0(v) -> bool:
    return v >= 0 and math.isfinite(v)


# The ranges of TrainConfig's fields, one rule for the Python API (TrainConfig refuses a value outside) and the
# recipes' options of the same names (check_args: --weight-decay ...): field -> (whether a value is in, what it
# must be).
RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    "patience": (_finite_from_0, "0 or more"),
    "eval_every": (_finite_from_0, "0 or more"),
    "checkpoint_every": (_finite_from_0, "0 or more"),
    "weight_decay": (_finite_from_0, "0 or more"),
    "max_grad_norm": (lambda v: v is None or _finite_from_0(v), "0 or more (0: no clipping)"),
    "rdrop": (_finite_from_0, "0 or more"),
    "label_smoothing": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "warmup_ratio": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "ema_decay": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "layer_lr_decay": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "bucket": (lambda v: v >= 1, "at least 1"),
    "keep_checkpoints": (lambda v: v >= 1, "at least 1"),
}


def out_of_range(name: str, value) -> str | None:
    """``"must be ..., not VALUE"`` where ``value`` is outside the range of TrainConfig's field ``name``
    (:data:`RANGES`), else None; the caller names the field (``TrainConfig.name``) or option (``--name``)."""
    ok, must = RANGES[name]
    return None if ok(value) else f"must be {must}, not {value}"


LOWER_IS_BETTER = ("mse", "train_loss", "log_loss", "ece")  # metrics where a smaller value is the better model
LossFn = Callable[[nn.Module, dict], torch.Tensor]


@dataclass
class TrainConfig:
    """Optimisation settings.

    Args:
        epochs: passes over the training data.
        batch_size: examples per optimizer step (before accumulation).
        lr: peak learning rate.
        weight_decay: AdamW decay (not applied to biases and LayerNorm weights).
        warmup_ratio: share of steps spent warming the learning rate up linearly.
        max_grad_norm: gradient clipping norm (0 or None: off).
        grad_accum: micro-batches accumulated per optimizer step.
        precision: "auto" (bf16 autocast where the CPU has bf16), "bf16" or "fp32".
        seed: seed of shuffling, dropout and new layers.
        patience: stop after this many evaluations without improvement (0: never stop early).
        eval_every: also evaluate every this many optimizer steps inside an epoch (0: at epoch ends only);
            the best evaluation's weights are kept either way.
        tensorboard: folder for TensorBoard event files of the step log and evaluations (None: none).
        ema_decay: keep an exponential moving average of the trainable weights with this decay (0: off);
            evaluations, the kept weights and the result use the average (see :class:`WeightEMA`).
        freeze_embeddings: keep the token-embedding table fixed (faster: no dense 30k-row gradient).
        class_weights: per-label weights of the default loss (see ``SequenceClassifier.loss``; None: none),
            e.g. from :func:`balanced_class_weights`: one per label of a classification head, 0 or more
            (``fit`` checks the count against the model).
        label_smoothing: smooth the default loss's targets by this much, in [0, 1) (classification heads; see
            ``SequenceClassifier.loss``; 0: off): a regulariser that also pulls the scores toward the middle.
        rdrop: R-Drop: run each batch twice with different dropout and add this weight x the symmetric KL
            divergence of the two predictions to the loss (:mod:`oztune.train.rdrop`; 0: off; a step costs ~2x).
        layer_lr_decay: layer-wise learning-rate decay: the task head trains at ``lr``, the top block at
            ``lr x d``, the one below at ``lr x d^2``, ..., the embeddings at ``lr x d^(L+1)`` (1: off).
        bucket: length bucketing, in batches per sorted mega-batch (1: off).
        progress: show a progress bar.
        checkpoint_dir: folder for resumable checkpoints (None: none are written). ``fit`` leaves them there when
            the run finishes (the model is not saved yet), and a later fresh run in the folder is refused as
            "unfinished": once the model is saved, remove them with
            ``oztune.train.checkpoint.remove_checkpoints(checkpoint_dir)``, as ``oztune finetune`` does.
        checkpoint_every: optimizer steps between checkpoints (0: none).
        keep_checkpoints: how many of the newest checkpoints to keep.
        resume: continue from the newest valid checkpoint in ``checkpoint_dir`` (start fresh if there is none).

    Under torchrun, ``batch_size`` is per process: a step takes ``batch_size x processes`` examples.
    """

    epochs: int = 3
    batch_size: int = 32
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    max_grad_norm: float = 1.0
    grad_accum: int = 1
    precision: str = "auto"
    seed: int = 42
    patience: int = 0
    eval_every: int = 0
    tensorboard: str | None = None
    ema_decay: float = 0.0
    freeze_embeddings: bool = False
    class_weights: list[float] | None = None
    label_smoothing: float = 0.0
    rdrop: float = 0.0
    layer_lr_decay: float = 1.0
    bucket: int = 50
    progress: bool = True
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    resume: bool = False

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be at least 1, not {getattr(self, name)}")
        if self.epochs < 0:
            raise ValueError(f"TrainConfig.epochs must be 0 or more, not {self.epochs}")
        for name in RANGES:
            error = out_of_range(name, getattr(self, name))
            if error:
                raise ValueError(f"TrainConfig.{name} {error}")
        if self.class_weights is not None and not all(_finite_from_0(w) for w in self.class_weights):
            raise ValueError(f"TrainConfig.class_weights must be 0 or more each, not {self.class_weights}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"TrainConfig.precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")


@dataclass
class FitResult:
    """What :func:`fit` returns: best evaluation metrics, per-epoch history and per-step log."""

    best: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    log: list[dict] = field(default_factory=list)
    examples_per_s: float = 0.0
    seconds: float = 0.0
    precision: str = "fp32"  # what ran: "bf16 autocast" or "fp32" ("auto" is decided by the CPU)


def bf16_supported() -> bool:
    """Whether this CPU runs bf16 matrix work natively (AVX512-BF16 / AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast_dtype(precision: str) -> torch.dtype | None:
    if precision == "fp32" or (precision == "auto" and not bf16_supported()):
        return None
    return torch.bfloat16


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def default_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    logits = model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
    return model.loss(logits, batch["labels"])


def weighted_loss(weights: list[float] | None, label_smoothing: float = 0.0) -> LossFn:
    """The default loss with per-label weights (``TrainConfig.class_weights``; None: none) and label smoothing
    (``TrainConfig.label_smoothing``)."""
    w = None if weights is None else torch.tensor(weights, dtype=torch.float32)

    def loss_fn(model: nn.Module, batch: dict) -> torch.Tensor:
        logits = model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
        return model.loss(logits, batch["labels"], w, label_smoothing)

    return loss_fn


def balanced_class_weights(labels: torch.Tensor, problem_type: str, num_labels: int | None = None) -> list[float]:
    """Weights that give every label the same total weight (scikit-learn's "balanced").

    Single-label, class c: N / (L * count_c), L = ``num_labels`` (default: the largest label id + 1).
    Multi-label, label l: negatives_l / positives_l (BCE's ``pos_weight``: the positive examples weigh as
    much as the negative ones); 1 for a label that is never or always on.
    """
    if problem_type == "single_label":
        counts = torch.bincount(labels.long(), minlength=num_labels or 0).double()
        return [float(len(labels) / (len(counts) * c)) if c else 1.0 for c in counts]
    if problem_type == "multi_label":
        pos = labels.float().sum(0).double()
        neg = len(labels) - pos
        return [float(n / p) if p and n else 1.0 for p, n in zip(pos, neg)]
    raise ValueError(f"class weights are for classification, not {problem_type}")


def check_class_weights(weights: list[float], head_cfg) -> None:
    """Refuse ``TrainConfig.class_weights`` that are not one per label of the classification head ``head_cfg``
    (too few failed inside the loss, naming nothing; too many were ignored)."""
    if head_cfg.problem_type == "regression":
        raise ValueError("TrainConfig.class_weights weigh the labels of a classification head; a regression head "
                         "has none: leave class_weights None")
    if len(weights) != head_cfg.num_labels:
        raise ValueError(f"TrainConfig.class_weights has {len(weights)} weight(s) but the model's head has "
                         f"{head_cfg.num_labels} labels: give one weight per label")


def layer_depth(name: str, num_layers: int) -> int:
    """Depth of a parameter from the bottom: 0 the embeddings, i + 1 block i, L + 1 the rest (head, final norm)."""
    parts = name.split(".")
    if "embed" in parts:
        return 0
    if "layers" in parts:
        i = parts.index("layers")
        if i + 1 < len(parts) and parts[i + 1].isdigit():
            return int(parts[i + 1]) + 1
    return num_layers + 1


def param_groups(model: nn.Module, weight_decay: float, layer_lr_decay: float = 1.0) -> list[dict]:
    """AdamW groups: no decay on biases and norms; with ``layer_lr_decay`` < 1 each group also carries an
    ``lr_scale`` (``layer_lr_decay`` to the power of its distance from the top, see :func:`layer_depth`)."""
    num_layers = sum(1 for n, _ in model.named_modules() if n.split(".")[-2:-1] == ["layers"])
    groups: dict[tuple[bool, int], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            no_decay = p.ndim < 2 or "norm" in name
            depth = layer_depth(name, num_layers) if layer_lr_decay != 1.0 else num_layers + 1
            groups.setdefault((no_decay, depth), []).append(p)
    return [{"params": ps, "weight_decay": 0.0 if no_decay else weight_decay,
             "lr_scale": layer_lr_decay ** (num_layers + 1 - depth)}
            for (no_decay, depth), ps in sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[0][1]))]


def clipped_step(opt: torch.optim.Optimizer, params: list[nn.Parameter], max_norm: float) -> None:
    """``opt.step()`` on gradients clipped to a total L2 norm of ``max_norm`` (0: no clipping).

    The result of ``clip_grad_norm_`` then ``step()``, but a fused AdamW does the scaling inside its own
    kernel (its ``grad_scale``, which divides every gradient as it is read): no separate pass that
    multiplies each gradient tensor, ~4% of a MiniLM training step on CPU (bench/profile_step.py).
    """
    if not max_norm:
        opt.step()
        return
    if not all(g.get("fused") for g in opt.param_groups):
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        opt.step()
        return
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, 2.0, foreach=True)
    opt.grad_scale = ((total + 1e-6) / max_norm).clamp_(min=1.0)  # 1 / clip_grad_norm_'s clip_coef
    try:
        opt.step()
    finally:
        opt.grad_scale = None


def make_optimizer(model: nn.Module, cfg: TrainConfig, total_steps: int):
    """AdamW (fused on CPU where torch has it, layer-wise learning rates with ``cfg.layer_lr_decay``) and a
    linear warm-up/decay schedule (it scales every group's own learning rate)."""
    groups = param_groups(model, cfg.weight_decay, cfg.layer_lr_decay)
    for g in groups:
        g["lr"] = cfg.lr * g.pop("lr_scale")
    try:
        opt = torch.optim.AdamW(groups, lr=cfg.lr, fused=True)
    except (RuntimeError, TypeError):
        opt = torch.optim.AdamW(groups, lr=cfg.lr)
    warm = max(1, int(cfg.warmup_ratio * total_steps))

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total_steps - step) / max(1, total_steps - warm))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_at)


@torch.no_grad()
def predict_logits(model: nn.Module, data: EncodedData, batch_size: int = 64, precision: str = "fp32") -> np.ndarray:
    """Logits (N, L) of every example, computed in length-sorted batches and returned in input order."""
    was_training = model.training
    if was_training:  # eval()/train() walk every module: a noticeable cost at batch 1
        model.eval()
    dtype = autocast_dtype(precision)
    out = None
    for idx in inference_batches(data.lengths, batch_size):
        b = data.batch(idx)
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            logits = model(b["input_ids"], b["attention_mask"], b["token_type_ids"]).float().numpy()
        if out is None:
            out = np.zeros((len(data), logits.shape[-1]), dtype=np.float32)
        out[idx] = logits
    if was_training:
        model.train()
    return out if out is not None else np.zeros((0, 0), dtype=np.float32)


def evaluate(model: nn.Module, data: EncodedData, batch_size: int = 64, precision: str = "fp32") -> dict:
    """Metrics of the model's problem type on labelled data, as ``oztune evaluate`` gives them (a classifier's
    log loss and ECE too: :func:`~oztune.train.metrics.evaluation_metrics`)."""
    logits = predict_logits(model, data, batch_size, precision)
    return evaluation_metrics(model.head_cfg.problem_type, logits, data.labels.numpy())


def fit(model: nn.Module, train: EncodedData, cfg: TrainConfig, eval_data: EncodedData | None = None,
        loss_fn: LossFn = default_loss, main_metric: str | None = None,
        on_step: Callable[[int, int], None] | None = None) -> FitResult:
    """Train ``model`` in place on ``train``; evaluate on ``eval_data`` each epoch (and every
    ``cfg.eval_every`` steps) and keep the best weights.

    Args:
        model: a SequenceClassifier (or anything with ``loss`` and ``head_cfg`` when using defaults).
        train: encoded training data, not empty, with labels (unless ``loss_fn`` does without; else ValueError).
        cfg: optimisation settings.
        eval_data: encoded evaluation data; without it the last weights are kept.
        loss_fn: ``loss_fn(model, batch) -> loss``; distillation passes its own.
        main_metric: metric that decides the best epoch (default: by problem type); higher is better, except
            for those in :data:`LOWER_IS_BETTER` (mse, train_loss, log_loss, ece).
        on_step: called as ``on_step(step, total_steps)`` after each optimizer step (pruning schedules).

    Under torchrun each process trains on its slice of every global batch of ``batch_size x processes``
    examples and gradients are summed over processes before each step (:mod:`oztune.train.distributed`);
    only rank 0 shows progress and evaluates. With ``cfg.checkpoint_dir`` the run writes checkpoints
    (:mod:`oztune.train.checkpoint`) and with ``cfg.resume`` continues from the newest valid one; they stay after
    the run: the caller removes them once the model is saved (``remove_checkpoints``, see TrainConfig). An int8
    model (:func:`oztune.compress.quantize.quantize_`) is refused: its weights do not train.
    """
    from oztune.compress.quantize import is_int8  # (oztune.compress imports this module)

    if is_int8(model):  # (its first step would fail inside the int8 kernel, naming no model)
        raise OztuneError("an int8 model's weights do not train: fine-tune the fp32 model (prepare_qat_ first, for "
                          "quantization-aware fine-tuning), then quantize it")
    if cfg.class_weights is not None:
        check_class_weights(cfg.class_weights, model.head_cfg)
    if not len(train):  # (it "trained" no step and returned train_loss nan)
        raise ValueError("fit: the training data holds no examples: nothing to train on")
    if train.labels is None and loss_fn is default_loss:  # (a KeyError 'labels' at the first step)
        raise ValueError("fit: the training data has no labels, which the default loss trains on: encode it with its "
                         "labels (a loss_fn of your own may do without)")
    if cfg.label_smoothing and model.head_cfg.problem_type == "regression":
        raise ValueError("TrainConfig.label_smoothing is for classification heads; a regression head has no labels "
                         "to smooth: leave it 0")
    if cfg.rdrop:
        if loss_fn is not default_loss:
            raise ValueError("TrainConfig.rdrop adds to the default loss; this recipe has its own loss_fn")
        loss_fn = rdrop_loss(cfg.rdrop, cfg.class_weights, cfg.label_smoothing)
    elif cfg.class_weights is not None or cfg.label_smoothing:
        if loss_fn is not default_loss:
            what = "class_weights weighs" if cfg.class_weights is not None else "label_smoothing smooths"
            raise ValueError(f"TrainConfig.{what} the default loss; this recipe has its own loss_fn")
        loss_fn = weighted_loss(cfg.class_weights, cfg.label_smoothing)
    tune_malloc()
    env = distributed.init_from_env()
    seed_everything(cfg.seed + env.rank)
    word = model.backbone.embed.word.weight
    word_trainable = word.requires_grad
    word.requires_grad_(word_trainable and not cfg.freeze_embeddings)
    global_batch = cfg.batch_size * env.world
    total_steps = math.ceil(math.ceil(len(train) / global_batch) / cfg.grad_accum) * cfg.epochs
    opt, sched = make_optimizer(model, cfg, total_steps)
    dtype = autocast_dtype(cfg.precision)
    main_metric = main_metric or MAIN_METRIC[model.head_cfg.problem_type]
    params = [p for p in model.parameters() if p.requires_grad]
    if env.world > 1:
        distributed.broadcast_model(model)
    ckpt = Checkpointer.for_run(cfg, train, model, env, eval_data)
    run = (ckpt.resume_run(model, opt, sched, env) if ckpt and cfg.resume else None) or Progress()
    ema = WeightEMA(params, cfg.ema_decay, run.ema) if cfg.ema_decay else None
    if ema is not None:
        run.ema = ema.shadow  # updated in place: checkpoints carry it
    lengths = train.lengths
    seen, start = run.seen, time.perf_counter() - run.seconds  # a resumed run counts its earlier attempts too
    model.train()
    board = Board(cfg.tensorboard, run.step if cfg.resume else None) if cfg.tensorboard and env.is_main else None
    stop = HeldSigterm(ckpt is not None and env.world == 1)  # SIGTERM: a checkpoint at the step's end, then stop
    saved_at = run.step

    def checkpoint(now: bool) -> None:
        """Write a checkpoint if one is due (or ``now``) and none was written at this step."""
        nonlocal saved_at
        if ckpt is not None and (now or ckpt.due(run.step)) and saved_at != run.step:
            ckpt.save_run(model, opt, sched, run, env)
            saved_at = run.step

    def evaluate_now(epoch_at: float, title: str) -> float:
        """Evaluate (the weight average, if kept), show and log it; returns the seconds it took."""
        t0 = time.perf_counter()
        with ema.applied() if ema is not None else nullcontext():
            entry = _evaluate(model, run, epoch_at, eval_data, main_metric, env)
        _show(entry, title, cfg.progress and env.is_main)
        if board is not None and eval_data is not None:
            board.evaluation(entry)
        return time.perf_counter() - t0

    # A run resumed from the checkpoint of a SIGTERM held as patience ran out had finished: it trains no more.
    first = cfg.epochs if cfg.patience and run.bad_evals >= cfg.patience else run.epoch
    try:
        for epoch in range(first, cfg.epochs):
            batches = train_batches(lengths, global_batch, cfg.seed + epoch, cfg.bucket)
            bar = tqdm(total=len(batches), initial=run.batch, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                       disable=not (cfg.progress and env.is_main), unit="batch", dynamic_ncols=True, leave=False,
                       mininterval=0.5 if sys.stderr.isatty() else 15)
            k = cfg.grad_accum  # micro-batches per optimizer step; the examples of each step:
            in_step = [sum(len(b) for b in batches[s:s + k]) for s in range(0, len(batches), k)]
            step_loss = 0.0  # the step's mean loss over its examples (all micro-batches, all ranks)
            for i in range(run.batch, len(batches)):
                mine = batches[i][env.rank::env.world]  # this rank's slice of the global batch
                share = len(mine) / in_step[i // k]  # its weight in the step's mean loss (a short batch weighs less)
                if len(mine):
                    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                        local = loss_fn(model, train.batch(mine))
                    (local * share).backward()  # the step's gradient: that of its mean loss
                    step_loss += local.item() * share
                seen += len(batches[i])
                if (i + 1) % cfg.grad_accum and i + 1 < len(batches):
                    bar.update(1)
                    continue
                loss, step_loss = step_loss, 0.0
                if env.world > 1:
                    loss = distributed.sync_gradients(params, loss)
                if not math.isfinite(loss):  # (the same value on every rank: they all stop here)
                    raise OztuneError(f"training diverged: the loss of step {run.step + 1} is {loss} (learning rate "
                                      f"{sched.get_last_lr()[0]:g}); try a lower --lr")
                lr = sched.get_last_lr()[0]  # the rate this step uses (read before the scheduler moves on)
                clipped_step(opt, params, cfg.max_grad_norm)
                sched.step()
                opt.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.update(run.step)
                run.step, run.batch = run.step + 1, i + 1
                if on_step is not None:
                    on_step(run.step, total_steps)
                elapsed = time.perf_counter() - start
                run.seconds, run.seen = elapsed, seen
                row = {"step": run.step, "epoch": epoch + (i + 1) / len(batches), "loss": loss,
                       "lr": lr, "examples_per_s": seen / elapsed, "elapsed_s": elapsed}
                run.log.append(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}", ex_s=f"{row['examples_per_s']:.0f}")
                bar.update(1)
                if board is not None:
                    board.step(row)
                if (eval_data is not None and cfg.eval_every and run.step % cfg.eval_every == 0
                        and i + 1 < len(batches)):  # the epoch's last step is evaluated below
                    at = epoch + (i + 1) / len(batches)
                    start += evaluate_now(at, f"step {run.step} (epoch {at:.2f})")  # not training time
                    if cfg.patience and run.bad_evals >= cfg.patience:
                        break
                if i + 1 < len(batches):  # (the epoch's last step: after its evaluation)
                    checkpoint(now=stop.requested)
                    stop.stop_if_asked()
            bar.close()
            if cfg.patience and run.bad_evals >= cfg.patience:
                break  # stopped inside the epoch
            start += evaluate_now(epoch + 1, f"epoch {epoch + 1}")
            run.epoch, run.batch = epoch + 1, 0
            if cfg.patience and run.bad_evals >= cfg.patience:
                break
            checkpoint(now=stop.requested)  # a resumed run goes on with the next epoch
            stop.stop_if_asked()
        if stop.requested:  # stopped early by patience, with a SIGTERM held: the resumed run finishes from here,
            checkpoint(now=True)  # as from the last step's checkpoint of a run that did not stop early
            stop.stop_if_asked()
    finally:
        stop.release()
        word.requires_grad_(word_trainable)  # as it was, even after an interruption
        if board is not None:
            board.close()
    seconds = time.perf_counter() - start
    result = FitResult(run.best, run.history, run.log, seen / max(seconds, 1e-9), seconds,
                       "fp32" if dtype is None else "bf16 autocast")
    if run.best_state is not None:
        model.load_state_dict(run.best_state)
    else:
        if ema is not None:
            ema.copy_to_params()
        result.best = dict(run.history[-1]) if run.history else {}
    model.eval()
    return result


def _show(entry: dict, title: str, show: bool) -> None:
    if show:
        tqdm.write(f"{title}: " + ", ".join(f"{k} {v:.4f}" for k, v in metric_values(entry).items()))


def _evaluate(model: nn.Module, run: Progress, epoch: float, eval_data: EncodedData | None, main_metric: str,
              env: distributed.DistEnv) -> dict:
    """A history entry at ``epoch`` (epochs done, fractional inside one): the epoch's mean training loss so far
    and, with ``eval_data``, its metrics (computed on rank 0, sent to the others); keeps the best weights."""
    start = math.floor(epoch - 1e-9)
    losses = [r["loss"] for r in run.log if start < r["epoch"] <= epoch]
    entry = {"epoch": epoch if epoch % 1 else int(epoch), "step": run.step,
             "train_loss": float(np.mean(losses)) if losses else float("nan")}
    if eval_data is not None:
        metrics = evaluate(model, eval_data) if env.is_main else None
        entry.update(distributed.broadcast_object(metrics) if env.world > 1 else metrics)
        model.train()
        sign = -1 if main_metric in LOWER_IS_BETTER else 1
        if not run.best or sign * entry[main_metric] > sign * run.best[main_metric]:
            run.best, run.bad_evals = dict(entry), 0
            run.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            run.bad_evals += 1
    run.history.append(entry)
    return entry


def config_dict(cfg: TrainConfig) -> dict:
    return asdict(cfg)
