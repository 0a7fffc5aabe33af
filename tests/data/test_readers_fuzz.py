"""Property tests for read_examples: arbitrary bytes never crash it, and valid tables round-trip exactly."""

import csv
import io
import json

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from oztune.data.readers import read_examples
from oztune.errors import DataError

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Any character UTF-8 can encode (no lone surrogates), except NUL.
CHARS = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
# Cells with quotes, delimiters and newlines, but something left after strip().
CELL = st.text(alphabet=st.one_of(CHARS, st.sampled_from(list(',\t"\n\r\' '))), min_size=1, max_size=30).filter(
    lambda s: s.strip() != "")
EXTRA_COLUMNS = ["id", "source", "note", "meta"]


@SETTINGS
@given(data=st.binary(max_size=300), ext=st.sampled_from([".csv", ".tsv", ".jsonl", ".json"]))
def test_random_bytes_give_examples_or_data_error(tmp_path, data, ext):
    path = tmp_path / f"fuzz{ext}"
    path.write_bytes(data)
    try:
        result = read_examples(path, require_label=False)
    except DataError:
        return
    assert isinstance(result, list) and result


@SETTINGS
@given(text=st.text(alphabet=st.sampled_from(list('ab,\t"\n\r {}[]:1')), max_size=80),
       ext=st.sampled_from([".csv", ".tsv", ".jsonl"]))
@example(text=' a ,1\n"b\nb", 1 \n', ext=".csv")  # examples (random texts rarely give any: only a CSV can)
@example(text=",1", ext=".csv")  # an empty text: an error, not an example
def test_near_valid_text_gives_examples_or_data_error(tmp_path, text, ext):
    path = tmp_path / f"fuzz{ext}"
    path.write_text("text,label\n" + text if ext == ".csv" else text, encoding="utf-8", newline="")
    try:
        examples = read_examples(path)
    except DataError as err:
        assert str(err).startswith(f"{path}: "), err  # the error names the file
        return
    assert examples
    for e in examples:
        assert e.text and e.text == e.text.strip()
        assert e.text_pair is None or (e.text_pair and e.text_pair == e.text_pair.strip())
        assert e.label is not None and e.label != ""  # labels are required here: a blank one is an error
    lines = [e.line for e in examples]
    assert lines[0] >= 1 and lines == sorted(set(lines))


@st.composite
def tables(draw):
    """A header (text, label and extra columns in random order) and rows of non-blank cells."""
    extras = draw(st.lists(st.sampled_from(EXTRA_COLUMNS), unique=True, max_size=3))
    columns = draw(st.permutations(["text", "label"] + extras))
    rows = draw(st.lists(st.fixed_dictionaries({c: CELL for c in columns}), min_size=1, max_size=8))
    return columns, rows


@SETTINGS
@given(table=tables(), ext=st.sampled_from([".csv", ".tsv"]))
def test_csv_round_trip_never_drops_a_row(tmp_path, table, ext):
    columns, rows = table
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter="," if ext == ".csv" else "\t")
    writer.writerow(columns)
    writer.writerows([[row[c] for c in columns] for row in rows])
    path = tmp_path / f"table{ext}"
    path.write_text(buffer.getvalue(), encoding="utf-8", newline="")

    examples = read_examples(path)

    assert [e.text for e in examples] == [row["text"].strip() for row in rows]
    assert [e.label for e in examples] == [row["label"].strip() for row in rows]
    assert all(e.text_pair is None for e in examples)
    lines = [e.line for e in examples]
    assert lines[0] >= 2 and lines == sorted(set(lines))


@SETTINGS
@given(table=tables(), ascii_only=st.booleans(),
       labels=st.lists(st.one_of(st.integers(-5, 5), st.floats(allow_nan=False, allow_infinity=False), CELL,
                                 st.lists(CELL, max_size=3)), min_size=8, max_size=8))
def test_jsonl_round_trip_never_drops_a_row(tmp_path, table, ascii_only, labels):
    columns, rows = table
    for row, label in zip(rows, labels):
        row["label"] = label
    path = tmp_path / "table.jsonl"
    lines = [json.dumps({c: row[c] for c in columns}, ensure_ascii=ascii_only) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8", newline="")

    examples = read_examples(path, text_column="text", label_column="label")

    assert [e.text for e in examples] == [row["text"].strip() for row in rows]
    expected = [row["label"].strip() if isinstance(row["label"], str) else row["label"] for row in rows]
    assert [e.label for e in examples] == expected
    assert [e.line for e in examples] == list(range(1, len(rows) + 1))


@st.composite
def pair_tables(draw):
    """A sentence-pair header (a known pair, a label and extra columns in random order) and rows."""
    first, second = draw(st.sampled_from([("sentence1", "sentence2"), ("premise", "hypothesis")]))
    extras = draw(st.lists(st.sampled_from(EXTRA_COLUMNS), unique=True, max_size=2))
    columns = draw(st.permutations([first, second, "label"] + extras))
    rows = draw(st.lists(st.fixed_dictionaries({c: CELL for c in columns}), min_size=1, max_size=6))
    return (first, second), columns, rows


@SETTINGS
@given(table=pair_tables(), ext=st.sampled_from([".csv", ".tsv"]),
       quoting=st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL, csv.QUOTE_NONNUMERIC]),
       newline=st.sampled_from(["\n", "\r\n"]), bom=st.booleans())
def test_any_quoting_style_line_ending_and_pair_layout_round_trips(tmp_path, table, ext, quoting, newline, bom):
    (first, second), columns, rows = table
    if newline == "\n":  # the csv writer leaves a bare CR unquoted then, which reads as a line break
        rows = [{c: v.replace("\r", "x") for c, v in row.items()} for row in rows]
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter="," if ext == ".csv" else "\t", quoting=quoting, lineterminator=newline)
    writer.writerow(columns)
    writer.writerows([[row[c] for c in columns] for row in rows])
    path = tmp_path / f"pairs{ext}"
    path.write_bytes(("\ufeff" if bom else "").encode() + buffer.getvalue().encode("utf-8"))

    examples = read_examples(path)

    assert [(e.text, e.text_pair, e.label) for e in examples] == [
        (row[first].strip(), row[second].strip(), row["label"].strip()) for row in rows]
