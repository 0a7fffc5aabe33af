"""Tests for oztune.data.readers.read_examples."""

import csv
import io
import json
import re
from pathlib import Path

import pytest

from oztune.data.readers import Example, read_examples, read_lines, split_lines
from oztune.errors import DataError, OztuneError

SST2_DEV = Path("/work/shared/data/sst2/dev.tsv")


def write(tmp_path, name, content):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8", newline="")
    return path


# ---------------------------------------------------------------- formats


def test_csv_basic(tmp_path):
    path = write(tmp_path, "train.csv", "text,label\nhello world,pos\nbad movie,neg\n")
    assert read_examples(path) == [Example("hello world", None, "pos", 2), Example("bad movie", None, "neg", 3)]


def test_tsv_and_tab(tmp_path):
    for name in ("train.tsv", "train.tab"):
        path = write(tmp_path, name, "sentence\tlabel\na, b\t1\n")
        assert read_examples(path) == [Example("a, b", None, "1", 2)]


def test_sst2_format_five_rows(tmp_path):
    rows = ["it 's a charming and often affecting journey . \t1",
            "unflinchingly bleak and desperate \t0",
            "allows us to hope that nolan is poised to embark a major career as a commercial yet inventive filmmaker . \t1",
            "the acting , costumes , music , cinematography and sound are all astounding given the production 's austere locales . \t1",
            "it 's slow -- very , very slow . \t0"]
    path = write(tmp_path, "dev.tsv", "sentence\tlabel\n" + "\n".join(rows) + "\n")
    examples = read_examples(path)
    assert [e.label for e in examples] == ["1", "0", "1", "1", "0"]
    assert examples[0].text == "it 's a charming and often affecting journey ."
    assert examples[1].text == "unflinchingly bleak and desperate"
    assert [e.line for e in examples] == [2, 3, 4, 5, 6]
    assert all(e.text_pair is None for e in examples)


def test_jsonl_keeps_label_types(tmp_path):
    lines = [{"text": "a", "label": 1}, {"text": "b", "label": 0.5}, {"text": "c", "label": ["x", "y"]},
             {"text": "d", "label": "pos"}]
    path = write(tmp_path, "d.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n")
    examples = read_examples(path)
    assert [e.label for e in examples] == [1, 0.5, ["x", "y"], "pos"]
    assert [e.line for e in examples] == [1, 2, 3, 4]


def test_jsonl_blank_lines_and_crlf(tmp_path):
    path = write(tmp_path, "d.jsonl", '{"text": "a", "label": 1}\r\n\r\n  \n{"text": "b", "label": 0}\r\n')
    examples = read_examples(path)
    assert [(e.text, e.line) for e in examples] == [("a", 1), ("b", 4)]


def test_json_array_with_lines(tmp_path):
    data = [{"text": "a", "label": 1}, {"text": "b", "label": 0}]
    path = write(tmp_path, "d.json", json.dumps(data, indent=2))
    examples = read_examples(path)
    assert [(e.text, e.label, e.line) for e in examples] == [("a", 1, 2), ("b", 0, 6)]
    path = write(tmp_path, "c.json", '[\n{"text": "a", "label": 1},\n{"text": "b", "label": 0}\n]')
    assert [e.line for e in read_examples(path)] == [2, 3]  # a newline right before each object
    path = write(tmp_path, "e.json", '[{"text": "a", "label": 1}, 3]')
    with pytest.raises(DataError, match=r"e\.json: line 1: not a JSON object \(found a number\)"):
        read_examples(path)
    path = write(tmp_path, "f.json", "[]")
    with pytest.raises(DataError, match="no examples"):
        read_examples(path)


def test_json_file_in_jsonl_layout(tmp_path):
    path = write(tmp_path, "d.json", '{"text": "a", "label": 1}\n{"text": "b", "label": 0}\n')
    assert [e.text for e in read_examples(path)] == ["a", "b"]


def test_utf8_bom_and_crlf(tmp_path):
    path = write(tmp_path, "bom.csv", b"\xef\xbb\xbftext,label\r\ncaf\xc3\xa9,1\r\n")
    assert read_examples(path) == [Example("café", None, "1", 2)]


