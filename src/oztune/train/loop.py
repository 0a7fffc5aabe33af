"""The one training loop that fine-tuning, pruning recovery and distillation share.

AdamW (fused where available) with linear warm-up and decay, gradient clipping and accumulation,
bf16 autocast on CPUs with native bf16, per-epoch evaluation with early stopping that keeps the best
weights, a tqdm bar with loss and examples/s, and one log row per optimizer step.
What differs between recipes is the ``loss_fn`` passed in.
"""

from __future__ import annotations

import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from oztune.data.dataset import EncodedData, inference_batches, train_batches
from oztune.train.metrics import MAIN_METRIC, compute_metrics

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
        max_grad_norm: gradient clipping norm (0: off).
        grad_accum: micro-batches accumulated per optimizer step.
        precision: "auto" (bf16 autocast where the CPU has bf16), "bf16" or "fp32".
        seed: seed of shuffling, dropout and new layers.
        patience: stop after this many evaluations without improvement (0: never stop early).
        freeze_embeddings: keep the token-embedding table fixed (faster: no dense 30k-row gradient).
        bucket: length bucketing, in batches per sorted mega-batch (1: off).
        progress: show a progress bar.
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
    freeze_embeddings: bool = False
    bucket: int = 50
    progress: bool = True


@dataclass
class FitResult:
    """What :func:`fit` returns: best evaluation metrics, per-epoch history and per-step log."""

    best: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    log: list[dict] = field(default_factory=list)
    examples_per_s: float = 0.0
    seconds: float = 0.0


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


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, cfg: TrainConfig, total_steps: int):
    """AdamW (fused on CPU where torch has it) and a linear warm-up/decay schedule."""
    groups = param_groups(model, cfg.weight_decay)
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
    model.train(was_training)
    return out if out is not None else np.zeros((0, 0), dtype=np.float32)


def evaluate(model: nn.Module, data: EncodedData, batch_size: int = 64, precision: str = "fp32") -> dict:
    """Metrics of the model's problem type on labelled data."""
    logits = predict_logits(model, data, batch_size, precision)
    return compute_metrics(model.head_cfg.problem_type, logits, data.labels.numpy())


def fit(model: nn.Module, train: EncodedData, cfg: TrainConfig, eval_data: EncodedData | None = None,
        loss_fn: LossFn = default_loss, main_metric: str | None = None) -> FitResult:
    """Train ``model`` in place on ``train``; evaluate on ``eval_data`` each epoch and keep the best weights.

    Args:
        model: a SequenceClassifier (or anything with ``loss`` and ``head_cfg`` when using defaults).
        train: encoded training data with labels.
        cfg: optimisation settings.
        eval_data: encoded evaluation data; without it the last weights are kept.
        loss_fn: ``loss_fn(model, batch) -> loss``; distillation passes its own.
        main_metric: metric that decides the best epoch (default: by problem type).
    """
    seed_everything(cfg.seed)
    model.backbone.embed.word.weight.requires_grad_(not cfg.freeze_embeddings)
    steps_per_epoch = math.ceil(math.ceil(len(train) / cfg.batch_size) / cfg.grad_accum)
    opt, sched = make_optimizer(model, cfg, steps_per_epoch * cfg.epochs)
    dtype = autocast_dtype(cfg.precision)
    main_metric = main_metric or MAIN_METRIC[model.head_cfg.problem_type]
    params = [p for p in model.parameters() if p.requires_grad]
    result, best_state, bad_evals, step, seen = FitResult(), None, 0, 0, 0
    lengths = train.lengths
    start = time.perf_counter()
    model.train()
    for epoch in range(cfg.epochs):
        batches = train_batches(lengths, cfg.batch_size, cfg.seed + epoch, cfg.bucket)
        bar = tqdm(total=len(batches), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not cfg.progress,
                   unit="batch", dynamic_ncols=True, leave=False,
                   mininterval=0.5 if sys.stderr.isatty() else 15)
        for i, idx in enumerate(batches):
            batch = train.batch(idx)
            with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                loss = loss_fn(model, batch)
            (loss / cfg.grad_accum).backward()
            seen += len(idx)
            if (i + 1) % cfg.grad_accum and i + 1 < len(batches):
                bar.update(1)
                continue
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            elapsed = time.perf_counter() - start
            row = {"step": step, "epoch": epoch + (i + 1) / len(batches), "loss": loss.item(),
                   "lr": sched.get_last_lr()[0], "examples_per_s": seen / elapsed, "elapsed_s": elapsed}
            result.log.append(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}", ex_s=f"{row['examples_per_s']:.0f}")
            bar.update(1)
        bar.close()
        train_time = time.perf_counter() - start
        entry = {"epoch": epoch + 1, "step": step, "train_loss": float(np.mean([r["loss"] for r in result.log[-len(batches):]]))}
        if eval_data is not None:
            entry.update(evaluate(model, eval_data))
            model.train()
            improved = not result.best or entry[main_metric] > result.best[main_metric]
            if improved:
                result.best = dict(entry)
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                bad_evals = 0
            else:
                bad_evals += 1
        result.history.append(entry)
        if cfg.progress:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in entry.items() if isinstance(v, float))
            tqdm.write(f"epoch {epoch + 1}: {shown}")
        start += time.perf_counter() - start - train_time  # evaluation time does not count as training time
        if cfg.patience and bad_evals >= cfg.patience:
            break
    result.seconds = time.perf_counter() - start
    result.examples_per_s = seen / max(result.seconds, 1e-9)
    if best_state is not None:
        model.load_state_dict(best_state)
    else:
        result.best = dict(result.history[-1]) if result.history else {}
    model.eval()
    model.backbone.embed.word.weight.requires_grad_(True)
    return result


def config_dict(cfg: TrainConfig) -> dict:
    return asdict(cfg)
