"""Turn raw labels (as read by :mod:`oztune.data.readers`) into model targets.

Label *names* are always strings (a Hugging Face ``id2label`` maps int -> str). Integer labels are
named by their decimal form, so ``1``, ``"1"`` and ``"1.0"`` are all the label ``"1"``.

Multi-label values may be JSON lists (``["a", "b"]``), strings holding a JSON list
(``'["a", "b"]'``) or a Python one as pandas writes list columns (``"['a', 'b']"``), or strings with ``|``
between names (``"a|b"``).
"""

from __future__ import annotations

import ast
import json
import math
import re

from oztune.config import PROBLEM_TYPES
from oztune.errors import DataError


_MAX_LISTED = 20  # how many known labels an error message lists


# A number as people write one in a data file: Python's int()/float() also take "1_000" and other scripts'
# digits, which would rename a label such as "1_1" to "11".
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", re.ASCII)


FLOAT32_MAX = 3.4028234663852886e38  # the largest finite float32 (regression labels are stored so)


def _as_number(raw: object, plain: bool = False) -> int | float | None:
    """``raw`` as a finite number if it is one (or a string spelling one), else None. Booleans are not numbers.

    With ``plain``, only ASCII decimal spellings count (label names: ``"1_1"`` stays a name); otherwise
    whatever Python reads as a number (regression targets: ``"1_000"``, other scripts' digits).
    """
    if isinstance(raw, bool):
        return None
    if isinstance(raw, str):
        if plain and not _NUMBER.fullmatch(raw.strip()):
            return None
        try:
            raw = int(raw)
        except ValueError:
            try:
                raw = float(raw)
            except ValueError:
                return None
    if isinstance(raw, int):
        return raw
    if isinstance(raw, float) and math.isfinite(raw):
        return raw
    return None


def _is_float_text(raw: object) -> bool:
    """A float Python can read, finite or not ('nan', 'inf')."""
    try:
        float(raw)
        return not isinstance(raw, bool)
    except (TypeError, ValueError):
        return False


def _is_integer(number: int | float | None) -> bool:
    return number is not None and (isinstance(number, int) or number.is_integer())


def _label_name(raw: object) -> str:
    """The string name of one single label: integers (``1``, ``"1"``, ``1.0``) become ``"1"``."""
    number = _as_number(raw, plain=True)
    if _is_integer(number):
        return str(int(number))
    return raw.strip() if isinstance(raw, str) else str(raw)


def looks_multi_label(raw: object) -> bool:
    """True for a list, a string holding a JSON list, or a string with ``|`` separators."""
    if isinstance(raw, list):
        return True
    if not isinstance(raw, str):
        return False
    if "|" in raw:
        return True
    return _list_from_text(raw) is not None


def _list_from_text(raw: str) -> list | None:
    """The list a label string spells: JSON (``["a", "b"]``) or Python's repr, as pandas writes a list column
    to CSV (``['a', 'b']``); None for anything else (``[positive]`` is a name)."""
    text = raw.strip()
    if not (text.startswith("[") and text.endswith("]")) or len(text) > 100_000:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            return None
    return value if isinstance(value, list) else None


def infer_problem_type(raw_labels: list) -> str:
    """Guess the problem type from the raw labels of a data set.

    Args:
        raw_labels: One raw label per example; None values are ignored.

    Returns:
        ``"multi_label"`` if any label is a list (or a string holding a JSON list or ``|``),
        ``"regression"`` if all labels are numbers and at least one is not an integer,
        else ``"single_label"``.
    """
    labels = [lab for lab in raw_labels if lab is not None]
    if any(looks_multi_label(lab) for lab in labels):
        return "multi_label"
    numbers = [_as_number(lab) for lab in labels]
    # 'nan' or 'inf' among decimals is a bad regression label (encode_labels names its line), not a class
    numeric = all(n is not None or _is_float_text(lab) for n, lab in zip(numbers, labels))
    if numbers and numeric and not all(_is_integer(n) for n in numbers if n is not None):
        return "regression"
    return "single_label"


