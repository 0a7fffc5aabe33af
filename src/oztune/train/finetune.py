"""The fine-tuning recipe: labelled file -> pre-trained model + task head -> trained, evaluated, saved."""

from __future__ import annotations

import csv
import io
import math
import time
from pathlib import Path
from dataclasses import asdict, replace

import numpy as np
import torch

from oztune.config import DEFAULT_ALIASES, LORA_TARGETS
from oztune.data.labels import are_class_ids, gold_label2id, named_class_ids
from oztune.data.load import encode_examples, hold_out, holds_pairs, label_setup, read_labelled
from oztune.errors import ModelError, OztuneError, check_at_least_1, check_positive
from oztune.models.hub import (load_classifier, model_config, new_head_, read_config, resolve_model,
                               save_classifier)
from oztune.models.lora import apply_lora, check_targets, lora_alpha, merge_lora
from oztune.outdir import check_output_dir
from oztune.train import distributed
from oztune.train.args import PRECISIONS, FinetuneArgs
from oztune.train.checkpoint import Checkpointer, remove_checkpoints
from oztune.train.loop import TrainConfig, balanced_class_weights, fit, out_of_range, seed_everything
from oztune.train.metrics import metric_values
from oztune.train.tensorboard import check_available


FULL_LR, LORA_LR = 1e-4, 5e-4  # default peak learning rates: all weights, LoRA updates


# The widest --head-hidden layer: far beyond any use (its weights would outweigh the model's), and a width past
# a C long (2**63) was a torch overflow blamed on the model's config.json, with torch's C++ stack.
MAX_HEAD_WIDTH = 2**20

TRAIN_MAX_LENGTH = 128  # finetune's default --max-length (SST-2's longest sentence is ~70 tokens)


def train_config(a: FinetuneArgs) -> TrainConfig:
    """The training loop's settings of a finetune run."""
    return TrainConfig(epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, weight_decay=a.weight_decay,
                       layer_lr_decay=a.layer_lr_decay, warmup_ratio=a.warmup_ratio,
                       max_grad_norm=a.max_grad_norm, grad_accum=a.grad_accum,
                       precision=a.precision, seed=a.seed, patience=a.patience,
                       eval_every=a.eval_every, tensorboard=a.tensorboard,
                       ema_decay=a.ema_decay, rdrop=a.rdrop, label_smoothing=a.label_smoothing,
                       freeze_embeddings=a.freeze_embeddings, progress=a.progress,
                       checkpoint_dir=a.checkpoints_dir(), checkpoint_every=a.checkpoint_every,
                       keep_checkpoints=a.keep_checkpoints, resume=a.resume)


def check_seed(seed: int) -> None:
    """A --seed torch can take: from 0 to 2**63 - 1 (torch.manual_seed overflows beyond; fit adds the rank)."""
    if not 0 <= seed < 2**63:
        raise OztuneError(f"--seed must be from 0 to 2**63 - 1, not {seed}")


def check_sample_size(n: int | None) -> None:
    """A --max-train-examples :func:`sample` can take: none given, or at least 1 (0 and negatives are refused
    alike by every command that has the option: finetune, quantize, prune, distill and compress)."""
    check_at_least_1("--max-train-examples", n)


def check_train_options(a, at_least_one: tuple = ()) -> None:
    """Checks shared by the training recipes (finetune, prune, distill, compress); ``a.lr`` None means default."""
    for name in ("epochs", "batch_size", "max_length", *at_least_one):
        check_at_least_1(f"--{name.replace('_', '-')}", getattr(a, name))
    check_positive("--lr", a.lr)
    check_seed(a.seed)
    check_sample_size(a.max_train_examples)
    if a.precision not in PRECISIONS:
        raise OztuneError(f"--precision must be auto, bf16 or fp32, not {a.precision!r}")


def regression_label_names(names: list[str], why: str) -> str:
    """The error for --label-names on a regression task, which has no classes to name."""
    return (f"--label-names {','.join(names)} names integer class ids, but {why} (numbers to predict, not "
            "classes): drop --label-names")


