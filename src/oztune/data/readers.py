"""Read training and evaluation examples from CSV, TSV and JSON Lines files.

:func:`read_examples` turns a data file into a list of :class:`Example` records. It never drops
a row silently: every problem (bad encoding, ragged row, broken or ambiguous quoting, malformed
JSON, unknown or empty column) raises :class:`~oztune.errors.DataError` naming the file and the line.

Labels are returned raw (strings for CSV/TSV, JSON values for JSON Lines); converting them to
ids is the job of :mod:`oztune.data.labels`.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
import re
from dataclasses import dataclass

from oztune.data.labels import looks_multi_label
from oztune.errors import DataError

SUPPORTED_EXTENSIONS = (".csv", ".tsv", ".tab", ".jsonl", ".json")
TEXT_COLUMNS = ("text", "sentence", "sentence1", "question", "premise", "content", "review")
PAIR_COLUMNS = (
    ("sentence1", "sentence2"),
    ("premise", "hypothesis"),
    ("question", "sentence"),
    ("question1", "question2"),
    ("text", "text_pair"),  # the names of Hugging Face tokenizers' arguments, which some data sets use
)
LABEL_COLUMNS = ("label", "labels", "target", "score", "y")

_JSON_SPACE = re.compile(r"[ \t\n\r]*")
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


@dataclass
class Example:
    """One example read from a data file.

    Attributes:
        text: The input text, stripped of surrounding whitespace.
        text_pair: The second text of a sentence-pair task, or None.
        label: The raw label as read: str, int, float, list (multi-label) or None.
        line: 1-based line in the file where the record starts (the CSV/TSV header is line 1).
    """

    text: str
    text_pair: str | None = None
    label: object = None
    line: int = 0


def read_examples(
    path: str | os.PathLike,
    *,
    text_column: str | None = None,
    text_pair_column: str | None = None,
    label_column: str | None = None,
    require_label: bool = True,
    multi_label: bool | None = None,
) -> list[Example]:
    """Read every example of a ``.csv``, ``.tsv``/``.tab`` or ``.jsonl``/``.json`` file.

    Args:
        path: The data file. Its extension picks the format.
        text_column: Column holding the text; by default the first of :data:`TEXT_COLUMNS` present
            (or a known pair such as ``sentence1``/``sentence2``, see :data:`PAIR_COLUMNS`).
        text_pair_column: Column holding the second text of a pair task; by default none, unless
            a known pair was found.
        label_column: Column holding the label; by default the first of :data:`LABEL_COLUMNS`.
        require_label: If True, a missing label column or an empty label is an error; if False,
            such examples get ``label=None``.
        multi_label: Whether the labels are multi-label ones, where a blank cell is an example with no
            labels (``[]``); None: so when another cell of the column looks like a list of labels.

    Returns:
        The examples, in file order.

    Raises:
        DataError: The file is missing, not UTF-8, malformed, empty, lacks a column, or has an
            empty text or label.
    """
    name = os.fspath(path)
    ext = os.path.splitext(name)[1].lower()
    if ext not in SUPPORTED_EXTENSIONS:
        raise DataError(f"{name}: unsupported file type {ext or '(no extension)'}; "
                        f"supported: {', '.join(SUPPORTED_EXTENSIONS)}")
    text = _read_text(name)
    if ext == ".json" and text.lstrip().startswith("["):
        columns, records = _json_array_records(text, name)
    elif ext == ".json" or ext == ".jsonl":
        columns, records = _json_lines_records(text, name)
    else:
        if ext == ".csv":
            columns, records = _csv_records(text, name, ",")
        else:
            columns, records = _tsv_records(text, name)

    text_col, pair_col, label_col = _choose_columns(
        name, columns, text_column, text_pair_column, label_column, require_label)
    examples = []
    for line, record in records:
        where = f"{name}: line {line}"
        text_value = _get_text(record, text_col, where)
        pair_value = _get_text(record, pair_col, where) if pair_col else None
        label = _get_label(record, label_col, where) if label_col else None
        examples.append(Example(text_value, pair_value, label, line))
    blank = [e for e in examples if e.label is None] if label_col and require_label else []
    if blank:
        if multi_label or (multi_label is None and any(looks_multi_label(e.label) for e in examples)):
            # a multi-label column: a blank cell has no labels
            for e in blank:
                e.label = []
        else:
            raise DataError(f"{name}: line {blank[0].line}: missing label in column '{label_col}'")
    return examples


def read_lines(path: str | os.PathLike) -> list[str]:
    """The lines of a UTF-8 text file of one text per line (``oztune predict --input FILE.txt``): a leading BOM
    dropped, CRLF, CR or LF ends a line, and the last line's newline ends it (no empty line after it). Errors
    (missing, a directory, not UTF-8: naming the line) as :func:`read_examples`'."""
    return split_lines(_read_text(os.fspath(path)))


