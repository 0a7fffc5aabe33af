"""A model fine-tuned on text pairs is refused single texts, and one fine-tuned on single texts is refused pairs
(predict, evaluate, the Python API): its scores of the other kind mean nothing. The saved model records which it
was trained on, and every command that writes a model from another keeps the record; a model saved before oztune
recorded it scores both, as it always did. The server's 422: tests/serve/test_server.py."""

from __future__ import annotations

import json

import pytest

from oztune.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

ROWS = [("the good movie", "it is good", "good"), ("the bad movie", "it is bad", "bad"),
        ("a fine film", "it is nice", "good"), ("a dull plot", "it is poor", "bad")] * 4


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A pair file (sentence1, sentence2, label) and a single-text file (sentence, label) of the same task."""
    d = tmp_path_factory.mktemp("pair-data")
    pairs, single = d / "pairs.tsv", d / "single.tsv"
    pairs.write_text("sentence1\tsentence2\tlabel\n" + "".join(f"{a}\t{b}\t{y}\n" for a, b, y in ROWS))
    single.write_text("sentence\tlabel\n" + "".join(f"{a} {b}\t{y}\n" for a, b, y in ROWS))
    return {"pairs": pairs, "single": single}


def _finetune(train, out, tiny_base) -> None:
    assert main(["finetune", "--train", str(train), "--output", str(out), "--model", str(tiny_base), "--epochs", "1",
                 "--batch-size", "8", "--checkpoint-every", "0", "--no-progress"]) == 0


@pytest.fixture(scope="module")
def models(files, tiny_base, tmp_path_factory):
    """A model fine-tuned on the pair file and one fine-tuned on the single-text file."""
    d = tmp_path_factory.mktemp("pair-models")
    _finetune(files["pairs"], d / "pair", tiny_base)
    _finetune(files["single"], d / "single", tiny_base)
    return {"pair": d / "pair", "single": d / "single"}


def _recorded(model_dir):
    return json.loads((model_dir / "config.json").read_text())["oztune"].get("text_pairs", "absent")


def test_finetune_records_whether_it_trained_on_text_pairs(models):
    assert _recorded(models["pair"]) is True
    assert _recorded(models["single"]) is False


def test_finetune_refuses_an_eval_file_of_the_other_kind_before_training(files, tiny_base, tmp_path, capsys):
    argv = ["--output", str(tmp_path / "m"), "--model", str(tiny_base), "--no-progress"]
    assert main(["finetune", "--train", str(files["pairs"]), "--eval", str(files["single"]), *argv]) == 2
    err = capsys.readouterr().err
    assert f"{files['single']}: single texts, but the model was fine-tuned on text pairs" in err
    assert "--text-pair-column" in err and not (tmp_path / "m").exists()
