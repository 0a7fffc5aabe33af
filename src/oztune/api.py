"""The Python face of a saved model: ``Classifier.from_pretrained(dir).predict(texts)``."""

from __future__ import annotations

import os
from collections.abc import Iterable

import numpy as np
import torch

from oztune.config import check_count
from oztune.data.dataset import EncodedData
from oztune.data.labels import gold_label2id
from oztune.data.load import Columns, encode_examples, read_labelled
from oztune.data.readers import is_blank
from oztune.errors import OztuneError, check_text_pairs
from oztune.models.hub import check_id2label, load_classifier, require_trained
from oztune.models.kernels import freeze_
from oztune.models.transformer import SequenceClassifier, scores
from oztune.data.tokenize import TextEncoder
from oztune.train.loop import predict_logits
from oztune.train.metrics import evaluation_metrics, label_report, labels_on, reliability as reliability_bins


def format_predictions(logits: np.ndarray, problem_type: str, id2label: dict[int, str],
                       all_scores: bool = False) -> list[dict]:
    """One dict per row of the model's ``logits`` (N, num_labels), as :meth:`Classifier.predict` returns them.
    Labels are decided on the logits by the rule of the metrics (the argmax; a multi-label model's labels on:
    :func:`oztune.train.metrics.labels_on`), so that a near tie that float32 probabilities round to equal
    is the same label everywhere; scores are the probabilities (regression: the value)."""
    probs = scores(torch.from_numpy(logits), problem_type).numpy()
    if problem_type == "single_label":
        chosen = logits.argmax(-1).tolist()
    elif problem_type == "multi_label":
        on_rows = labels_on(logits).tolist()
    out = []
    for k, p in enumerate(probs):
        if problem_type == "single_label":
            i = chosen[k]
            r = {"label": id2label.get(i, str(i)), "score": float(p[i])}
        elif problem_type == "multi_label":
            on = [i for i, v in enumerate(on_rows[k]) if v]
            r = {"label": [id2label.get(i, str(i)) for i in on], "score": [float(p[i]) for i in on]}
        else:
            r = {"label": None, "score": float(p[0])}
        if all_scores and problem_type != "regression":  # (Predictor.predict refuses all_scores for regression)
            r["scores"] = {id2label.get(i, str(i)): float(v) for i, v in enumerate(p)}
        out.append(r)
    return out


def check_classification_only(problem_type: str, all_scores: bool = False, per_label: bool = False,
                              mistakes: bool = False, reliability: bool = False) -> None:
    """Refuse what only a classification model has (a regression model has no labels): every label's score,
    a per-label report, a list of mistakes; one OztuneError, in one wording, before the model runs."""
    if problem_type != "regression":
        return
    for asked, what in ((all_scores, "every label's score (--all-scores)"),
                        (per_label, "a per-label report (--per-label)"), (mistakes, "listing mistakes (--mistakes)"),
                        (reliability, "a reliability diagram (--reliability)")):
        if asked:
            raise OztuneError(f"{what} is for classification models; this one is a regression model")


def _as_lists(texts, text_pairs) -> tuple[list[str], list[str] | None]:
    """The texts (and pairs) as lists: one string is one text, not its characters; one second text per text.
    Bytes, a mapping or a non-iterable are a TypeError naming what was given; so is an element that is not a
    string (a tuple is not a text pair: second texts are ``text_pairs``). An empty text is a ValueError, by the
    rule of files, the command line and the server (:func:`oztune.data.readers.is_blank`): its score would mean
    nothing. One pass over the texts."""
    texts = _as_list(texts, "texts", "text")
    if text_pairs is not None:
        text_pairs = _as_list(text_pairs, "text_pairs", "text pair")
        if len(text_pairs) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(text_pairs)} text_pairs: give one second text per text")
    return texts, text_pairs


def _as_list(texts, name: str, item: str) -> list[str]:
    """``texts`` (the argument ``name``, each element an ``item``) as a list of non-empty strings: one string is
    one text; see :func:`_as_lists`."""
    if isinstance(texts, str):
        texts = [texts]
    elif isinstance(texts, (bytes, bytearray, dict)) or not hasattr(texts, "__iter__"):
        # (bytes iterate as ints, a dict as its keys: never what was meant)
        raise TypeError(f"{name}: expected a string or a list of strings, got {type(texts).__name__}")
    else:
        texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise _not_a_string(item, i, t)
        if is_blank(t):
            raise ValueError(f"{item} {i} is empty ({t!r}): a text needs more than whitespace to be scored")
    return texts


