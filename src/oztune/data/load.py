"""From a labelled file to model-ready tensors: read, map labels, tokenize."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from oztune.data.dataset import EncodedData, encode_data
from oztune.data.labels import build_label_map, encode_labels, infer_problem_type, parse_multi_label
from oztune.data.readers import Example, read_examples
from oztune.data.tokenize import TextEncoder
from oztune.errors import DataError, check_text_pairs


@dataclass
class Columns:
    """Which columns hold the text, the optional second text, and the label (None: guess by name)."""

    text: str | None = None
    text_pair: str | None = None
    label: str | None = None


def read_labelled(path: str, columns: Columns, require_label: bool = True,
                  max_examples: int | None = None, problem_type: str | None = None,
                  text_pairs: bool | None = None) -> list[Example]:
    """Read examples, keeping the first ``max_examples`` (None: all); with ``problem_type`` multi_label a
    blank label cell is an example with no labels (None: the file's other labels tell). With ``text_pairs``
    (whether the model they are for was fine-tuned on text pairs), a file of the other kind is a DataError
    (:func:`~oztune.errors.check_text_pairs`)."""
    examples = read_examples(path, text_column=columns.text, text_pair_column=columns.text_pair,
                             label_column=columns.label, require_label=require_label,
                             multi_label=None if problem_type is None else problem_type == "multi_label")
    check_text_pairs(text_pairs, holds_pairs(examples), path)
    return examples[:max_examples] if max_examples else examples


def holds_pairs(examples: list[Example]) -> bool:
    """Whether the examples are text pairs (their file's column of second texts was read)."""
    return any(e.text_pair is not None for e in examples)


def label_setup(examples: list[Example], problem_type: str | None,
                path: str | None = None) -> tuple[str, dict[str, int] | None]:
    """Problem type (inferred unless given) and label2id for training examples (read from ``path``: named
    in error messages)."""
    raw = [e.label for e in examples]
    problem_type = problem_type or infer_problem_type(raw)
    where = [f"{path}: line {e.line}" if path else f"line {e.line}" for e in examples]
    if problem_type == "multi_label":
        raw = [parse_multi_label(r, where=w) for r, w in zip(raw, where)]
    elif problem_type == "single_label":  # (build_label_map would not know the file or the line)
        for r, w in zip(raw, where):
            if isinstance(r, (list, dict)):
                raise DataError(f"{w}: label {r!r} is a list, but the problem type is single_label")
    return problem_type, build_label_map(raw, problem_type)


def hold_out(examples: list[Example], fraction: float, seed: int,
             stratify: bool = True) -> tuple[list[Example], list[Example]]:
    """Split training examples into (train, held out) for evaluation, seeded; both keep the file's order.

    With ``stratify`` (single-label) each label gives up ``round(fraction x its count)`` examples, so the
    held-out part has the labels in the same proportions, and every label keeps at least one training
    example; otherwise a random ``round(fraction x N)``.
    """
    rng = np.random.default_rng(seed)
    groups: dict = {}
    for i, e in enumerate(examples):
        groups.setdefault(str(e.label) if stratify else "", []).append(i)
    held = []
    for key in sorted(groups):  # sorted: the same split whatever order the labels first appear in
        idx = groups[key]
        k = min(round(fraction * len(idx)), len(idx) - 1)
        held.extend(rng.permutation(idx)[:k].tolist())
    keep = set(held)
    return [e for i, e in enumerate(examples) if i not in keep], [examples[i] for i in sorted(held)]


def encode_examples(examples: list[Example], encoder: TextEncoder, label2id: dict[str, int] | None,
                    problem_type: str, path: str, with_labels: bool = True) -> EncodedData:
    """Tokenize examples and encode their labels (a label the model does not know is a DataError)."""
    texts = [e.text for e in examples]
    pairs = [e.text_pair or "" for e in examples] if holds_pairs(examples) else None
    labels = None
    if with_labels:
        labels = encode_labels([e.label for e in examples], label2id, problem_type, path=path,
                               lines=[e.line for e in examples])
    return encode_data(encoder, texts, pairs, labels, problem_type)
