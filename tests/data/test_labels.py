"""Tests for oztune.data.labels."""

import os

import pytest

from oztune.data.labels import (PROBLEM_TYPES, are_class_ids, build_label_map, encode_labels, gold_label2id,
                                infer_problem_type, named_class_ids, parse_multi_label)
from oztune.errors import DataError


@pytest.mark.parametrize("labels, expected", [
    (["0", "1", "1"], "single_label"),
    ([0, 1, 2], "single_label"),
    (["pos", "neg"], "single_label"),
    (["1.0", "0.0"], "single_label"),
    ([1.0, 2.0], "single_label"),
    ([True, False], "single_label"),
    (["nan", "inf"], "single_label"),
    (["[positive]", "neutral"], "single_label"),  # not valid JSON: a plain name
    (["0.5", "1", "3.25"], "regression"),
    ([0.5, 1, 2], "regression"),
    ([["a"], ["b", "c"]], "multi_label"),
    (['["a", "b"]', "[]"], "multi_label"),
    (["a|b", "c"], "multi_label"),
    ([None, "a"], "single_label"),
    ([], "single_label"),
])
def test_infer_problem_type(labels, expected):
    assert infer_problem_type(labels) == expected
    assert expected in PROBLEM_TYPES


@pytest.mark.parametrize("raw, expected", [
    (["a", "b"], ["a", "b"]),
    ([1, 2], ["1", "2"]),
    ('["a", "b"]', ["a", "b"]),
    ("a|b", ["a", "b"]),
    (" a | b |", ["a", "b"]),
    ("a", ["a"]),
    ("", []),
    ("[]", []),
    (None, []),
    (3, ["3"]),
    (["a", "a", "b"], ["a", "b"]),
])
def test_parse_multi_label(raw, expected):
    assert parse_multi_label(raw, where="f.csv: line 2") == expected


def test_parse_multi_label_errors():
    with pytest.raises(DataError, match=r"f\.csv: line 2: label .* looks like a list but is not one"):
        parse_multi_label('["a", ', where="f.csv: line 2")
    with pytest.raises(DataError, match=r"f\.csv: line 4: a multi-label value must list label names"):
        parse_multi_label([["a"]], where="f.csv: line 4")


def test_a_boolean_in_a_multi_label_list_is_refused():
    """A JSON true among a row's labels is a data error, not a label named 'True' the model learns."""
    with pytest.raises(DataError, match=r"x: a multi-label value must list label names, found true"):
        parse_multi_label([True, "a"], where="x")


def test_label_map_integer_names_sorted_numerically():
    assert build_label_map(["1", "0", "1"], "single_label") == {"0": 0, "1": 1}
    assert build_label_map(["5", "2", "1", "10"], "single_label") == {"1": 0, "2": 1, "5": 2, "10": 3}
    assert build_label_map([1, "2", 5.0], "single_label") == {"1": 0, "2": 1, "5": 2}
    assert build_label_map(["-1", "1"], "single_label") == {"-1": 0, "1": 1}


def test_other_scripts_digits_stay_names_of_their_own():
    """The Arabic-Indic digit one is a label of its own, not merged into "1" (two classes become one)."""
    raw = ["\u0661", "1", "1"]
    assert infer_problem_type(raw) == "single_label"
    label2id = build_label_map(raw, "single_label")
    assert sorted(label2id) == sorted(["1", "\u0661"]) and sorted(label2id.values()) == [0, 1]
    ids = encode_labels(raw, label2id, "single_label", path="t.csv", lines=[2, 3, 4])
    assert ids[0] != ids[1] == ids[2]


def test_names_of_one_integer_value_get_the_same_ids_in_every_process():
    """"1" and "١" (or "10" and "1_0") are both 1 (10) to int(): sorted by it alone, the set's order, which
    changes with the process's hash seed, numbered them, so the same command (or two torchrun ranks) could
    number the classes differently."""
    import subprocess
    import sys

    code = ("from oztune.data.labels import build_label_map as b; "
            "print(b(['\u0661', '1', '2'], 'single_label'), b(['1_0', '10', '2'], 'single_label'))")
    outs = {subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": str(seed)},
                           capture_output=True, text=True, check=True).stdout for seed in range(1, 7)}
    assert outs == {"{'1': 0, '\u0661': 1, '2': 2} {'2': 0, '10': 1, '1_0': 2}\n"}, outs