def parse_multi_label(raw: object, *, where: str) -> list[str]:
    """Split one multi-label value into its label names.

    Args:
        raw: A list, a JSON-list string (``'["a","b"]'``), a ``|``-separated string (``"a|b"``),
            a single name (``"a"`` or ``3``), or an empty string / None (no labels).
        where: Prefix for error messages, e.g. ``"train.csv: line 4"``.

    Returns:
        The label names, duplicates removed, in order of appearance.

    Raises:
        DataError: ``raw`` is a malformed JSON list or holds nested lists/objects.
    """
    if raw is None:
        return []
    if isinstance(raw, str) and raw.strip().startswith("["):
        value = _list_from_text(raw)
        if value is None:
            raise DataError(f"{where}: label {raw!r} looks like a list but is not one (write it as "
                            '["a", "b"], or as a|b)')
        raw = value
    if isinstance(raw, str):
        raw = raw.split("|")
    if not isinstance(raw, list):
        raw = [raw]
    names = []
    for item in raw:
        if isinstance(item, (list, dict)) or item is None or isinstance(item, bool):
            raise DataError(f"{where}: a multi-label value must list label names, found {json.dumps(item)}")
        name = _label_name(item)
        if name:
            names.append(name)
    return list(dict.fromkeys(names))


def build_label_map(raw_labels: list, problem_type: str) -> dict[str, int] | None:
    """Build ``label2id`` from the raw labels of the training set.

    Args:
        raw_labels: One raw label per example; None values are ignored.
        problem_type: One of :data:`PROBLEM_TYPES`.

    Returns:
        ``{name: id}`` with ids 0..n-1: integer names sorted numerically, other names
        alphabetically (for multi-label, the union of all names). None for regression.

    Raises:
        DataError: Unknown ``problem_type``, a list label for a single-label task, or a
            malformed multi-label value.
    """
    _check_problem_type(problem_type)
    if problem_type == "regression":
        return None
    labels = [lab for lab in raw_labels if lab is not None and lab != ""]
    if problem_type == "multi_label":
        names = {n for i, lab in enumerate(labels) for n in parse_multi_label(lab, where=f"label {i + 1}")}
    else:
        for lab in labels:
            if isinstance(lab, (list, dict)):
                raise DataError(f"label {lab!r} is a list, but the problem type is single_label")
        names = {_label_name(lab) for lab in labels}
    if names and all(_is_integer(_as_number(n)) for n in names):
        ordered = sorted(names, key=lambda n: (int(n), n))  # ("1" and "١", "10" and "1_0": one int, then by name)
    else:
        ordered = sorted(names)
    return {name: i for i, name in enumerate(ordered)}


def encode_labels(examples_labels: list, label2id: dict | None, problem_type: str, *,
                  path: str, lines: list[int]) -> list:
    """Encode raw labels as training targets.

    Args:
        examples_labels: One raw label per example.
        label2id: The map from :func:`build_label_map` (None for regression).
        problem_type: One of :data:`PROBLEM_TYPES`.
        path: The data file, for error messages.
        lines: The line of each example in ``path``, for error messages.

    Returns:
        single_label: ``list[int]`` ids; multi_label: ``list[list[float]]`` multi-hot vectors of
        length ``len(label2id)``; regression: ``list[float]``.

    Raises:
        DataError: A label the map does not know, a missing label, or a regression label that is
            not a number.
    """
    _check_problem_type(problem_type)
    if len(examples_labels) != len(lines):
        raise ValueError(f"got {len(examples_labels)} labels but {len(lines)} line numbers")
    encoded = []
    for raw, line in zip(examples_labels, lines):
        where = f"{path}: line {line}"
        if problem_type == "regression":
            number = _as_number(raw)
            if number is None:
                raise DataError(f"{where}: label {raw!r} is not a number (regression needs numeric labels)")
            if not abs(number) <= FLOAT32_MAX:  # (float32 labels: it would be inf, and the loss and metrics with it)
                raise DataError(f"{where}: label {raw!r} is beyond the range of float32 (±{FLOAT32_MAX:.3g}), in "
                                "which the model and its loss compute")
            encoded.append(float(number))
        elif problem_type == "multi_label":
            vector = [0.0] * len(label2id)
            for name in parse_multi_label(raw, where=where):
                vector[_label_id(name, label2id, where)] = 1.0
            encoded.append(vector)
        else:
            if raw is None or raw == "":
                raise DataError(f"{where}: missing label")
            if isinstance(raw, (list, dict)):
                raise DataError(f"{where}: label {raw!r} is a list, but the problem type is single_label")
            encoded.append(_label_id(_label_name(raw), label2id, where))
    return encoded