def check_args(a: FinetuneArgs) -> None:
    """Reject bad option values and an unwritable output before any work is done."""
    check_train_options(a, ("grad_accum",))
    if not (a.lora_rank >= 0 and math.isfinite(a.lora_rank)):
        raise OztuneError(f"--lora-rank must be 0 or more, not {a.lora_rank}")
    for name in ("checkpoint_every", "eval_every", "patience", "weight_decay", "max_grad_norm", "rdrop", "warmup_ratio",
                 "ema_decay", "layer_lr_decay", "keep_checkpoints",
                 "label_smoothing"):  # (TrainConfig's rules: the same in Python)
        error = out_of_range(name, getattr(a, name))
        if error:
            raise OztuneError(f"--{name.replace('_', '-')} {error}")
    check_positive("--lora-alpha", a.lora_alpha)
    for name in ("lora_dropout", "head_dropout"):
        if getattr(a, name) is not None and not 0 <= getattr(a, name) < 1:
            raise OztuneError(f"--{name.replace('_', '-')} must be in [0, 1), not {getattr(a, name)}")
    if any(not 1 <= w <= MAX_HEAD_WIDTH for w in a.head_hidden):
        raise OztuneError(f"--head-hidden {','.join(map(str, a.head_hidden))}: each width must be at least 1 "
                          f"and at most {MAX_HEAD_WIDTH:,}")
    if not a.lora_rank:
        given = [name for name, v in (("--lora-alpha", a.lora_alpha is not None), ("--lora-dropout", a.lora_dropout),
                                      ("--lora-targets", a.lora_targets != list(LORA_TARGETS))) if v]
        if given:
            raise OztuneError(f"{', '.join(given)} set{'s' if len(given) == 1 else ''} up LoRA updates: give "
                              "--lora-rank R too (without it every weight trains)")
    if a.lora_rank:
        check_targets(a.lora_targets)
    if a.lora_rank and not a.freeze_embeddings:
        raise OztuneError("--no-freeze-embeddings trains the token embeddings, but with --lora-rank only the LoRA "
                          "updates and the task head train: drop one of the two")
    if not 0 <= a.eval_split < 1:
        raise OztuneError(f"--eval-split is the share of training examples held out, in [0, 1), not {a.eval_split}")
    if a.eval_split and a.eval:
        raise OztuneError("give --eval FILE or --eval-split, not both")
    for name in ("patience", "eval_every"):
        if getattr(a, name) and not a.evaluates:
            raise OztuneError(f"--{name.replace('_', '-')} works on the --eval metrics: give --eval FILE or --eval-split")
    if a.pooling not in (None, "cls", "mean", "last"):
        raise OztuneError(f"--pooling must be cls, mean or last, not {a.pooling!r}")
    if a.problem_type not in (None, "single_label", "multi_label", "regression"):
        raise OztuneError(f"--problem-type must be single_label, multi_label or regression, not {a.problem_type!r}")
    if a.label_names and a.problem_type == "regression":
        raise OztuneError(regression_label_names(a.label_names, "--problem-type regression"))
    if a.class_weights not in ("none", "balanced"):
        raise OztuneError(f"--class-weights must be none or balanced, not {a.class_weights!r}")
    check_output_dir(a.output, inputs=(a.train, a.eval, a.model))
    if a.tensorboard:
        check_available()
        _outside_output(a, "--tensorboard", a.tensorboard)
    if a.checkpoint_every or a.resume:
        _outside_output(a, "--checkpoint-dir", a.checkpoints_dir())
        check_output_dir(a.checkpoints_dir(), "--checkpoint-dir", replaced=False)
    if a.checkpoint_every and not a.resume:
        Checkpointer(a.checkpoints_dir(), a.checkpoint_every, a.keep_checkpoints, {}).check_fresh_start()
    if Path(a.model).is_dir():  # (a hub id, or the bundled default: checked when resolved, before loading)
        check_model(a, resolve_model(a.model))
    elif a.model in DEFAULT_ALIASES:
        try:
            path = resolve_model(a.model)
        except ModelError:  # (its package is not installed: said when it is loaded)
            return
        check_model(a, path)


def check_model(a: FinetuneArgs, path: Path) -> None:
    """Refuse a model that ``a`` cannot fine-tune, from its config.json alone (``path``: its directory): an int8
    model (its weights do not train), or a --max-length beyond its position table."""
    hf = read_config(path)
    if hf.get("oztune", {}).get("quantization"):
        raise OztuneError(f"--model {a.model}: an int8 model (from oztune quantize), whose weights do not train; "
                          "fine-tune the fp32 model it was quantized from and quantize the result, or use "
                          "oztune quantize --qat-train FILE for quantization-aware fine-tuning")
    if a.max_length is not None:  # (the default, 128, is cut to the window: it was not asked for)
        window = model_config(path, hf).max_length
        if a.max_length > window:
            raise OztuneError(f"--max-length {a.max_length}: the model reads at most {window} tokens (its position "
                              f"table); give at most {window}")