def split_lines(text: str) -> list[str]:
    """``text``'s lines: CRLF, CR or LF ends a line (as in Python's text mode); a newline at the very end ends
    the last line."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return lines[:-1] if lines and not lines[-1] else lines


def _read_text(name: str) -> str:
    """Return the file's contents decoded as UTF-8 (a leading BOM is dropped)."""
    if os.path.isdir(name):
        raise DataError(f"{name}: is a directory, not a data file")
    try:
        with open(name, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise DataError(f"{name}: file not found") from None
    except OSError as e:
        raise DataError(f"{name}: cannot read the file ({e.strerror})") from None
    return decode_utf8(data, name)


def decode_utf8(data: bytes, name: str, fix: str = "save the file as UTF-8") -> str:
    """``data`` decoded as UTF-8, a leading BOM dropped; bytes that are not UTF-8 are a DataError naming ``name``,
    the line and the position in it, and saying how to ``fix`` it."""
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(f"{name}: line {line}: not valid UTF-8 (byte 0x{data[e.start]:02x} at "
                        f"position {column}); {fix}") from None


def _csv_records(text: str, name: str, delimiter: str,
                 quoting: int = csv.QUOTE_MINIMAL) -> tuple[list[str], list[tuple[int, dict]]]:
    """Split CSV/TSV text into its header and (start line, {column: cell}) records."""
    csv.field_size_limit(max(csv.field_size_limit(), len(text)))  # long documents are valid fields (default: 128 KiB)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True, quoting=quoting)
    header: list[str] | None = None
    records = []
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader, None)
        except csv.Error as e:
            if "unexpected end of data" in str(e):
                raise DataError(f"{name}: line {start}: a quoted field starting here is never "
                                f"closed (missing '\"')") from None
            raise DataError(f"{name}: line {reader.line_num}: bad quoting ({e}); a field that "
                            f"starts with '\"' must end with '\"' and double any '\"' inside it") from None
        if row is None:
            break
        if not row:  # an entirely empty line
            continue
        if header is None:
            header = [cell.strip() for cell in row]
            duplicates = sorted({c for c in header if header.count(c) > 1})
            if duplicates:
                raise DataError(f"{name}: line {start}: duplicate column names in the header: "
                                f"{', '.join(duplicates)}")
        elif len(row) != len(header):
            raise DataError(f"{name}: line {start}: expected {len(header)} fields "
                            f"({', '.join(header)}) but found {len(row)}")
        else:
            records.append((start, dict(zip(header, row))))
    if header is None:
        raise DataError(f"{name}: no examples (the file is empty)")
    if not records:
        raise DataError(f"{name}: no examples (the file has a header but no rows)")
    return header, records


def _tsv_records(text: str, name: str) -> tuple[list[str], list[tuple[int, dict]]]:
    r"""Split TSV text as :func:`_csv_records` does: with quoting, or without it for a GLUE-style file.

    GLUE's TSVs quote nothing: a '"' is text ('"great" acting'). That mostly breaks the quoted reading,
    and then the file is read without quoting. But where a field opens with '"' and a field on a later
    line closes with '"', the quoted reading silently makes the lines between one field. The rule: when
    the quoted reading has a field spanning lines and the unquoted reading is as regular (the same
    header, every line a row of its width), the file means either and is refused, never guessed, unless
    it shows it uses quoting: a quoted header (csv.QUOTE_ALL), or a quoted field holding a line break
    other than the one the file's lines end with (a '\n' in a cell, '\r\n' after rows: csv.writer's
    default). A cell holding tabs and the file's own line break is byte for byte a GLUE table.
    """
    try:
        columns, records = _csv_records(text, name, "\t")
    except DataError as e:
        if "quot" not in str(e):
            raise
        return _csv_records(text, name, "\t", csv.QUOTE_NONE)
    first = next(((line, value) for line, record in records for value in record.values()
                  if "\n" in value or "\r" in value), None)
    if first is None:
        return columns, records
    try:
        plain_columns, plain_records = _csv_records(text, name, "\t", csv.QUOTE_NONE)
    except DataError:
        return columns, records
    breaks = {b for _, record in records for value in record.values() for b in _LINE_BREAK.findall(value)}
    if plain_columns != columns or breaks - {_LINE_BREAK.search(text).group()}:
        return columns, records
    start, value = first
    end = start + len(_LINE_BREAK.findall(value))
    rows = sum(start <= line <= end for line, _ in plain_records)
    raise DataError(f"{name}: line {start}: ambiguous quoting: the '\"' here closes on line {end}; read with quoting, "
                    f"lines {start}-{end} are one row, read without (GLUE-style, '\"' as text) {rows} rows; save the "
                    f"file as CSV or JSON Lines, or as TSV with every field in quotes (csv.QUOTE_ALL)")


class _RepeatedKey(ValueError):
    pass


