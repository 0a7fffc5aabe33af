"""`oztune predict` and `oztune evaluate` as a user runs them: inputs that must be one
clear error line (exit 2) instead of a traceback (output files that would replace an input: see
tests/test_crash_safety.py)."""

from __future__ import annotations

import io
import json
import sys

import pytest

from oztune.cli import main


def _stdin(monkeypatch, data: bytes) -> None:
    """``sys.stdin`` as a pipe of raw bytes (UTF-8 text mode with surrogateescape, as under a C.UTF-8 locale)."""
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", errors="surrogateescape"))


def test_predict_stdin_non_utf8_is_one_line_naming_the_line(tiny_finetuned, monkeypatch, capsys):
    _stdin(monkeypatch, b"good movie\ngood \xff movie\n")
    assert main(["predict", "--model", str(tiny_finetuned), "--input", "-"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == ("oztune predict: error: standard input: line 2: not valid UTF-8 (byte 0xff at position 6); "
                           "give the texts as UTF-8"), err  # (where in the line, as a file's error says)


def test_predict_stdin_bom_and_crlf(tiny_finetuned, monkeypatch, capsys):
    _stdin(monkeypatch, b"\xef\xbb\xbfgood movie\r\nbad film\r\n")
    assert main(["predict", "--model", str(tiny_finetuned), "--input", "-"]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(out) == 2
    from oztune import Classifier

    assert out == Classifier.from_pretrained(tiny_finetuned).predict(["good movie", "bad film"])


def test_predict_argument_text_with_undecodable_bytes_is_one_line(tiny_finetuned, capsys):
    # Python hands a command-line argument holding the byte 0xff over as the lone surrogate U+DCFF.
    assert main(["predict", "--model", str(tiny_finetuned), "good movie", "good \udcff movie"]) == 2
    err = capsys.readouterr().err
    assert "text 2" in err and "UTF-8" in err


@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_jsonl_lone_surrogate_escape_names_file_line_and_column(command, tiny_finetuned, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "good movie", "label": "pos"}\n{"text": "good \\ud800 movie", "label": "pos"}\n')
    opt = "--input" if command == "predict" else "--data"
    assert main([command, "--model", str(tiny_finetuned), opt, str(data)]) == 2
    err = capsys.readouterr().err
    assert f"{data}: line 2" in err and "'text'" in err and "U+D800" in err


def test_predict_stdin_blank_line_is_an_error_naming_it(tiny_finetuned, monkeypatch, capsys):
    # a blank line was skipped: every later answer then stood on the output line of the text before it
    _stdin(monkeypatch, b"good movie\n\nbad film\n")
    assert main(["predict", "--model", str(tiny_finetuned), "--input", "-"]) == 2
    assert "standard input: line 2 is empty" in capsys.readouterr().err


@pytest.mark.parametrize("num_labels", [1, 3])
def test_evaluate_a_model_whose_outputs_are_nan_is_one_line_not_bare_nan_json(num_labels, tmp_path, capsys):
    """A model whose weights went to nan (a diverged run) gave --json '"mse": NaN' (not JSON) for regression
    and, for classification, the metrics of argmax(nan) = the first label."""
    import torch

    from conftest import tiny_hf_model, write_tiny_tokenizer

    hf = tiny_hf_model("bert", num_labels=num_labels)
    with torch.no_grad():
        hf.classifier.bias[-1] = float("nan")
    hf.save_pretrained(tmp_path / "m")
    write_tiny_tokenizer(tmp_path / "m", 64)
    data = tmp_path / "d.jsonl"
    labels = [0.5, 1.5] if num_labels == 1 else ["LABEL_0", "LABEL_2"]
    data.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(["good", "bad film"], labels)))
    capsys.readouterr()  # (save_pretrained's progress bar)
    assert main(["evaluate", "--model", str(tmp_path / "m"), "--data", str(data), "--json"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1
    assert f"{data}: line 1: the model's output is not a finite number" in err and "2 of 2 examples" in err


def test_evaluate_a_two_label_hf_model_whose_config_leaves_the_default_names_out(tmp_path, capsys):
    """transformers >= 5 writes no id2label for 2 labels named LABEL_0, LABEL_1 (its defaults): the model had
    no labels, so every gold label was 'not one the model knows ()' (and prune/distill called it untrained)."""
    import torch

    from conftest import tiny_hf_model, write_tiny_tokenizer

    hf = tiny_hf_model("bert", num_labels=2)
    hf.save_pretrained(tmp_path / "m")
    write_tiny_tokenizer(tmp_path / "m", 64)
    texts, gold = ["good", "bad film", "the plot was dull", "nice"], [0, 1, 1, 0]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(texts, gold)))
    capsys.readouterr()  # (save_pretrained's progress bar)
    assert main(["evaluate", "--model", str(tmp_path / "m"), "--data", str(data), "--json", "--per-label"]) == 0
    out = json.loads(capsys.readouterr().out)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tmp_path / "m" / "tokenizer.json"))
    with torch.no_grad():  # transformers' own predictions
        pred = [int(hf(input_ids=torch.tensor([tok.encode(t).ids])).logits.argmax()) for t in texts]
    assert out["accuracy"] == sum(p == g for p, g in zip(pred, gold)) / 4
    assert list(out["per_label"]) == ["LABEL_0", "LABEL_1"] and out["per_label"]["LABEL_1"]["support"] == 2


