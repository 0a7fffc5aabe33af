"""Edge cases of real data files found by an audit (session 9); each test failed before its fix."""

from __future__ import annotations
import pytest

from oztune.cli import main
from oztune.data.labels import encode_labels, gold_label2id
from oztune.data.load import label_setup
from oztune.data.readers import read_examples
from oztune.errors import DataError


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8", newline="")
    return p


def test_field_over_128k_chars_is_read(tmp_path):  # a long document in a valid CSV
    p = write(tmp_path, "t.csv", "text,label\n" + "word " * 30000 + ",pos\nbad,neg\n")
    assert len(read_examples(p)[0].text) == len("word " * 30000) - 1


def test_bad_multi_label_error_names_the_file(tmp_path, capsys):
    p = write(tmp_path, "t.csv", "text,label\na,x|y\nb,\"[x, y]\"\n")
    assert main(["finetune", "--train", str(p), "--output", str(tmp_path / "o")]) == 2
    assert str(p) in capsys.readouterr().err


def test_python_list_labels_as_pandas_writes_them_are_multi_label(tmp_path):  # to_csv of a list column
    p = write(tmp_path, "t.csv", "text,label\na,\"['x', 'y']\"\nb,\"['y']\"\nc,[]\n")
    problem_type, label2id = label_setup(read_examples(p), None, str(p))
    assert problem_type == "multi_label" and label2id == {"x": 0, "y": 1}
    bad = write(tmp_path, "bad.csv", "text,label\na,\"['x', \"\nb,\"['y']\"\n")
    with pytest.raises(DataError, match=r"bad.csv: line 2: label .* looks like a list but is not one"):
        label_setup(read_examples(bad), "multi_label", str(bad))


def test_label_names_with_underscores_are_kept(tmp_path):
    p = write(tmp_path, "t.csv", "text,label\na,1_1\nb,1_2\n")
    assert set(label_setup(read_examples(p), None)[1]) == {"1_1", "1_2"}


@pytest.mark.parametrize("gold, want", [(["1.0", "0.0"], [1, 0]), ([1.0, 0.0], [1, 0])])
def test_gold_class_ids_written_as_floats(gold, want):  # model labels given with --label-names
    label2id = gold_label2id({0: "negative", 1: "positive"}, gold)
    assert encode_labels(gold, label2id, "single_label", path="dev.csv", lines=[2, 3]) == want


def test_gold_multi_label_class_ids_with_bars():
    gold = ["0|1", "1"]
    label2id = gold_label2id({0: "a", 1: "b"}, gold)
    assert encode_labels(gold, label2id, "multi_label", path="dev.csv", lines=[2, 3]) == [[1.0, 1.0], [0.0, 1.0]]


def test_null_in_a_label_list_is_an_error_not_a_label_named_None(tmp_path):
    p = write(tmp_path, "t.jsonl", '{"text": "a", "label": ["x", null]}\n{"text": "b", "label": ["y"]}\n')
    with pytest.raises(DataError, match=r"t.jsonl: line 1: .* label names, found null"):
        label_setup(read_examples(p), None, str(p))


def test_jsonl_duplicate_key_is_an_error_like_a_duplicate_csv_column(tmp_path):
    p = write(tmp_path, "t.jsonl", '{"text": "a", "label": "pos", "label": "neg"}\n{"text": "b", "label": "neg"}\n')
    with pytest.raises(DataError, match="line 1"):
        read_examples(p)


@pytest.mark.parametrize("raw, value", [("١.٥", 1.5), ("٣", 3.0), ("１２", 12.0), ("1_000", 1000.0)])
def test_regression_targets_read_before_are_still_numbers(raw, value):
    """Only label names need plain ASCII numbers (1_1 is a name); targets take what Python reads."""
    from oztune.data.labels import encode_labels, infer_problem_type

    assert encode_labels([raw, "0.5"], None, "regression", path="f", lines=[2, 3]) == [value, 0.5]
    assert infer_problem_type([raw, "0.5", "2.25"]) == "regression"