@pytest.mark.parametrize("name, content", [
    ("bom.jsonl", '{"text": "hi", "label": "a"}\n'),
    ("bom.csv", "label,text\na,hi\n"),  # (the BOM on the first column's name: label, not the text)
])
def test_a_utf8_bom_is_not_part_of_the_first_line(tmp_path, name, content):
    """Files saved by Excel or Notepad start with a BOM: a JSON line and the first column's name are read
    without it (else the first line is malformed JSON, and the label column is not found)."""
    path = write(tmp_path, name, b"\xef\xbb\xbf" + content.encode())
    assert [(e.text, e.label) for e in read_examples(path)] == [("hi", "a")]


def test_quoted_fields_with_commas_and_newlines(tmp_path):
    content = 'text,label\n"one, two",a\n"multi\nline\nfield",b\n"say ""hi""",c\nplain,d\n'
    examples = read_examples(write(tmp_path, "q.csv", content))
    assert [e.text for e in examples] == ["one, two", "multi\nline\nfield", 'say "hi"', "plain"]
    assert [e.line for e in examples] == [2, 3, 6, 7]


def test_pathlike_and_str(tmp_path):
    path = write(tmp_path, "p.csv", "text,label\nx,1\n")
    assert read_examples(str(path)) == read_examples(path)


# ---------------------------------------------------------------- columns


def test_sentence_pair_defaults(tmp_path):
    path = write(tmp_path, "mrpc.tsv", "sentence1\tsentence2\tlabel\nA\tB\t1\n")
    assert read_examples(path) == [Example("A", "B", "1", 2)]
    path = write(tmp_path, "mnli.jsonl", json.dumps({"premise": "P", "hypothesis": "H", "label": "entailment"}))
    assert read_examples(path) == [Example("P", "H", "entailment", 1)]
    path = write(tmp_path, "qnli.csv", "question,sentence,label\nQ?,S.,1\n")
    assert read_examples(path) == [Example("Q?", "S.", "1", 2)]
    path = write(tmp_path, "qqp.tsv", "question1\tquestion2\tlabel\nQ1?\tQ2?\t0\n")
    assert read_examples(path) == [Example("Q1?", "Q2?", "0", 2)]
    path = write(tmp_path, "hf.jsonl", json.dumps({"text": "T", "text_pair": "P", "label": "1"}))
    assert read_examples(path) == [Example("T", "P", "1", 1)]  # (before: single texts, text_pair ignored)


def test_explicit_columns(tmp_path):
    path = write(tmp_path, "c.csv", "id,body,extra,category\n1,hello,x,news\n")
    assert read_examples(path, text_column="body", label_column="category") == [Example("hello", None, "news", 2)]
    assert read_examples(path, text_column="body", text_pair_column="extra", label_column="category") == [
        Example("hello", "x", "news", 2)]


def test_explicit_pair_column_wins_over_a_known_pair(tmp_path):
    path = write(tmp_path, "c.csv", "sentence1,sentence2,extra,label\na,b,x,1\n")
    assert read_examples(path, text_pair_column="extra") == [Example("a", "x", "1", 2)]


def test_explicit_text_column_keeps_no_pair(tmp_path):
    path = write(tmp_path, "c.csv", "sentence1,sentence2,label\na,b,1\n")
    assert read_examples(path, text_column="sentence2") == [Example("b", None, "1", 2)]


def test_default_text_and_label_order(tmp_path):
    path = write(tmp_path, "c.csv", "review,target,content\nr,t,c\n")
    assert read_examples(path) == [Example("c", None, "t", 2)]


def test_single_other_column_is_the_text(tmp_path):
    path = write(tmp_path, "c.csv", "tweet,label\nhi,1\n")
    assert read_examples(path) == [Example("hi", None, "1", 2)]


def test_no_label_column_when_not_required(tmp_path):
    path = write(tmp_path, "c.csv", "text\nhi\n")
    assert read_examples(path, require_label=False) == [Example("hi", None, None, 2)]
    path = write(tmp_path, "d.csv", "text,label\nhi,\nho,1\n")
    assert [e.label for e in read_examples(path, require_label=False)] == [None, "1"]


def test_unknown_column(tmp_path):
    path = write(tmp_path, "train.csv", "sentence,label\nx,1\n")
    with pytest.raises(DataError, match=r"train\.csv: no column 'txt'; columns are: sentence, label"):
        read_examples(path, text_column="txt")
    with pytest.raises(DataError, match="no column 'cls'"):
        read_examples(path, label_column="cls")