def test_label_map_names_sorted_alphabetically():
    assert build_label_map(["pos", "neg", "neutral", None], "single_label") == {"neg": 0, "neutral": 1, "pos": 2}
    assert build_label_map(["b", "10", "2"], "single_label") == {"10": 0, "2": 1, "b": 2}


def test_label_map_multi_label_union():
    raw = [["b", "a"], '["c"]', "a|d", "", []]
    assert build_label_map(raw, "multi_label") == {"a": 0, "b": 1, "c": 2, "d": 3}


def test_label_map_regression_and_bad_type():
    assert build_label_map(["0.5", "1"], "regression") is None
    with pytest.raises(DataError, match="unknown problem type 'classification'"):
        build_label_map(["a"], "classification")
    with pytest.raises(DataError, match="is a list, but the problem type is single_label"):
        build_label_map([["a"]], "single_label")


def test_encode_single_label_int_and_str_same_name():
    label2id = build_label_map(["0", "1"], "single_label")
    assert encode_labels([1, "1", "0", 0, "1.0"], label2id, "single_label", path="t.csv", lines=[2, 3, 4, 5, 6]) == [
        1, 1, 0, 0, 1]


def test_encode_unknown_label():
    label2id = {"neg": 0, "pos": 1}
    with pytest.raises(DataError, match=r"dev\.csv: line 7: label 'neutral' is not one the model knows \(neg, pos\)"):
        encode_labels(["pos", "neutral"], label2id, "single_label", path="dev.csv", lines=[6, 7])


def test_encode_unknown_label_long_list_is_cut():
    label2id = {f"c{i:02d}": i for i in range(30)}
    with pytest.raises(DataError, match=r"c19, \.\.\. \(30 in all\)\)$"):
        encode_labels(["zzz"], label2id, "single_label", path="d.csv", lines=[2])


def test_encode_missing_single_label():
    with pytest.raises(DataError, match=r"d\.csv: line 3: missing label"):
        encode_labels([None], {"a": 0}, "single_label", path="d.csv", lines=[3])


def test_encode_multi_label():
    label2id = build_label_map([["a", "b"], "c"], "multi_label")
    out = encode_labels([["a", "c"], "b", "", '["a","b","c"]'], label2id, "multi_label", path="m.jsonl",
                        lines=[1, 2, 3, 4])
    assert out == [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]
    with pytest.raises(DataError, match=r"m\.jsonl: line 9: label 'z' is not one the model knows \(a, b, c\)"):
        encode_labels(["a|z"], label2id, "multi_label", path="m.jsonl", lines=[9])


def test_encode_regression():
    assert encode_labels(["0.5", 2, 1.25, " 3 "], None, "regression", path="r.csv", lines=[2, 3, 4, 5]) == [
        0.5, 2.0, 1.25, 3.0]
    for bad in ("high", None, "nan", True):
        with pytest.raises(DataError, match=r"r\.csv: line 8: label .* is not a number"):
            encode_labels([bad], None, "regression", path="r.csv", lines=[8])


@pytest.mark.parametrize("big", ["1e39", "-4e38", 10**40, 10**400])
def test_a_regression_label_beyond_float32_is_refused_naming_its_line(big):
    """1e39 is a finite float64 but inf as the float32 the labels are stored in: evaluate printed mse Infinity
    (not JSON) and pearson 0, finetune blamed the learning rate ("training diverged")."""
    with pytest.raises(DataError, match=r"r\.csv: line 8: label .* is beyond the range of float32"):
        encode_labels([big], None, "regression", path="r.csv", lines=[8])
    assert encode_labels(["3.4e38", "-3.4e38"], None, "regression", path="r.csv", lines=[2, 3]) == [3.4e38, -3.4e38]


