"""Knowledge distillation: a student learns from a teacher's outputs, trained by the shared ``fit`` loop.

The loss mixes the teacher's softened outputs with the hard labels (Hinton et al., 2015):
``alpha * T^2 * KL(teacher/T || student/T) + (1 - alpha) * hard loss``, plus optionally the mean squared
error between hidden states of mapped layers (as in TinyBERT), when student and teacher widths match.
Without the hidden-state term the teacher runs once, in bf16 where the CPU has it, before training.
Students are the teacher with layers dropped (:func:`student_from_layers`) or a pruned teacher.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from oztune.compress.args import DistillArgs
from oztune.compress.prune import drop_layers_, evenly_spaced
from oztune.compress.quantize import is_int8
from oztune.compress.sparse import to_sparse_, zeros_keeper
from oztune.compress.vocab import tokens_seen
from oztune.data.dataset import EncodedData
from oztune.data.labels import gold_label2id
from oztune.data.load import Columns, encode_examples, holds_pairs, read_labelled
from oztune.errors import ModelError, OztuneError, check_positive
from oztune.models.hub import load_classifier, save_classifier
from oztune.models.transformer import SequenceClassifier
from oztune.outdir import check_output_dir
from oztune.train import distributed
from oztune.train.finetune import predict_usage, sample
from oztune.train.finetune import check_train_options as check_finetune_options
from oztune.train.loop import FitResult, TrainConfig, evaluate, fit, predict_logits


@dataclass
class DistillConfig:
    """How the student learns from the teacher.

    Args:
        temperature: softmax temperature of both outputs in the soft loss.
        alpha: weight of the soft (teacher) loss; 1 - alpha goes to the hard-label loss.
        hidden_weight: weight of the hidden-state MSE between mapped layers (0: off).
        layer_map: teacher layer matched to each student layer (default: spread evenly, last to last).
    """

    temperature: float = 2.0
    alpha: float = 0.5
    hidden_weight: float = 0.0
    layer_map: list[int] | None = None

    def __post_init__(self) -> None:
        check_positive("--temperature", self.temperature)
        if not 0 <= self.alpha <= 1:
            raise OztuneError(f"--alpha must be in [0, 1], not {self.alpha}")
        if not (self.hidden_weight >= 0 and math.isfinite(self.hidden_weight)):  # nan, inf: a nan student
            raise OztuneError(f"--hidden-weight must be 0 or more, not {self.hidden_weight}")


@dataclass
class TeacherData(EncodedData):
    """Encoded training data that also hands each batch the teacher's logits (``teacher_logits``, (B, L))."""

    teacher_logits: torch.Tensor | None = None

    def batch(self, idx) -> dict[str, torch.Tensor]:
        b = super().batch(idx)
        if self.teacher_logits is not None:
            b["teacher_logits"] = self.teacher_logits[torch.as_tensor(np.asarray(idx))]
        return b


def soft_loss(student: torch.Tensor, teacher: torch.Tensor, problem_type: str, T: float) -> torch.Tensor:
    """The teacher term: KL of softened distributions (x T^2), BCE to softened sigmoids, or MSE (regression)."""
    student, teacher = student.float(), teacher.float()
    if problem_type == "single_label":
        return F.kl_div(F.log_softmax(student / T, -1), F.log_softmax(teacher / T, -1), log_target=True,
                        reduction="batchmean") * T * T
    if problem_type == "multi_label":
        return F.binary_cross_entropy_with_logits(student / T, torch.sigmoid(teacher / T)) * T * T
    return F.mse_loss(student, teacher)


def default_layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """Teacher layer for each student layer, evenly spread, the last matched to the last."""
    return [round((i + 1) * teacher_layers / student_layers) - 1 for i in range(student_layers)]


def _hidden_states(model: SequenceClassifier, batch: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits and every layer's output (B, T, C)."""
    states: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda m, a, out: states.append(out)) for b in model.backbone.layers]
    try:
        logits = model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"), all_tokens=True)
    finally:
        for h in hooks:
            h.remove()
    return logits, states