@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_output_to_a_fifo_is_written_into_it_not_replaced(command, tiny_finetuned, sentiment_files, tmp_path):
    # `--output /dev/stdout` (a link to a pipe or terminal) or a named pipe: replacing it with a regular file
    # (the atomic write's rename) left the reader with nothing (exit 0) and, run as root, /dev/stdout a file.
    import os
    import re
    import stat

    flipped = tmp_path / "flipped.tsv"  # (labels swapped: the answers the model gets right are mistakes)
    swap = {"\tneg\n": "\tpos\n", "\tpos\n": "\tneg\n"}
    flipped.write_text(re.sub("\t(neg|pos)\n", lambda m: swap[m.group()], sentiment_files[1].read_text()))
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # (a reader there: the writer's open does not block)
    try:
        args = (["predict", "--model", str(tiny_finetuned), "good movie", "bad film", "--output", str(fifo)]
                if command == "predict" else
                ["evaluate", "--model", str(tiny_finetuned), "--data", str(flipped), "--mistakes", str(fifo)])
        assert main(args) == 0
        got = os.read(reader, 1 << 16).decode()
    finally:
        os.close(reader)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    rows = [json.loads(line) for line in got.splitlines()]
    assert rows and all("score" in r for r in rows)
    if command == "predict":
        assert len(rows) == 2


