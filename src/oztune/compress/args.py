"""The options of the compression commands: quantize, prune, distill, compress, compare.

Kept apart from the recipes, without torch: the command line builds its parser and prints ``--help`` from these
dataclasses alone (torch's import takes seconds).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from oztune.train.args import RecipeOptions

RECIPES = ("int8", "prune", "prune-int8")  # what oztune compress tries (--recipes)
FASTEST = ("throughput", "latency")  # what compress and compare call fastest: batch-64 texts/s, batch-1 p50
LATENCY_TEXTS = 256  # batch-1 latency is timed on at most this many eval texts (p50 and p95 settle well before)
IMPORTANCE_BATCHES = 32  # training batches over which --structured measures importance, by default


@dataclass
class QuantizeArgs:
    """Quantize a fine-tuned classifier to int8: every Linear runs int8 x int8 (weights per output channel,
    activations per token at run time), embeddings are stored int8. Optionally quantization-aware
    fine-tuning first, when plain quantization loses too much.

    Args:
        model: fine-tuned model directory (from oztune finetune, prune or distill).
        output: directory to write the quantized model to (replaced atomically).
        scheme: int8 (dynamic per-token int8 activations x per-channel int8 weights in every Linear).
        skip: module-name patterns kept in fp32, comma-separated (e.g. head.*,backbone.layers.5.*); patterns that
            leave nothing to quantize are refused.
        embeddings: int8 (weight-only, one scale per row) or none (keep them fp32).
        weight_bits: 8, or 7 (the Linear weights' codes within +-63: what oneDNN's int8 kernel computes exactly
            and fast on x86 CPUs without VNNI). Default: 7 on such a CPU, else 8.
        eval: labelled file: print the metrics before and after quantization.
        qat_train: labelled file for quantization-aware fine-tuning before converting (default: none).
        qat_epochs: epochs of quantization-aware fine-tuning (default 1; only with --qat-train).
        qat_lr: peak learning rate of quantization-aware fine-tuning (default 2e-5; only with --qat-train).
        max_train_examples: quantization-aware fine-tuning on a seeded random sample of this many examples of
            --qat-train (the sample oztune finetune takes with the same number and --seed).
        batch_size: examples per step of quantization-aware fine-tuning and per forward pass of evaluation.
        max_length: longest input in tokens (default: the length the model was fine-tuned with).
        text_column: column holding the text.
        text_pair_column: column holding the second text of a pair.
        label_column: column holding the label.
        seed: seed of quantization-aware fine-tuning.
        progress: show progress bars and the start and per-epoch lines (--no-progress: only the result).
    """

    model: str = ""
    output: str = ""
    scheme: str = "int8"
    skip: list[str] = field(default_factory=list)
    embeddings: str = "int8"
    weight_bits: int | None = None
    eval: str | None = None
    qat_train: str | None = None
    qat_epochs: int | None = None  # (None: not given, QAT_EPOCHS; so that one given without --qat-train is seen)
    qat_lr: float | None = None  # (None: not given, QAT_LR)
    max_train_examples: int | None = None
    batch_size: int = 32
    max_length: int | None = None
    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str | None = None
    seed: int = 42
    progress: bool = True


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
        eval: evaluation file (required): the metrics before and after; with --structured, the best epoch of the
            recovery is kept.
        output: directory to write the pruned model to.
        sparsity: share of weights removed, in [0, 1); with --structured, the share of heads and neurons. Options
            that prune nothing (--sparsity 0 alone; --structured with no heads, neurons or layers) are refused.
        structured: remove whole heads, neurons and layers instead of single weights (the zeros of an
            unstructured-pruned --model are kept through the recovery).
        heads: with --structured, share of heads to remove (default: --sparsity).
        ffn: with --structured, share of FFN neurons to remove (default: --sparsity).
        layers: with --structured, number of whole layers to remove.
        importance_batches: with --structured, training batches over which importance is measured (default 32).
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
    importance_batches: int | None = None  # (None: not given, so that one given without --structured is seen)
    epochs: int = 2
    batch_size: int = 32
    lr: float = 1e-4
    temperature: float = 2.0
    alpha: float = 0.5


@dataclass
class DistillArgs(RecipeOptions):
    """Distil a fine-tuned teacher into a smaller student (its layers dropped, or a pruned model).

    Args:
        teacher: fine-tuned model directory to learn from.
        train: training file (.csv, .tsv or .jsonl) with the teacher's labels.
        eval: evaluation file (required); the best epoch on it is kept.
        output: directory to write the student to.
        student: start from this model directory (e.g. the output of oztune prune --structured); an
            unstructured-pruned student keeps its zeros while it trains.
        student_layers: or build the student from this many evenly spaced teacher layers.
        temperature: softmax temperature of the soft loss.
        alpha: weight of the teacher's soft loss (1 - alpha: the hard labels).
        hidden_weight: weight of the hidden-state MSE between mapped layers (0: off; runs the teacher each step).
        epochs: passes over the training data.
        batch_size: examples per step.
        lr: peak learning rate.
    """

    teacher: str = ""
    train: str = ""
    eval: str = ""
    output: str = ""
    student: str | None = None
    student_layers: int | None = None
    temperature: float = 2.0
    alpha: float = 0.5
    hidden_weight: float = 0.0
    epochs: int = 3
    batch_size: int = 32
    lr: float = 1e-4


@dataclass
class CompressArgs(RecipeOptions):
    """Try compression recipes and keep the fastest variant within an accuracy budget, with a report.

    Time: on SST-2 (MiniLM-L6 fine-tuned; defaults: 40,000 training examples, 2 epochs, two sizes) about
    16 minutes on one busy core of a shared 2-core machine (most of it the two distillations); fewer
    --max-train-examples, --epochs or --sizes, or --recipes int8 alone, make it shorter.

    Args:
        model: fine-tuned model directory (from oztune finetune).
        train: training file for importance ranking and distillation (the model's labels).
        eval: evaluation file (required): every variant is scored and timed on it.
        output: directory for the kept model, variants/<name>/, report.md, report.json, pareto.png and (for a
            classifier) reliability.png.
        max_drop: budget: at most this many points of the model's main metric below the fp32 model; points are
            percent of accuracy (single-label), micro-F1 x100 (multi-label) or Pearson x100 (regression):
            1 point = 0.01 of the metric.
        recipes: comma-separated recipes to try: int8, prune, prune-int8.
        sizes: comma-separated shares of the encoder's weights that pruning keeps (each from 0.01 to 0.99).
        importance_batches: training batches over which heads, neurons and layers are ranked.
        epochs: epochs of distillation that recover each pruned model.
        batch_size: examples per distillation step.
        lr: peak learning rate of the recovery.
        temperature: softmax temperature of the distillation loss.
        alpha: weight of the teacher's soft loss (1 - alpha: the hard labels).
        max_train_examples: use a seeded random sample of this many training examples (at least 1; a count
            above the file's size uses all of it).
        prune_vocab: pruned variants keep only the embeddings of tokens in the training file (others read
            [UNK]; about 3x smaller on SST-2); --no-prune-vocab keeps the whole vocabulary.
        keep_variants: keep every variant under variants/ (--no-keep-variants: only the kept model).
        fastest: which variant within the budget is kept: the highest throughput (texts/s in batches of 64: batch
            work, a server) or the lowest latency (batch-1 p50: one text at a time), which can differ (int8 on
            a CPU without VNNI).
    """

    model: str = ""
    train: str = ""
    eval: str = ""
    output: str = ""
    max_drop: float = 1.0
    recipes: list[str] = field(default_factory=lambda: list(RECIPES))
    sizes: list[float] = field(default_factory=lambda: [0.5, 0.33])
    importance_batches: int = IMPORTANCE_BATCHES
    epochs: int = 2
    batch_size: int = 32
    lr: float = 2e-4
    temperature: float = 2.0
    alpha: float = 0.5
    max_train_examples: int | None = 40000
    prune_vocab: bool = True
    keep_variants: bool = True
    fastest: str = field(default="throughput", metadata={"choices": FASTEST})


@dataclass
class CompareArgs:
    """Measure saved models the same way, side by side: score, file size, batch-1 latency, batch-64 throughput.

    Args:
        models: model directories (from finetune, quantize, prune, distill, compress) or exports (ONNX, aoti);
            the first is the baseline the others are compared with.
        eval: labelled file (.csv, .tsv or .jsonl) every model is scored and timed on.
        output: directory to write report.md, report.json, pareto.png and (classifiers) reliability.png into
            (other files in it are kept).
        max_drop: budget: the fastest model at most this many points of the main metric below the first one is
            marked; points are percent of accuracy (single-label), micro-F1 x100 (multi-label) or Pearson x100
            (regression): 1 point = 0.01 of the metric.
        text_column: column holding the text.
        text_pair_column: column holding the second text of a pair.
        label_column: column holding the label.
        latency_texts: batch-1 latency is timed on at most this many eval texts, spread evenly over the file
            (batch-64 throughput on every one).
        fastest: which model within the budget is marked: the highest throughput (texts/s in batches of 64) or
            the lowest latency (batch-1 p50).
    """

    models: list[str] = field(default_factory=list, metadata={"positional": True})
    eval: str = ""
    output: str | None = None
    max_drop: float = 1.0
    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str | None = None
    latency_texts: int = LATENCY_TEXTS
    fastest: str = field(default="throughput", metadata={"choices": FASTEST})