def distill_loss_fn(teacher: SequenceClassifier | None, config: DistillConfig):
    """A ``loss_fn(student, batch)`` for :func:`fit`: soft + hard (+ hidden-state) loss.

    Args:
        teacher: the teacher, run on each batch when the hidden-state loss is on (else None: the batch
            carries precomputed ``teacher_logits``).
        config: temperature, mixing weight, hidden-state weight and layer map.
    """

    def loss_fn(student: SequenceClassifier, batch: dict) -> torch.Tensor:
        kind = student.head_cfg.problem_type
        hidden = 0.0
        if config.hidden_weight:
            logits, s_states = _hidden_states(student, batch)
            with torch.no_grad():
                t_logits, t_states = _hidden_states(teacher, batch)
            m = batch["attention_mask"].unsqueeze(-1).to(logits.dtype)  # (B, T, 1)
            for s, t in zip(s_states, (t_states[j] for j in config.layer_map)):
                hidden = hidden + (((s.float() - t.float()) ** 2) * m).sum() / (m.sum() * s.shape[-1])
            hidden = hidden / len(s_states)
        else:
            logits = student(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
            t_logits = batch["teacher_logits"]
        loss = config.alpha * soft_loss(logits, t_logits, kind, config.temperature)
        if config.alpha < 1:
            loss = loss + (1 - config.alpha) * student.loss(logits, batch["labels"])
        return loss + config.hidden_weight * hidden

    return loss_fn


def distill(teacher: SequenceClassifier, student: SequenceClassifier, train_data: EncodedData, cfg: TrainConfig,
            config: DistillConfig | None = None, eval_data: EncodedData | None = None,
            teacher_logits: torch.Tensor | None = None, on_step=None) -> FitResult:
    """Train ``student`` in place to match ``teacher`` (and the labels) on ``train_data``.

    Args:
        teacher: the trained model to learn from (left unchanged, kept in eval mode).
        student: the model to train: the teacher with layers dropped, pruned, or any model with the same labels.
        train_data: labelled training data.
        cfg: optimisation settings of the shared loop.
        config: distillation settings.
        eval_data: labelled data evaluated each epoch (the best epoch is kept).
        teacher_logits: the teacher's logits on ``train_data`` (N, L), when already computed (another shape is a
            ValueError).
        on_step: per-step callback passed to ``fit`` (e.g. a pruning schedule). By default, the zeros of a
            student pruned without structure stay zero (:func:`~oztune.compress.sparse.zeros_keeper`), and its
            layers that are plain Linears again (sliced by structured pruning) are stored compactly after.
    """
    config = config or DistillConfig()
    if is_int8(student):
        raise OztuneError("the student is an int8 model, whose weights do not train: distil into an fp32 "
                          "student, then quantize it")
    if teacher.head_cfg.num_labels != student.head_cfg.num_labels:
        raise OztuneError(f"teacher has {teacher.head_cfg.num_labels} outputs but the student "
                          f"{student.head_cfg.num_labels}")
    expected = (len(train_data), teacher.head_cfg.num_labels)
    if teacher_logits is not None and tuple(teacher_logits.shape) != expected:  # (rows: an IndexError, or misaligned)
        raise ValueError(f"teacher_logits has shape {tuple(teacher_logits.shape)}: expected {expected}, one row of "
                         "the teacher's logits per example of train_data, in its order")
    teacher.eval()
    if config.hidden_weight:
        if teacher.cfg.hidden_size != student.cfg.hidden_size:
            raise OztuneError(f"the hidden-state loss needs equal widths; teacher {teacher.cfg.hidden_size}, "
                              f"student {student.cfg.hidden_size}")
        config = copy.copy(config)
        config.layer_map = config.layer_map or default_layer_map(student.cfg.num_layers, teacher.cfg.num_layers)
        if len(config.layer_map) != student.cfg.num_layers or not all(
                0 <= j < teacher.cfg.num_layers for j in config.layer_map):
            raise OztuneError(f"layer_map {config.layer_map}: expected one teacher layer (0 to "
                              f"{teacher.cfg.num_layers - 1}) for each of the student's {student.cfg.num_layers} layers")
        data, loss_fn = train_data, distill_loss_fn(teacher, config)
    else:
        if teacher_logits is None:
            teacher_logits = torch.from_numpy(predict_logits(teacher, train_data, precision=cfg.precision))
        data = TeacherData(train_data.encoded, train_data.labels, train_data.pad_id, teacher_logits)
        loss_fn = distill_loss_fn(None, config)
    grads = [p.requires_grad for p in teacher.parameters()]
    teacher.requires_grad_(False)
    kept = zeros_keeper(student) if on_step is None else None  # (None too for a student without sparse layers)
    try:
        result = fit(student, data, cfg, eval_data, loss_fn=loss_fn, on_step=on_step or kept)
    finally:
        for p, g in zip(teacher.parameters(), grads):
            p.requires_grad_(g)
    if kept is not None:
        to_sparse_(student)
    return result


def student_from_layers(teacher: SequenceClassifier, n: int) -> tuple[SequenceClassifier, list[int]]:
    """A copy of the teacher keeping ``n`` evenly spaced layers; returns (student, kept teacher layers)."""
    keep = evenly_spaced(teacher.cfg.num_layers, n)
    return drop_layers_(copy.deepcopy(teacher), keep), keep


# --- shared by the prune, distill and compress recipes ------------------------------------------------------

def load_trained(path: str, option: str = "--model", max_length: int | None = None, int8_ok: bool = False):
    """Load a fine-tuned classifier: (model, encoder, meta); a model without a task head is a ModelError, and
    so is an int8 model unless ``int8_ok`` (training recipes need float weights)."""
    if not path:
        raise OztuneError(f"{option} is required")
    model, enc, meta = load_classifier(path, max_length=max_length)
    if not meta["trained"] or not meta["id2label"]:
        raise ModelError(f"{option} {path}: not a fine-tuned classifier (config.json has no task head or labels); "
                         "fine-tune it first with oztune finetune")
    if not int8_ok and is_int8(model):  # int8 weights do not train
        raise ModelError(f"{option} {path}: an int8 model; prune, distil or compress the fp32 model it was "
                         "quantized from (and quantize the result)")
    return model, enc, meta


@dataclass
class TaskData:
    """Training and evaluation data encoded for one fine-tuned model.

    Args:
        train: the (sampled) training examples.
        eval: the evaluation examples.
        eval_texts: the evaluation texts, for end-to-end timings.
        eval_pairs: their second texts, or None.
        train_tokens: (vocab_size,) bool, token ids occurring anywhere in the training file.
        text_pairs: whether the texts are text pairs: the model's record, or for a model saved before oztune
            recorded it, the training file's kind (what a model trained on it records).
    """

    train: EncodedData
    eval: EncodedData
    eval_texts: list[str]
    eval_pairs: list[str] | None
    train_tokens: torch.Tensor
    text_pairs: bool


def trained_text_pairs(recorded: bool | None, train_examples: list | None) -> bool | None:
    """Whether a model fine-tuned (further) on ``train_examples`` takes text pairs: its record (``recorded``,
    ``meta["text_pairs"]``), or for a model saved before oztune recorded it, the train file's kind (what a model
    trained on it records, as in finetune; the eval file must then be of that kind). None: not recorded and no
    train file (``train_examples`` None), nothing tells."""
    if recorded is not None or train_examples is None:
        return recorded
    return holds_pairs(train_examples)


def load_task_data(model: SequenceClassifier, enc, meta: dict, train: str, eval: str, columns: Columns,
                   max_train_examples: int | None, seed: int) -> TaskData:
    """Read and encode the train (sampled) and eval files with the model's labels; unknown labels are DataErrors,
    and so is a file of the other kind (text pairs or single texts) than the model was fine-tuned on."""
    if not train or not eval:
        raise OztuneError("--train and --eval are required")
    kind = model.head_cfg.problem_type

    def label2id(examples):  # by name, or by class id (gold_label2id)
        return None if kind == "regression" else gold_label2id(meta["id2label"], [e.label for e in examples])

    train_ex = read_labelled(train, columns, problem_type=kind, text_pairs=meta["text_pairs"])
    text_pairs = trained_text_pairs(meta["text_pairs"], train_ex)
    train_all = encode_examples(train_ex, enc, label2id(train_ex), kind, train)
    train_data = train_all.subset(sample(list(range(len(train_all))), max_train_examples, seed))
    eval_ex = read_labelled(eval, columns, problem_type=kind, text_pairs=text_pairs)
    pairs = [e.text_pair or "" for e in eval_ex] if holds_pairs(eval_ex) else None
    return TaskData(train_data, encode_examples(eval_ex, enc, label2id(eval_ex), kind, eval), [e.text for e in eval_ex],
                    pairs, tokens_seen(train_all, model.cfg.vocab_size), text_pairs)


def train_config(a: DistillArgs) -> TrainConfig:
    """The training loop's settings of a distill run (the token embeddings stay frozen)."""
    return TrainConfig(epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, precision=a.precision, seed=a.seed,
                       freeze_embeddings=True, progress=a.progress)


def check_train_options(a) -> None:
    """Shared checks of the training options of the prune, distill and compress recipes."""
    check_finetune_options(a)
    check_output_dir(a.output, inputs=tuple(getattr(a, k, None) for k in ("model", "teacher", "student", "train",
                                                                           "eval")))


def run_distill(a: DistillArgs) -> dict:
    """The distill recipe: load teacher and data, build the student, train it, save it; returns the run record.

    Under torchrun every process runs this and trains its share of each batch; only rank 0 saves, the
    others wait for it (as :func:`oztune.train.finetune.finetune`).
    """
    check_train_options(a)
    dcfg = DistillConfig(a.temperature, a.alpha, a.hidden_weight)
    if bool(a.student) == (a.student_layers is not None):  # (an empty --student is none given)
        raise OztuneError("give exactly one of --student DIR or --student-layers N")
    with distributed.joined() as env:  # (the other ranks wait while rank 0 saves)
        return _run_distill(a, dcfg, env.is_main)


def _run_distill(a: DistillArgs, dcfg: DistillConfig, saves: bool) -> dict:
    teacher, enc, meta = load_trained(a.teacher, "--teacher", a.max_length)
    if a.student:
        student, s_enc, s_meta = load_trained(a.student, "--student", a.max_length)
        if s_meta["id2label"] != meta["id2label"]:
            raise OztuneError(f"--student {a.student}: labels {list(s_meta['id2label'].values())} differ from the "
                              f"teacher's {list(meta['id2label'].values())}")
        if s_enc.tokenizer.get_vocab() != enc.tokenizer.get_vocab():  # it would read the teacher's token ids
            raise OztuneError(f"--student {a.student}: its tokenizer's vocabulary differs from the teacher's; "
                              "a student is trained on the teacher's tokens and saved with its tokenizer")
        if student.cfg.max_length < enc.max_length:  # a student with fewer positions: texts cut to what it reads
            enc.set_max_length(student.cfg.max_length)  # (not an IndexError in its position embedding)
    else:
        student, kept = student_from_layers(teacher, a.student_layers)
        dcfg.layer_map = kept
    data = load_task_data(teacher, enc, meta, a.train, a.eval, a.columns(), a.max_train_examples, a.seed)
    teacher_metrics = evaluate(teacher, data.eval) if saves else {}  # (reported by rank 0 alone)
    # (an unstructured-pruned student, from oztune prune without --structured, keeps its zeros: see distill)
    result = distill(teacher, student, data.train, train_config(a), dcfg, data.eval)
    run = {"command": "distill", "args": asdict(a), "teacher_metrics": teacher_metrics, "metrics": result.best,
           "history": result.history, "train_examples": len(data.train), "train_seconds": round(result.seconds, 1),
           "student": {"layers": student.cfg.num_layers, "heads": student.cfg.layer_heads, "ffn": student.cfg.layer_ffn,
                       "parameters": sum(p.numel() for p in student.parameters())}}
    if not saves:
        return run
    shape = f"{student.cfg.num_layers} layers, {run['student']['parameters'] / 1e6:.3g}M parameters"
    save_classifier(student, enc, a.output, meta["id2label"], run=run,
                    card=recipe_card("distilled student (oztune distill)", [f"Source: `{a.teacher}`; this model: {shape}"],
                                     teacher_metrics, result.best, a.output, text_pairs=data.text_pairs),
                    text_pairs=data.text_pairs)
    return run


def recipe_card(title: str, lines: list[str], before: dict, after: dict, output: str,
                columns: tuple[str, str] = ("source", "this model"), text_pairs: bool | None = None) -> str:
    """The model card README.md of a compressed model (quantize, prune, distill): what it came from, its
    metrics beside the source's, and its ``oztune predict`` command (of text pairs for a model fine-tuned on them,
    see :func:`oztune.train.finetune.predict_usage`)."""
    rows = "\n".join(f"| {k} | {before.get(k, float('nan')):.4f} | {v:.4f} |"
                     for k, v in after.items() if isinstance(v, float))
    bullets = "\n".join(f"- {line}" for line in lines)
    table = (f"| metric | {columns[0]} | {columns[1]} |\n|---|---|---|\n{rows}" if rows else
             "Not evaluated (no evaluation file was given): `oztune evaluate --model DIR --data FILE` scores it.")
    return f"""# {title}

{bullets}

{table}

```bash
{predict_usage(output, text_pairs)[0]}
```
"""