def test_round_trip_from_reader_labels():
    raw = ["1", "0", "1", "0"]
    label2id = build_label_map(raw, infer_problem_type(raw))
    id2label = {i: name for name, i in label2id.items()}
    ids = encode_labels(raw, label2id, "single_label", path="x", lines=[2, 3, 4, 5])
    assert [id2label[i] for i in ids] == raw


@pytest.mark.parametrize("id2label, gold, want", [
    ({0: "negative", 1: "positive"}, ["0", 1, "1"], {"0": 0, "1": 1}),  # integers are class ids of named labels
    ({0: "negative", 1: "positive"}, ["positive", "0"], {"negative": 0, "positive": 1}),  # mixed: by name
    ({0: "0", 1: "1"}, ["1", "0"], {"0": 0, "1": 1}),  # integer names: by name
    ({0: "2", 1: "0"}, ["0", "2"], {"2": 0, "0": 1}),  # integer names out of id order: by name, not as ids
    ({0: "1", 1: "pos"}, ["1"], {"1": 0, "pos": 1}),  # some names are integers: by name
    ({0: "a", 1: "b", 2: "c"}, [["a", "b"], [], ["c"]], {"a": 0, "b": 1, "c": 2}),  # multi-label lists: by name
    ({0: "a", 1: "b"}, [["1"], [], ["0", "1"]], {"0": 0, "1": 1}),  # lists of integers: class ids
    ({0: "a", 1: "b"}, [[], []], {"a": 0, "b": 1}),  # nothing to go by: by name
])
def test_gold_labels_are_read_by_name_or_by_class_id(id2label, gold, want):
    assert gold_label2id(id2label, gold) == want


def test_gold_integers_are_names_where_the_models_names_are_integers():
    """A model trained on labels 1 and 2 reads a gold "0" as an unknown label, not as class 0 (its "1"):
    scoring it as class 0 would count wrong answers right."""
    label2id = gold_label2id({0: "1", 1: "2"}, ["0"])
    assert label2id == {"1": 0, "2": 1}
    with pytest.raises(DataError, match=r"d\.csv: line 2: label '0' is not one the model knows \(1, 2\)"):
        encode_labels(["0"], label2id, "single_label", path="d.csv", lines=[2])
    assert gold_label2id({0: "1", 1: "2"}, ["1", "2"]) == {"1": 0, "2": 1}
    # negative integer names are integers too: a gold "0" is not class 0 of a model of -1 and 1
    assert are_class_ids(["-1", "1"])
    assert gold_label2id({0: "-1", 1: "1"}, ["0"]) == {"-1": 0, "1": 1}


def test_label_names_refuse_a_negative_class_id():
    """--label-names neg,pos over labels -1 and 1 is refused naming the line and saying the ids start at 0
    (-1 is no class id of the names given)."""
    with pytest.raises(DataError, match=r"--label-names names the class ids 0\.\.1; f holds the label -1 \(line 2\): "
                       "number the labels from 0"):
        named_class_ids(["neg", "pos"], ["-1", "1"], "single_label", path="f", lines=[2, 3])
    assert named_class_ids(["neg", "pos"], ["0", "1"], "single_label", path="f", lines=[2, 3]) == {"0": 0, "1": 1}


def test_a_list_label_for_a_single_label_task_names_the_file_and_line(tmp_path, capsys):
    """--problem-type single_label on a file with a list label said "label ['price'] is a list, but the problem
    type is single_label", naming neither the file nor the line (multi-label errors name both)."""
    import json
    import re

    from oztune.cli import main
    from oztune.data.load import Columns, label_setup, read_labelled

    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [{"text": "a", "label": "x"}, {"text": "b", "label": ["price"]},
                                                            {"text": "c", "label": "y"}]))
    examples = read_labelled(str(path), Columns(), problem_type="single_label")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: line 2: label \['price'\] is a list, but the problem type is single_label$"):
        label_setup(examples, "single_label", str(path))
    assert main(["finetune", "--train", str(path), "--output", str(tmp_path / "m"), "--model", str(tmp_path / "none"),
                 "--problem-type", "single_label", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{path}: line 2: label ['price'] is a list" in err and len(err.splitlines()) == 1, err