def _outside_output(a: FinetuneArgs, option: str, folder: str) -> None:
    """A folder the run writes to while training must not be inside --output, which is replaced at the end."""
    if Path(folder).resolve().is_relative_to(Path(a.output).resolve()):
        raise OztuneError(f"{option} {folder} is inside --output {a.output}, which is replaced when the model is "
                          "saved: give a folder outside it")


def sample(examples: list, n: int | None, seed: int) -> list:
    """A seeded random sample of ``n`` examples (all of them, in order, when n is None or too large)."""
    if not n or n >= len(examples):
        return examples
    idx = np.sort(np.random.default_rng(seed).permutation(len(examples))[:n])
    return [examples[i] for i in idx]


def model_class_ids(model_id2label: dict[int, str], label2id: dict[str, int]) -> dict[str, int] | None:
    """``label2id`` reading a training file's labels (``label2id``: the file's) as the class ids of a fine-tuned
    model, or None: where the model's labels are names and the file's are integers that are not among them, all
    class ids of the model (0..N-1), as every command that reads labelled files reads gold labels
    (:func:`~oztune.data.labels.gold_label2id`). Other integers are other labels (a new head)."""
    by_id = gold_label2id(model_id2label, list(label2id))
    if are_class_ids(model_id2label.values()) or by_id != {str(k): k for k in model_id2label}:
        return None  # read by name
    return by_id if set(label2id) <= set(by_id) else None


def finetune(a: FinetuneArgs) -> dict:
    """Run the recipe; returns the run record (arguments, label map, metrics, timings).

    Under torchrun every process runs this; only rank 0 prints and saves, the others wait for it.
    """
    if a.lr is None:
        a = replace(a, lr=LORA_LR if a.lora_rank else FULL_LR)
    check_args(a)
    with distributed.joined() as env:  # (the other ranks wait while rank 0 saves)
        return _finetune(a, env)