def _not_a_string(item: str, i: int, value) -> TypeError:
    """The TypeError for element ``i`` of the texts (``item``: "text" or "text pair") that is not a string. A tuple
    or list would reach the tokenizer as a text pair, past the checks of pairs: say how pairs are given."""
    kind = type(value).__name__
    if isinstance(value, (tuple, list)):
        return TypeError(f"{item} {i} is a {kind}, expected a string: to score text pairs, give the first texts and "
                         "the second texts as two lists, predict(texts, text_pairs)")
    return TypeError(f"{item} {i} is {value!r} ({kind}): expected a string")


class Predictor:
    """What every loaded classifier does, whatever runs it (:class:`Classifier`: PyTorch; an ONNX export:
    :class:`oztune.serve.backends.OnnxClassifier`): ``logits``, ``predict`` and ``evaluate``.

    A subclass sets ``encoder``, ``id2label``, ``problem_type``, ``batch_size`` and ``text_pairs`` (whether the
    model was fine-tuned on text pairs: texts of the other kind are then refused, see
    :func:`oztune.errors.check_text_pairs`; None, not recorded: both kinds are scored) and implements
    :meth:`encoded_logits`.
    """

    encoder: TextEncoder
    id2label: dict[int, str]
    problem_type: str
    batch_size: int
    text_pairs: bool | None = None

    def encoded_logits(self, data: EncodedData) -> np.ndarray:
        """Raw outputs (N, num_labels) of tokenized examples, in their order."""
        raise NotImplementedError

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Softmax (single-label) or sigmoid (multi-label) probabilities; regression values as they are."""
        return scores(torch.from_numpy(logits), self.problem_type).numpy()

    def logits(self, texts: str | Iterable[str], text_pairs: str | Iterable[str] | None = None) -> np.ndarray:
        """Raw outputs (N, num_labels), in input order (one string: one text, N = 1)."""
        return self._logits(*self._checked(texts, text_pairs))

    def _checked(self, texts, text_pairs) -> tuple[list[str], list[str] | None]:
        """The texts and pairs as lists of non-empty strings (:func:`_as_lists`), of the kind the model takes."""
        texts, text_pairs = _as_lists(texts, text_pairs)
        check_text_pairs(self.text_pairs, text_pairs is not None, "texts", "call")  # (no texts too)
        return texts, text_pairs

    def _logits(self, texts: list[str], text_pairs: list[str] | None) -> np.ndarray:
        """:meth:`logits` of texts already checked (:meth:`_checked`)."""
        if not texts:
            return np.zeros((0, len(self.id2label) or 1), dtype=np.float32)
        return self.encoded_logits(EncodedData(self.encoder.encode(texts, text_pairs), None, self.encoder.pad_id))

    def predict(self, texts: str | Iterable[str], text_pairs: str | Iterable[str] | None = None,
                all_scores: bool = False) -> list[dict]:
        """One dict per text: ``label`` and ``score`` (and ``scores`` for every label with ``all_scores``).

        Single-label: the most likely label and its probability. Multi-label: the list of labels with a logit
        above 0 (probability above 0.5: the rule of the metrics and ``evaluate --mistakes``) and the list of their
        probabilities. Regression: label None, score the value. ``texts`` (and ``text_pairs``): one string (one
        text) or any iterable of strings, as for :meth:`logits`.
        """
        texts, text_pairs = self._checked(texts, text_pairs)
        check_classification_only(self.problem_type, all_scores=all_scores)
        if not texts:
            return []
        logits = self._logits(texts, text_pairs)
        return format_predictions(logits, self.problem_type, self.id2label, all_scores)

    def evaluate(self, path: str, columns: Columns | None = None, per_label: bool = False,
                 mistakes: bool = False, reliability: bool = False) -> dict:
        """Metrics on a labelled file (a label the model does not know is a DataError, and so is a file of the
        other kind, text pairs or single texts, than the model was fine-tuned on): those of the problem type,
        for a classifier also ``log_loss`` and ``ece`` (:func:`~oztune.train.metrics.evaluation_metrics`), and
        ``examples``.

        Args:
            path: labelled file (.csv, .tsv or .jsonl).
            columns: the columns holding text, second text and label (default: found by name).
            per_label: also each label's precision, recall, F1 and support (``per_label``) and, for
                single-label, the confusion matrix (``confusion_matrix``: rows gold, columns predicted).
            mistakes: also the examples the model gets wrong (``mistakes``, classification only): file
                line, text, gold ``label``, ``predicted`` and its ``score``; single-label ones most
                confident first (where label noise and systematic errors show).
            reliability: also the reliability diagram's data (``reliability``, classification only): per
                confidence bin, how many decisions, their mean confidence and the share right
                (:func:`~oztune.train.metrics.reliability`).
        """
        check_classification_only(self.problem_type, per_label=per_label, mistakes=mistakes, reliability=reliability)
        examples = read_labelled(path, columns or Columns(), problem_type=self.problem_type, text_pairs=self.text_pairs)
        label2id = None if self.problem_type == "regression" else self.gold_label_ids([e.label for e in examples])
        data = encode_examples(examples, self.encoder, label2id, self.problem_type, path)
        logits = self.encoded_logits(data)
        bad = np.flatnonzero(~np.isfinite(logits).all(-1))
        if len(bad):  # metrics of nan would be nan (not JSON) or an argmax that means nothing
            raise OztuneError(f"{path}: line {examples[bad[0]].line}: the model's output is not a finite number "
                              f"({logits[bad[0]].tolist()}; {len(bad)} of {len(examples)} examples): no metric means "
                              "anything (weights gone to nan in training?)")
        gold = data.labels.numpy()
        out = {**evaluation_metrics(self.problem_type, logits, gold), "examples": len(examples)}
        if per_label:
            out.update(label_report(self.problem_type, logits, gold, self.id2label))
        if mistakes:
            out["mistakes"] = self._mistakes(examples, logits, gold)
        if reliability:
            out["reliability"] = reliability_bins(logits, gold, self.problem_type)
        return out

    def _mistakes(self, examples: list, logits: np.ndarray, gold: np.ndarray) -> list[dict]:
        """The wrongly predicted examples (see :meth:`evaluate`)."""
        probs = self.probabilities(logits)
        name = lambda i: self.id2label.get(int(i), str(int(i)))  # noqa: E731
        out = []
        if self.problem_type == "single_label":
            pred = logits.argmax(-1)  # (as the metrics and predict: a near tie of equal probabilities is one label)
            for i in np.flatnonzero(pred != gold):
                out.append({"line": examples[i].line, "text": examples[i].text, "text_pair": examples[i].text_pair,
                            "label": name(gold[i]), "predicted": name(pred[i]), "score": float(probs[i, pred[i]])})
            out.sort(key=lambda r: -r["score"])
        else:
            on, g = labels_on(logits), gold > 0.5  # (as the metrics and predict)
            for i in np.flatnonzero((on != g).any(-1)):
                out.append({"line": examples[i].line, "text": examples[i].text, "text_pair": examples[i].text_pair,
                            "label": [name(j) for j in np.flatnonzero(g[i])],
                            "predicted": [name(j) for j in np.flatnonzero(on[i])],
                            "score": [float(probs[i, j]) for j in np.flatnonzero(on[i])]})
        for r in out:
            if r["text_pair"] is None:
                del r["text_pair"]
        return out

    def gold_label_ids(self, gold: list) -> dict[str, int]:
        """label2id for reading gold labels (:func:`oztune.data.labels.gold_label2id`)."""
        return gold_label2id(self.id2label, gold)


class Classifier(Predictor):
    """A fine-tuned (possibly compressed) text classifier with its tokenizer and label names.

    The model's weights are taken as final: its fp32 Linear layers run at inference on packed copies of their
    weights (:func:`oztune.models.kernels.freeze_`); ``model.train()`` undoes that, before any further training.

    Args:
        model: the network.
        encoder: its tokenizer.
        id2label: label name of each output, keyed 0 to num_labels - 1 (regression: ``{0: "value"}``); else
            ValueError.
        batch_size: examples per forward pass in :meth:`predict`.
        text_pairs: whether the model was fine-tuned on text pairs (None: unknown, both kinds are scored).
    """

    def __init__(self, model: SequenceClassifier, encoder: TextEncoder, id2label: dict[int, str], batch_size: int = 64,
                 text_pairs: bool | None = None):
        check_id2label(id2label, model.head_cfg.num_labels)
        self.model, self.encoder, self.batch_size = freeze_(model.eval()), encoder, check_count("batch_size", batch_size)
        self.id2label, self.text_pairs = id2label, text_pairs
        self.label2id = {v: k for k, v in id2label.items()}
        self.problem_type = model.head_cfg.problem_type

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, batch_size: int = 64, max_length: int | None = None,
                        compile: bool = False, aot: bool = True) -> "Classifier":
        """Load a directory written by ``oztune finetune`` (or any HF-format sequence classifier).

        With ``compile``, the model runs under ``torch.compile`` at inference (:mod:`oztune.models.compiled`);
        the first calls compile it (20-65 s on 2 cores). A directory from ``oztune export --format aoti``
        runs compiled from the start (:mod:`oztune.models.aot`), unless ``aot`` is False.
        """
        model, enc, meta = load_classifier(path, max_length=max_length)
        require_trained(meta, path)
        if compile:
            from oztune.models.compiled import compile_for_inference

            model = compile_for_inference(model)
        elif aot and os.path.isdir(path):
            from oztune.models import aot as ahead

            model = ahead.load(model, path) or model
        return cls(model, enc, meta["id2label"], batch_size, meta["text_pairs"])

    def encoded_logits(self, data: EncodedData) -> np.ndarray:
        return predict_logits(self.model, data, self.batch_size)