def are_class_ids(names) -> bool:
    """True if every label name is an integer written out ("0", "1", "-1"): class ids rather than names."""
    return all(str(n).lstrip("-").isdigit() for n in names)


def named_class_ids(names: list[str], raw_labels: list, problem_type: str, *, path: str,
                    lines: list[int]) -> dict[str, int]:
    """``label2id`` for a training file whose integer labels are the class ids ``--label-names`` names: label
    ``k`` is class ``k`` for 0 <= k < len(names), whichever of them the file holds (a sample may miss one), so
    the model's outputs are the ids every command then reads such files as (:func:`gold_label2id`).

    Raises:
        DataError: a label that is not one of those class ids, naming its line.
    """
    n = len(names)
    for raw, line in zip(raw_labels, lines):
        if problem_type == "multi_label":
            got = parse_multi_label(raw, where=f"{path}: line {line}")
        else:
            got = [] if raw is None or raw == "" else [_label_name(raw)]
        for name in got:
            if not (are_class_ids([name]) and 0 <= int(name) < n):
                raise DataError(f"--label-names names the class ids 0..{n - 1}; {path} holds the label {name} "
                                f"(line {line}): number the labels from 0, or write the names in the file")
    return {str(k): k for k in range(n)}


def gold_label2id(id2label: dict[int, str], gold: list) -> dict[str, int]:
    """``label2id`` for reading a file's gold labels against a trained model's labels.

    By name; or by class id where the model's labels are names that are not integers (given with
    ``--label-names negative,positive`` to SST-2's 0 and 1, or a Hugging Face model's ``id2label``) and
    every gold label is an integer that is not one of the names: those are class ids, as in Hugging Face
    datasets.

    Args:
        id2label: the model's label name of each output.
        gold: the file's raw labels (multi-label: lists of them).
    """
    label2id = {str(v): k for k, v in id2label.items()}
    flat = [n for x in gold if x is not None and x != "" for n in _gold_names(x)]  # as encode_labels reads them
    if (not are_class_ids(id2label.values()) and flat and are_class_ids(flat)
            and not any(n in label2id for n in flat)):  # a gold label that is a name is that name
        return {str(k): k for k in id2label}
    return label2id


def _gold_names(raw: object) -> list[str]:
    """The label names of one raw gold label (several for a multi-label value), named as encode_labels names
    them (``1.0`` is ``"1"``); a malformed list is left for encode_labels to report with its line."""
    if isinstance(raw, list) or (isinstance(raw, str) and looks_multi_label(raw)):
        try:
            return parse_multi_label(raw, where="")
        except DataError:
            return [str(raw)]
    return [_label_name(raw)]


def _label_id(name: str, label2id: dict, where: str) -> int:
    """``label2id[name]``, or a DataError listing the labels the model knows."""
    if name not in label2id:
        known = sorted(label2id, key=label2id.get)
        listed = ", ".join(known[:_MAX_LISTED])
        if len(known) > _MAX_LISTED:
            listed += f", ... ({len(known)} in all)"
        raise DataError(f"{where}: label '{name}' is not one the model knows ({listed})")
    return label2id[name]


def _check_problem_type(problem_type: str) -> None:
    if problem_type not in PROBLEM_TYPES:
        raise DataError(f"unknown problem type '{problem_type}'; expected one of {', '.join(PROBLEM_TYPES)}")