def _finetune(a: FinetuneArgs, env: distributed.DistEnv) -> dict:
    seed_everything(a.seed)
    cols = a.columns()
    train_ex = sample(read_labelled(a.train, cols, problem_type=a.problem_type), a.max_train_examples, a.seed)
    problem_type, label2id = label_setup(train_ex, a.problem_type, a.train)
    if a.label_names and problem_type == "regression":
        raise OztuneError(regression_label_names(a.label_names, f"{a.train} holds regression targets"))
    if a.label_smoothing and problem_type == "regression":
        raise OztuneError(f"--label-smoothing smooths class labels, but {a.train} holds regression targets (numbers "
                          "to predict): drop --label-smoothing")
    if a.label_names and label2id and not are_class_ids(label2id):
        # names for names: the model would know only the new ones, and this very --eval file (and every file
        # labelled like it) would no longer evaluate against it
        raise OztuneError(f"--label-names names integer class ids (e.g. SST-2's 0,1); {a.train}'s labels are "
                          f"already names ({', '.join(map(str, label2id))}): use them as they are, or rename them in the file")
    text_pairs = holds_pairs(train_ex)  # recorded with the model, which then refuses the other kind of input
    eval_ex = read_labelled(a.eval, cols, problem_type=problem_type, text_pairs=text_pairs) if a.eval else None
    num_labels = len(label2id) if label2id else 1
    if problem_type == "single_label" and num_labels < 2:
        raise OztuneError(f"{a.train}: every example has the label {next(iter(label2id), '?')!r}; "
                          "a classifier needs at least 2 labels")
    if a.label_names and label2id:  # label k is class k, as evaluate and the other commands read such files
        label2id = named_class_ids(a.label_names, [e.label for e in train_ex], problem_type, path=a.train,
                                   lines=[e.line for e in train_ex])
        num_labels = len(label2id)
    if a.eval_split:  # after the label map: a label held out entirely would still have its output
        train_ex, eval_ex = hold_out(train_ex, a.eval_split, a.seed, stratify=problem_type == "single_label")
        if not eval_ex:
            raise OztuneError(f"--eval-split {a.eval_split} of {len(train_ex)} training examples holds out none: "
                              "give a larger share, more examples, or --eval FILE")
    head = {} if a.head_dropout is None else {"dropout": a.head_dropout}
    if a.pooling:
        head["pooling"] = a.pooling
    if a.head_hidden:
        head.update(hidden_sizes=list(a.head_hidden), activation="gelu")
    path = resolve_model(a.model)  # (a hub id: downloaded here)
    check_model(a, path)
    model, enc, meta = load_classifier(path, num_labels=num_labels, problem_type=problem_type, head=head,
                                       max_length=a.max_length)
    if a.max_length is None:  # the default, not asked for: cut to the window of a model that reads fewer tokens
        enc.set_max_length(min(TRAIN_MAX_LENGTH, model.cfg.max_length))
    id2label = {i: n for n, i in label2id.items()} if label2id else {0: "value"}
    if a.label_names:
        id2label = dict(enumerate(a.label_names))
    elif meta["trained"] and label2id and model.head_cfg.problem_type == problem_type:
        by_id = model_class_ids(meta["id2label"], label2id)
        if by_id:  # SST-2's 0/1 on a model fine-tuned for negative/positive: its head and names are kept
            label2id, id2label, num_labels = by_id, dict(meta["id2label"]), len(by_id)
    if meta["trained"] and (model.head_cfg.problem_type, meta["id2label"]) != (problem_type, id2label):
        if env.is_main:  # a fine-tuned model on other labels: its head's outputs would mean something else
            print(f"oztune: {a.model} was fine-tuned for other labels ({', '.join(map(str, meta['id2label'].values()))}"
                  f"); its task head is replaced by a new one", flush=True)
        new_head_(model, num_labels, problem_type, head)
    t0 = time.perf_counter()
    train_data = encode_examples(train_ex, enc, label2id, problem_type, a.train)
    if eval_ex and problem_type != "regression":  # read as `oztune evaluate` reads it: by name, or as class ids
        eval_label2id = gold_label2id(id2label, [e.label for e in eval_ex])
    else:
        eval_label2id = label2id
    eval_data = encode_examples(eval_ex, enc, eval_label2id, problem_type, a.eval or a.train) if eval_ex else None
    tokenize_s = time.perf_counter() - t0
    if a.lora_rank:
        apply_lora(model, a.lora_rank, a.lora_alpha, a.lora_targets, a.lora_dropout)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad and not (
        a.freeze_embeddings and p is model.backbone.embed.word.weight))
    if a.progress and env.is_main:
        lora = f", LoRA rank {a.lora_rank} on {','.join(a.lora_targets)}" if a.lora_rank else ""
        procs = f"; {env.world} processes x batch {a.batch_size}" if env.world > 1 else ""
        print(f"oztune: fine-tuning {a.model} on {len(train_ex):,} examples of {a.train} "
              f"({problem_type}, {num_labels} output{'s' if num_labels > 1 else ''}); "
              f"{total / 1e6:.3g}M parameters, {trainable / 1e6:.3g}M trainable ({100 * trainable / total:.1f}%"
              f"{lora}){procs}", flush=True)
    cfg = train_config(a)
    if a.class_weights == "balanced":
        if problem_type == "regression":
            raise OztuneError("--class-weights balanced weighs labels: this is a regression task (no labels)")
        weights = balanced_class_weights(train_data.labels, problem_type, num_labels)
        cfg = replace(cfg, class_weights=[round(w, 6) for w in weights])
        if a.progress and env.is_main:
            print("oztune: class weights " + ", ".join(f"{id2label[i]} {w:.3g}" for i, w in enumerate(cfg.class_weights)),
                  flush=True)
    result = fit(model, train_data, cfg, eval_data)
    if a.lora_rank:
        merge_lora(model)
    run = {"command": "finetune", "args": asdict(a), "problem_type": problem_type, "max_length": enc.max_length,
           "train_examples": len(train_ex),
           "eval_examples": len(eval_ex) if eval_ex else 0, "metrics": result.best, "history": result.history,
           "parameters": total, "trainable_parameters": trainable, "processes": env.world,
           "train_seconds": round(result.seconds, 1), "train_examples_per_s": round(result.examples_per_s, 1),
           "tokenize_seconds": round(tokenize_s, 2), "torch": torch.__version__, "class_weights": cfg.class_weights,
           "precision": result.precision}
    if a.eval_split:  # which lines of --train were evaluated on, not trained on
        run["eval_lines"] = [e.line for e in eval_ex]
    if env.is_main:
        save_classifier(model, enc, a.output, id2label, run=run, card=model_card(a, run, id2label, text_pairs),
                        extra_files={"train_log.csv": log_csv(result.log)}, text_pairs=text_pairs)
        if cfg.checkpoint_dir and (cfg.checkpoint_every or cfg.resume):
            remove_checkpoints(cfg.checkpoint_dir)  # the run is finished and saved
    return run