def test_no_default_columns(tmp_path):
    path = write(tmp_path, "c.csv", "a,b,c\nx,y,z\n")
    with pytest.raises(DataError, match=r"c\.csv: no label column .*columns are: a, b, c"):
        read_examples(path)
    with pytest.raises(DataError, match=r"c\.csv: no text column .*columns are: a, b, c"):
        read_examples(path, label_column="c")


# ---------------------------------------------------------------- errors


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(DataError, match=r"train\.csv: file not found"):
        read_examples(tmp_path / "train.csv")
    (tmp_path / "dir.csv").mkdir()
    with pytest.raises(DataError, match=r"dir\.csv: is a directory"):
        read_examples(tmp_path / "dir.csv")


def test_unsupported_extension(tmp_path):
    path = write(tmp_path, "data.xlsx", "x")
    with pytest.raises(DataError, match=r"data\.xlsx: unsupported file type \.xlsx; supported: \.csv, \.tsv"):
        read_examples(path)


def test_data_error_is_oztune_error(tmp_path):
    with pytest.raises(OztuneError):
        read_examples(tmp_path / "nope.tsv")


def test_not_utf8(tmp_path):
    content = b"text,label\n" + b"a,1\n" * 5 + b"caf\xe9 au lait,1\n"
    path = write(tmp_path, "data.csv", content)
    with pytest.raises(DataError, match=r"data\.csv: line 7: not valid UTF-8 \(byte 0xe9 at position 4\); "
                                        r"save the file as UTF-8"):
        read_examples(path)


def test_ragged_row(tmp_path):
    path = write(tmp_path, "data.csv", "sentence,label\na,1\nb,0\nc,1\nd,1,extra\n")
    with pytest.raises(DataError, match=r"data\.csv: line 5: expected 2 fields \(sentence, label\) but found 3"):
        read_examples(path)
    path = write(tmp_path, "short.tsv", "sentence\tlabel\nno tab here\n")
    with pytest.raises(DataError, match=r"short\.tsv: line 2: expected 2 fields .* but found 1"):
        read_examples(path)


def test_ragged_row_after_multiline_field(tmp_path):
    path = write(tmp_path, "m.csv", 'text,label\n"a\nb\nc",1\nd,1,2\n')
    with pytest.raises(DataError, match=r"m\.csv: line 5: expected 2 fields"):
        read_examples(path)


def test_unterminated_quote(tmp_path):
    path = write(tmp_path, "q.csv", 'text,label\nok,1\nbad,"1\nnext,0\n')
    with pytest.raises(DataError, match=r"q\.csv: line 3: a quoted field starting here is never closed"):
        read_examples(path)


def test_bad_quoting(tmp_path):
    path = write(tmp_path, "q.csv", 'text,label\nok,1\n"quoted" tail,1\n')
    with pytest.raises(DataError, match=r"q\.csv: line 3: bad quoting"):
        read_examples(path)


def test_tsv_without_quoting_glue_style(tmp_path):
    # GLUE's TSVs (MNLI, QQP) quote nothing: a '"' that opens a field is text; quoted TSVs still read as before
    path = write(tmp_path, "g.tsv", 'sentence\tlabel\n"great" acting\t1\nhe said "no\t0\n')
    assert [(e.text, e.label) for e in read_examples(path)] == [('"great" acting', "1"), ('he said "no', "0")]
    path = write(tmp_path, "q.tsv", 'sentence\tlabel\n"a\ttab"\t1\n')
    assert [(e.text, e.label) for e in read_examples(path)] == [("a\ttab", "1")]


@pytest.mark.parametrize("content,lines", [
    # a text opening with '"' and one three lines on closing with '"': quoted, lines 2-4 would be one row
    ('sentence\tlabel\n"the start of a sentence\t1\na middle one\t0\nthe end of one"\t1\nanother\t0\n', "2-4"),
    ('sentence\tlabel\nfirst\t1\n"opens\t1\ncloses"\t0\n', "3-4"),  # the next line: one row boundary swallowed
    ('sentence1\tsentence2\tlabel\na\t"b\t1\nc\td"\t0\n', "2-3"),  # in the middle column of a pair file
    ('sentence\tlabel\r\n"opens\t1\r\n\r\ncloses"\t0\r\n', "2-4"),  # CRLF, a blank line between
    ('text\n"one\ntwo"\n', "2-3"),  # one column: every line is a row of its width, so nothing tells them apart
])
def test_glue_tsv_quotes_that_pair_up_across_lines_are_an_error(tmp_path, content, lines):
    # Read with quoting these are fewer rows, read without (GLUE-style) every line is a row: never guess which
    path = write(tmp_path, "g.tsv", content)
    first, last = lines.split("-")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: line {first}: ambiguous quoting: the '\"' "
                                        rf"here closes on line {last}; "):
        read_examples(path)