def test_predict_output_dash_is_standard_output_as_input_dash_is_standard_input(tiny_finetuned, tmp_path,
                                                                                 monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # (a file named '-' was written here, and nothing printed)
    assert main(["predict", "--model", str(tiny_finetuned), "good movie", "bad film", "--output", "-"]) == 0
    assert len([json.loads(line) for line in capsys.readouterr().out.splitlines()]) == 2
    assert not (tmp_path / "-").exists()


class _OneMistake:
    """A model stand-in whose evaluation has one mistake (no model is loaded)."""

    def evaluate(self, *a, **kw):
        wrong = [{"line": 2, "text": "bad film", "label": "neg", "predicted": "pos", "score": 0.9}]
        return {"accuracy": 0.5, "examples": 2, **({"mistakes": wrong} if kw.get("mistakes") else {})}


def test_evaluate_mistakes_dash_is_standard_output_with_the_table_on_standard_error(tmp_path, monkeypatch, capsys):
    """`--mistakes -` wrote a file named '-'; as predict's `--output -`, it is standard output."""
    import oztune.commands as commands

    monkeypatch.setattr(commands, "_open", lambda *a: _OneMistake())
    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", "--model", "m", "--data", "d.tsv", "--mistakes", "-"]) == 0
    out, err = capsys.readouterr()
    assert [json.loads(line) for line in out.splitlines()] == _OneMistake().evaluate(mistakes=True)["mistakes"]
    assert "accuracy" in err and "1 mistakes written to standard output" in err
    assert list(tmp_path.iterdir()) == []  # no file named '-'


def test_evaluate_mistakes_dash_with_json_is_one_line_refused(tmp_path, monkeypatch, capsys):
    import oztune.commands as commands

    monkeypatch.setattr(commands, "_open", lambda *a: pytest.fail("the model was loaded before the check"))
    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", "--model", "m", "--data", "d.tsv", "--mistakes", "-", "--json"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1
    assert "--mistakes - and --json would both write to standard output" in err
    assert list(tmp_path.iterdir()) == []


def test_predict_empty_standard_input_says_it_was_empty(tiny_finetuned, tmp_path, monkeypatch, capsys):
    """`--input - < /dev/null` said "no texts: give them as arguments or with --input FILE", though --input was
    given; the error says standard input was empty (an empty --input FILE is named as such already)."""
    _stdin(monkeypatch, b"")
    assert main(["predict", "--model", str(tiny_finetuned), "--input", "-"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.strip().splitlines() == ["oztune predict: error: --input -: no texts (standard input was empty)"]
    empty = tmp_path / "empty.tsv"
    empty.write_text("")
    assert main(["predict", "--model", str(tiny_finetuned), "--input", str(empty)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"oztune predict: error: {empty}: no examples (the file is empty)"]
    assert main(["predict", "--model", str(tiny_finetuned)]) == 2  # nothing given at all: as before
    assert "no texts: give them as arguments or with --input FILE" in capsys.readouterr().err


def test_predict_reads_a_txt_file_as_one_text_per_line(tiny_finetuned, tmp_path, capsys):
    """--input FILE.txt: one text per line, as --input - reads standard input (BOM dropped, CRLF, CR or LF, the
    last newline optional), answered line for line; a blank line, an empty file, bytes that are not UTF-8 and a
    column option are one error line each, naming the file (and line)."""
    from oztune import Classifier

    texts = ["good movie", "bad film, tab\tinside", 'a "quoted", comma text']  # (no column parsing)
    for data in (b"\xef\xbb\xbfgood movie\r\nbad film, tab\tinside\ra \"quoted\", comma text\n",
                 "\n".join(texts).encode()):
        path = tmp_path / "in.TXT"
        path.write_bytes(data)
        assert main(["predict", "--model", str(tiny_finetuned), "--input", str(path)]) == 0
        out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert out == Classifier.from_pretrained(tiny_finetuned).predict(texts)
    for data, words in ((b"good movie\n \nbad film\n", f"{path}: line 2 is empty"),
                        (b"", f"--input {path}: no texts (the file was empty)"),
                        (b"good movie\nbad \xff film\n", f"{path}: line 2: not valid UTF-8")):
        path.write_bytes(data)
        assert main(["predict", "--model", str(tiny_finetuned), "--input", str(path)]) == 2
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1, err
    path.write_bytes(b"good movie\n")
    for option in ("--text-column", "--text-pair-column"):  # (a pair column was ignored: texts answered alone)
        assert main(["predict", "--model", str(tiny_finetuned), "--input", str(path), option, "text"]) == 2
        err = capsys.readouterr()
        assert "one text per line, no columns" in err.err and not err.out


def test_predict_stdin_as_a_text_stream_reads_lines_as_a_pipe_does(tiny_finetuned, monkeypatch, capsys):
    """Standard input replaced by a text stream (io.StringIO: no bytes buffer, as a program calling main() may set
    it): a leading BOM is dropped, CRLF, CR or LF ends a line and the last newline ends the last text (no empty line
    after it), as from a pipe."""
    from oztune import Classifier

    monkeypatch.setattr(sys, "stdin", io.StringIO("\ufeffgood movie\r\nbad film\rgreat plot\n"))
    assert main(["predict", "--model", str(tiny_finetuned), "--input", "-"]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert out == Classifier.from_pretrained(tiny_finetuned).predict(["good movie", "bad film", "great plot"])


@pytest.mark.parametrize("option", ["--text-column", "--text-pair-column"])
def test_predict_stdin_refuses_a_column_option(tiny_finetuned, monkeypatch, capsys, option):
    """--input -: one text per line, no columns to choose: a column option is one error line, not ignored (the
    lines answered as texts alone)."""
    _stdin(monkeypatch, b"good movie\n")
    assert main(["predict", "--model", str(tiny_finetuned), "--input", "-", option, "text"]) == 2
    err = capsys.readouterr()
    assert "--input -: one text per line, no columns" in err.err and len(err.err.strip().splitlines()) == 1
    assert not err.out


def test_predict_answers_argument_texts_then_a_txt_files_lines(tiny_finetuned, tmp_path, capsys):
    """Texts given as arguments and --input FILE.txt: every text answered, the arguments' first, then the file's lines
    in order (the arguments were not dropped for the file's)."""
    from oztune import Classifier

    path = tmp_path / "in.txt"
    path.write_bytes(b"bad film\ngreat plot\n")
    assert main(["predict", "--model", str(tiny_finetuned), "good movie", "--input", str(path)]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert out == Classifier.from_pretrained(tiny_finetuned).predict(["good movie", "bad film", "great plot"])
