"""The options of the training commands (finetune, and the recipes that share :class:`RecipeOptions`).

Kept apart from the recipes, without torch: the command line builds its parser and prints ``--help`` from these
dataclasses alone (torch's import takes seconds).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from oztune.config import DEFAULT_MODEL, LORA_TARGETS

if TYPE_CHECKING:
    from oztune.data.load import Columns

PRECISIONS = ("auto", "bf16", "fp32")


@dataclass
class RecipeOptions:
    """Options every training recipe shares (finetune, distill, prune, compress); the CLI lists them last.

    Args:
        max_length: longest input in tokens; longer texts are truncated (default: the length the model was
            fine-tuned with).
        max_train_examples: train on a seeded random sample of this many examples.
        text_column: column holding the text (default: text, sentence, ...).
        text_pair_column: column holding the second text of a pair.
        label_column: column holding the label (default: label, labels, ...).
        seed: seed of sampling, shuffling, dropout and new layers.
        precision: auto (bf16 autocast where the CPU has bf16), bf16 or fp32.
        progress: show progress bars and the start and per-epoch lines (--no-progress: only the result).
    """

    max_length: int | None = None
    max_train_examples: int | None = None
    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str | None = None
    seed: int = 42
    precision: str = field(default="auto", metadata={"choices": PRECISIONS})
    progress: bool = True

    def columns(self) -> Columns:
        from oztune.data.load import Columns  # (torch: not imported by the command line's parser)

        return Columns(self.text_column, self.text_pair_column, self.label_column)


@dataclass
class FinetuneArgs(RecipeOptions):
    """Fine-tune a pre-trained transformer with a task head on labelled text.

    Args:
        train: training file (.csv, .tsv or .jsonl) with a text column and a label column.
        output: directory to write the fine-tuned model to (replaced atomically at the end).
        eval: evaluation file; metrics are printed each epoch and the best epoch is kept.
        eval_split: instead of --eval FILE, hold out this share of the training examples (after
            --max-train-examples; single-label: the same share of each label) as the evaluation set, seeded
            by --seed; their file lines go into run.json (0: off).
        model: pre-trained model name or directory (default: the bundled all-MiniLM-L6-v2).
        epochs: passes over the training data.
        batch_size: examples per step (per process under torchrun).
        lr: peak learning rate, linear warm-up then linear decay (default 1e-4; 5e-4 with --lora-rank).
        problem_type: single_label, multi_label or regression (default: inferred from the labels).
        max_length: longest input in tokens; longer texts are truncated (default: 128, or the model's window if
            shorter; saved with the model). At most the model's window (its position table).
        pooling: cls, mean or last (default: the family's standard head, which HF can load).
        head_hidden: widths of extra hidden layers in the head, comma-separated (e.g. 256,128).
        head_dropout: dropout in the head (default: the model's, as transformers reads it from its config.json:
            classifier_dropout, else hidden_dropout_prob; DistilBERT's seq_classif_dropout; else 0.1).
        warmup_ratio: share of steps spent warming up.
        weight_decay: AdamW weight decay.
        layer_lr_decay: layer-wise learning-rate decay d: the head trains at --lr, the top block at lr x d, each
            block below at d times the one above, the embeddings last (1: off; 0.8-0.95 is usual).
        grad_accum: batches accumulated per optimizer step.
        max_grad_norm: gradient clipping norm (0: off).
        patience: stop after this many evaluations without improvement on --eval (0: never).
        eval_every: evaluate on --eval every this many optimizer steps too, not only at each epoch's end
            (0: epoch ends only); the best evaluation's weights are kept.
        label_smoothing: smooth the training targets by this much, in [0, 1) (0: off; 0.1 is usual):
            single-label, the gold class's target is 1 - e and e is spread over all the classes; multi-label,
            each yes/no target is pulled toward 1/2. A regulariser that pulls the scores toward the middle (it
            can overshoot: the ece of the evaluations says; oztune calibrate is the step that calibrates). Not
            for regression.
        rdrop: R-Drop weight: run each batch twice with different dropout and add this weight x the two
            predictions' symmetric KL divergence to the loss, a regulariser (0: off; 0.5-1 is usual; a step
            costs about twice as much).
        ema_decay: evaluate and keep an exponential moving average of the weights with this decay, e.g.
            0.999 (0: off; the last or best weights as they are).
        tensorboard: also log every step and evaluation as TensorBoard events in this folder (needs the
            tensorboard package; `tensorboard --logdir FOLDER` shows the curves).
        freeze_embeddings: keep the token-embedding table fixed (faster; --no-freeze-embeddings trains it).
        checkpoint_every: write a resumable checkpoint every this many optimizer steps (0: never; each holds
            the model, the optimizer state and the best epoch's weights: ~300 MB for MiniLM).
        checkpoint_dir: folder for checkpoints (default: OUTPUT.checkpoints); they are deleted once the model is saved.
        keep_checkpoints: how many of the newest checkpoints to keep.
        resume: continue an interrupted run from its newest valid checkpoint (same command, plus --resume).
        lora_rank: train rank-R LoRA updates of the attention and feed-forward linears instead of all weights
            (0: full fine-tuning); they are merged into the weights when saving.
        lora_alpha: LoRA scale numerator: updates are multiplied by alpha / rank (default 2 x rank).
        lora_targets: linears that get LoRA, comma-separated from qkv, o, up, down.
        lora_dropout: dropout on the input of the LoRA updates.
        label_names: names of the class ids 0, 1, ..., comma-separated (e.g. negative,positive for SST-2's 0,1):
            the file's integer label k is class k, named by the k-th name; files with the original integer
            labels still evaluate against the model. Only for integer labels 0..N-1 (N names): a file whose
            labels are names already, or that holds another integer, is refused.
        class_weights: none, or balanced: weigh the loss so that every label counts as much in total, however
            rare (single-label: class c weighs N / (labels x count_c); multi-label: each label's positives
            weigh negatives / positives). For imbalanced data; the weights are printed and saved in run.json.

    Under torchrun (torchrun --nproc-per-node N -m oztune finetune ...), --batch-size is per process.
    """

    train: str = ""
    output: str = ""
    eval: str | None = None
    eval_split: float = 0.0
    model: str = DEFAULT_MODEL
    epochs: int = 3
    batch_size: int = 32
    lr: float | None = None
    problem_type: str | None = None
    pooling: str | None = None
    head_hidden: list[int] = field(default_factory=list)
    head_dropout: float | None = None
    warmup_ratio: float = 0.06
    weight_decay: float = 0.01
    layer_lr_decay: float = 1.0
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    patience: int = 0
    eval_every: int = 0
    tensorboard: str | None = None
    ema_decay: float = 0.0
    label_smoothing: float = 0.0
    rdrop: float = 0.0
    freeze_embeddings: bool = True
    checkpoint_every: int = 500
    checkpoint_dir: str | None = None
    keep_checkpoints: int = 2
    resume: bool = False
    lora_rank: int = 0
    lora_alpha: float | None = None
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    lora_dropout: float = 0.0
    label_names: list[str] = field(default_factory=list)
    class_weights: str = "none"

    def __post_init__(self) -> None:
        # one string is split at its commas, as the flags and QuantConfig's skip read it (iterated, "neg,pos"
        # named a class by each character)
        for name in ("label_names", "lora_targets"):
            if isinstance(getattr(self, name), str):
                setattr(self, name, [x.strip() for x in getattr(self, name).split(",") if x.strip()])

    @property
    def evaluates(self) -> bool:
        """Whether the run has an evaluation set (--eval FILE or --eval-split)."""
        return bool(self.eval or self.eval_split)

    def checkpoints_dir(self) -> str:
        """--checkpoint-dir, or by default OUTPUT.checkpoints beside the output (runs/m/. is runs/m)."""
        return self.checkpoint_dir or f"{os.path.normpath(self.output)}.checkpoints"