def _object_without_repeats(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object as a dict; a key given twice is an error (plain json keeps the last one silently)."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _RepeatedKey(next(k for i, (k, _) in enumerate(pairs) if k in dict(pairs[:i])))
    return obj


def _json_lines_records(text: str, name: str) -> tuple[list[str], list[tuple[int, dict]]]:
    """Parse JSON Lines text: one JSON object per non-blank line."""
    records = []
    for line, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw, object_pairs_hook=_object_without_repeats)
        except _RepeatedKey as e:
            raise DataError(f"{name}: line {line}: the key {e.args[0]!r} appears twice in one object") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{name}: line {line}: not a JSON object ({e.msg} at column {e.colno})") from None
        except (ValueError, RecursionError) as e:
            raise DataError(f"{name}: line {line}: not a JSON object ({e})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{name}: line {line}: not a JSON object (found {_json_type(obj)})")
        records.append((line, obj))
    if not records:
        raise DataError(f"{name}: no examples (the file is empty)")
    return _union_of_keys(records), records


def _json_array_records(text: str, name: str) -> tuple[list[str], list[tuple[int, dict]]]:
    """Parse a ``.json`` file holding one JSON array of objects, keeping each object's line."""
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{name}: line {e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    except (ValueError, RecursionError) as e:
        raise DataError(f"{name}: not valid JSON ({e})") from None
    # The text is valid JSON, so walking it element by element cannot fail.
    decoder, pos, line, counted = json.JSONDecoder(), text.index("[") + 1, 1, 0
    records = []
    for item in items:
        pos = _JSON_SPACE.match(text, pos).end()
        line, counted = line + text.count("\n", counted, pos), pos
        if not isinstance(item, dict):
            raise DataError(f"{name}: line {line}: not a JSON object (found {_json_type(item)})")
        records.append((line, item))
        pos = _JSON_SPACE.match(text, decoder.raw_decode(text, pos)[1]).end() + 1  # past the ','
    if not records:
        raise DataError(f"{name}: no examples (the JSON array is empty)")
    return _union_of_keys(records), records


def _union_of_keys(records: list[tuple[int, dict]]) -> list[str]:
    """All keys used by the records, in order of first appearance."""
    return list(dict.fromkeys(key for _, record in records for key in record))


def _json_type(value: object) -> str:
    """Name a JSON value's type the way a user thinks of it."""
    if isinstance(value, dict):
        return "an object"
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


def _choose_columns(name, columns, text_col, pair_col, label_col, require_label):
    """Check the columns asked for exist and fill in the defaults for those not given."""
    listed = ", ".join(columns)
    for col in (text_col, pair_col, label_col):
        if col is not None and col not in columns:
            raise DataError(f"{name}: no column '{col}'; columns are: {listed}")
    if label_col is None:
        label_col = next((c for c in LABEL_COLUMNS if c in columns), None)
        if label_col is None and require_label:
            raise DataError(f"{name}: no label column (looked for {', '.join(LABEL_COLUMNS)}); "
                            f"columns are: {listed}; say which column holds the labels")
    if text_col is None:
        pair = next(((a, b) for a, b in PAIR_COLUMNS if a in columns and b in columns), None)
        if pair and pair_col is None:
            text_col, pair_col = pair
        else:
            others = [c for c in columns if c not in (label_col, pair_col)]
            text_col = next((c for c in TEXT_COLUMNS if c in others), None)
            if text_col is None and len(others) == 1:
                text_col = others[0]
            if text_col is None:
                raise DataError(f"{name}: no text column (looked for {', '.join(TEXT_COLUMNS)}); "
                                f"columns are: {listed}; say which column holds the text")
    return text_col, pair_col, label_col


def _get_text(record: dict, col: str, where: str) -> str:
    """The stripped, non-empty text in ``record[col]``."""
    if col not in record:
        raise DataError(f"{where}: no key '{col}' in this object")
    value = record[col]
    if not isinstance(value, str):
        raise DataError(f"{where}: column '{col}' holds {_json_type(value)}, not text")
    if is_blank(value):
        raise DataError(f"{where}: empty text in column '{col}'")
    value = value.strip()
    bad = lone_surrogate(value)
    if bad is not None:  # a JSON "\ud800" escape: the tokenizer refuses the whole batch with a TypeError
        raise DataError(f"{where}: column '{col}' is not valid Unicode ({surrogate_at(value, bad)})")
    return value


def is_blank(text: str) -> bool:
    """Whether ``text`` is empty: nothing, or nothing but whitespace (a text is used without its surrounding
    whitespace). The one rule of data files, standard input, command-line texts, the Python API and the server."""
    return not text.strip()


def lone_surrogate(text: str) -> int | None:
    """The index of the first lone surrogate in ``text`` (which no UTF-8 file holds, but a JSON ``\\ud800``
    escape or an undecodable command-line byte gives), else None."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


def surrogate_at(text: str, index: int) -> str:
    """The lone surrogate at ``index`` of ``text`` in words, its position counted from 1 ("a lone surrogate,
    U+D800, at character 1"): the one wording of the data files and the server."""
    return f"a lone surrogate, U+{ord(text[index]):04X}, at character {index + 1}"


def _get_label(record: dict, col: str, where: str) -> object:
    """The raw label in ``record[col]``: stripped if a string, None if empty or absent."""
    label = record.get(col)
    if isinstance(label, str):
        label = label.strip() or None
    elif isinstance(label, dict):
        raise DataError(f"{where}: the label in column '{col}' is a JSON object; "
                        f"expected a string, number or list")
    return label