def log_csv(rows: list[dict]) -> str:
    """The per-step training log as CSV text."""
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return buf.getvalue()


def predict_usage(output: str, text_pairs: bool | None) -> tuple[str, str]:
    """The model card's ``oztune predict`` command and Python call: of a text, or for a model fine-tuned on text
    pairs (which refuses single texts) of a file of pairs and of a text with its second text."""
    if text_pairs:
        return (f"oztune predict --model {output} --input pairs.tsv  # columns sentence1, sentence2 "
                "(or name them: --text-column, --text-pair-column)",
                f'oztune.Classifier.from_pretrained("{output}").predict(["a man is playing a guitar"], '
                '["someone plays an instrument"])')
    return (f'oztune predict --model {output} "a charming and often affecting journey"',
            f'oztune.Classifier.from_pretrained("{output}").predict(["a charming and often affecting journey"])')


def model_card(a: FinetuneArgs, run: dict, id2label: dict, text_pairs: bool | None = None) -> str:
    """A short README.md for the saved model: what it is, how it was trained, how well it does, how to use it
    (``text_pairs``: whether it was fine-tuned on text pairs, see :func:`predict_usage`)."""
    metrics = "\n".join(f"| {k} | {v:.4f} |" for k, v in metric_values(run["metrics"]).items())
    ran = run["history"][-1]["epoch"] if run["history"] else a.epochs  # fewer than asked after an early stop
    trained = f"{a.epochs} epoch(s)" if ran == a.epochs else f"{round(ran, 2):g} of {a.epochs} epoch(s) (stopped early)"
    kept = ""
    if a.evaluates and run["history"]:
        e = run["metrics"].get("epoch")
        kept = (f" (kept: the best evaluation, at step {run['metrics'].get('step')}, epoch {e:.2f})"
                if isinstance(e, float) else f" (kept: the best evaluation, epoch {e})")
    if a.eval_split:
        evaluated = (f" on {run['eval_examples']:,} examples of `{a.train}` held out from training "
                     f"(--eval-split {a.eval_split}){kept}")
    else:
        evaluated = f" on `{a.eval}`{kept}" if a.eval else " (no --eval file: the training loss)"
    extras = f", R-Drop {a.rdrop:g}" if a.rdrop else ""
    extras += f", label smoothing {a.label_smoothing:g}" if a.label_smoothing else ""
    if a.lora_rank:
        extras += (f", LoRA rank {a.lora_rank} on {', '.join(a.lora_targets)} "
                   f"(alpha {lora_alpha(a.lora_rank, a.lora_alpha):g}, merged into the weights)")
    if a.ema_decay:
        extras += f"; the kept weights are a moving average (decay {a.ema_decay:g})"
    weights = ", class weights " + ", ".join(f"{w:.3g}" for w in run["class_weights"]) if run.get("class_weights") else ""
    precision = run.get("precision", a.precision) + (" (auto)" if a.precision == "auto" else "")  # what ran
    command, call = predict_usage(a.output, text_pairs)
    return f"""# Fine-tuned with oztune

- Base model: `{a.model}`
- Task: {run['problem_type']} on `{a.train}` ({run['train_examples']:,} examples), labels: {', '.join(map(str, id2label.values()))}
- Training: {trained}, batch {a.batch_size}, lr {a.lr}, max length {run['max_length']}, precision {precision}, seed {a.seed}{extras}{weights}
- Time: {run['train_seconds']} s ({run['train_examples_per_s']} examples/s)

## Evaluation{evaluated}

| metric | value |
|---|---|
{metrics}

## Use

```bash
{command}
```

```python
import oztune
{call}
```

The run's arguments and the metrics of every evaluation are in `run.json`; every optimizer step is in `train_log.csv`.
"""