def test_a_csv_writer_tsv_that_is_also_a_glue_table_is_refused(tmp_path):
    # The limit of any rule: a cell holding tabs and the file's own line break is byte for byte a GLUE table
    buffer = io.StringIO()
    csv.writer(buffer, delimiter="\t").writerows([["sentence", "label"], ["opens\t1\r\ncloses", "0"]])
    assert buffer.getvalue() == 'sentence\tlabel\r\n"opens\t1\r\ncloses"\t0\r\n'
    with pytest.raises(DataError, match=r"w\.tsv: line 2: ambiguous quoting: .* read without \(GLUE-style, '\"' as text\) 2 rows"):
        read_examples(write(tmp_path, "w.tsv", buffer.getvalue()))


def test_the_fix_the_ambiguity_error_names_reads_either_meaning(tmp_path):
    # csv.QUOTE_ALL quotes the header, which settles it: the GLUE rows and the one quoted row both read back
    for rows in ([['"opens', "1"], ['closes"', "0"]], [["opens\t1\ncloses", "0"]]):
        buffer = io.StringIO()
        csv.writer(buffer, delimiter="\t", quoting=csv.QUOTE_ALL).writerows([["sentence", "label"], *rows])
        path = write(tmp_path, "fixed.tsv", buffer.getvalue())
        assert [[e.text, e.label] for e in read_examples(path)] == rows


def test_quoted_tsv_fields_spanning_lines_still_read(tmp_path):
    # without quoting these lines are not rows of the header's width, or the file shows it uses quoting: a quoted
    # header (QUOTE_ALL), or a line break in a field unlike those ending the lines
    for content, expected in [
            ('sentence\tlabel\n"one\ntwo"\t1\n', [("one\ntwo", "1")]),
            ('sentence\tlabel\n"a\tb\nc\td"\t1\n', [("a\tb\nc\td", "1")]),
            ('"sentence"\t"label"\n"a\tb\nc"\t"1"\n', [("a\tb\nc", "1")]),
            ('sentence\tlabel\r\n"a\tb\nc"\t1\r\n', [("a\tb\nc", "1")]),  # csv.writer's rows end in \r\n
            ('sentence\tlabel\n"a\nb"\t1\n"c\td"\t0\n', [("a\nb", "1"), ("c\td", "0")])]:
        path = write(tmp_path, "q.tsv", content)
        assert [(e.text, e.label) for e in read_examples(path)] == expected


def test_duplicate_header(tmp_path):
    path = write(tmp_path, "d.csv", "text,text,label\na,b,1\n")
    with pytest.raises(DataError, match=r"d\.csv: line 1: duplicate column names in the header: text"):
        read_examples(path)


def test_empty_file_and_header_only(tmp_path):
    for name in ("x.csv", "x.jsonl"):
        with pytest.raises(DataError, match=r"x\.\w+: no examples \(the file is empty\)"):
            read_examples(write(tmp_path, name, "\n\n"))
    with pytest.raises(DataError, match=r"h\.csv: no examples \(the file has a header but no rows\)"):
        read_examples(write(tmp_path, "h.csv", "text,label\n"))


def test_empty_text(tmp_path):
    path = write(tmp_path, "train.csv", "sentence,label\n" + "a,1\n" * 7 + "   ,1\n")
    with pytest.raises(DataError, match=r"train\.csv: line 9: empty text in column 'sentence'"):
        read_examples(path)


def test_empty_pair_text(tmp_path):
    path = write(tmp_path, "p.tsv", "sentence1\tsentence2\tlabel\na\tb\t1\na\t \t1\n")
    with pytest.raises(DataError, match=r"p\.tsv: line 3: empty text in column 'sentence2'"):
        read_examples(path)


def test_missing_label(tmp_path):
    path = write(tmp_path, "l.csv", "text,label\na,1\nb, \n")
    with pytest.raises(DataError, match=r"l\.csv: line 3: missing label in column 'label'"):
        read_examples(path)
    path = write(tmp_path, "l.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": null}\n')
    with pytest.raises(DataError, match=r"l\.jsonl: line 2: missing label in column 'label'"):
        read_examples(path)


def test_jsonl_malformed(tmp_path):
    path = write(tmp_path, "f.jsonl", '{"text": "a", "label": 1}\n\n{"text": "b" "label": 0}\n')
    with pytest.raises(DataError, match=r"f\.jsonl: line 3: not a JSON object \(Expecting ',' delimiter"):
        read_examples(path)


def test_jsonl_not_an_object(tmp_path):
    path = write(tmp_path, "f.jsonl", '{"text": "a", "label": 1}\n["b", 0]\n')
    with pytest.raises(DataError, match=r"f\.jsonl: line 2: not a JSON object \(found an array\)"):
        read_examples(path)


def test_jsonl_missing_key(tmp_path):
    path = write(tmp_path, "f.jsonl", '{"text": "a", "label": 1}\n{"txt": "b", "label": 0}\n')
    with pytest.raises(DataError, match=r"f\.jsonl: line 2: no key 'text'"):
        read_examples(path)
    path = write(tmp_path, "g.jsonl", '{"text": "a", "label": 1}\n{"text": "b"}\n')
    with pytest.raises(DataError, match=r"g\.jsonl: line 2: missing label in column 'label'"):
        read_examples(path)
    assert read_examples(path, require_label=False)[1].label is None


def test_jsonl_text_not_a_string(tmp_path):
    path = write(tmp_path, "f.jsonl", '{"text": 5, "label": 1}\n')
    with pytest.raises(DataError, match=r"f\.jsonl: line 1: column 'text' holds a number, not text"):
        read_examples(path)


def test_jsonl_label_object_rejected(tmp_path):
    path = write(tmp_path, "f.jsonl", '{"text": "a", "label": {"x": 1}}\n')
    with pytest.raises(DataError, match=r"f\.jsonl: line 1: the label in column 'label' is a JSON object"):
        read_examples(path)


def test_label_cells_not_parsed(tmp_path):
    path = write(tmp_path, "m.csv", 'text,labels\na,"[""x"", ""y""]"\nb,x|y\n')
    assert [e.label for e in read_examples(path)] == ['["x", "y"]', "x|y"]


# ---------------------------------------------------------------- real data


@pytest.mark.skipif(not SST2_DEV.exists(), reason="SST-2 dev set not available")
def test_real_sst2_dev():
    examples = read_examples(SST2_DEV)
    assert len(examples) == 872
    assert {e.label for e in examples} == {"0", "1"}
    assert all(e.text == e.text.strip() and e.text for e in examples)
    assert examples[0].line == 2 and examples[-1].line == 873


def test_a_blank_cell_in_a_multi_label_column_means_no_labels(tmp_path):
    path = write(tmp_path, "m.csv", 'text,labels\nfirst,a|b\nsecond,\nthird,c\n')
    assert [e.label for e in read_examples(path)] == ["a|b", [], "c"]
    path = write(tmp_path, "s.csv", 'text,label\nfirst,a\nsecond,\n')  # not multi-label: still an error
    with pytest.raises(DataError, match=r"s\.csv: line 3: missing label in column 'label'"):
        read_examples(path)


def test_read_lines_ends_a_line_only_at_crlf_cr_or_lf(tmp_path):
    """read_lines (predict --input FILE.txt) and split_lines (--input -) end a line at CRLF, CR or LF only, as
    Python's text mode does: a form feed, vertical tab, NEL or line separator inside a text (which str.splitlines
    also breaks at) stays in that text, so every output line answers the input line of its number."""
    texts = ["page\x0cbreak", "tab\x0bbed", "next\x85line", "sep\u2028arated", "file\x1csep", "plain"]
    path = tmp_path / "t.txt"
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(texts[:3]).encode() + b"\r" + "\n".join(texts[3:]).encode() + b"\n")
    assert read_lines(path) == texts
    assert split_lines("\n".join(texts)) == texts == split_lines("\n".join(texts) + "\n")
    assert split_lines("a\n\n") == ["a", ""] and split_lines("") == []  # (only the very last newline ends a line)
