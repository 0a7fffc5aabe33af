"""A model fine-tuned on text pairs is refused single texts, and one fine-tuned on single texts is refused pairs
(predict, evaluate, the Python API): its scores of the other kind mean nothing. The saved model records which it
was trained on, and every command that writes a model from another keeps the record; a model saved before oztune
recorded it scores both, as it always did. The server's 422: tests/serve/test_server.py."""

from __future__ import annotations

import json
import shutil

import pytest

from oztune import Classifier
from oztune.cli import main
from oztune.errors import DataError

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


def _card_usage(model_dir) -> str:
    """The README.md's ``oztune predict`` line (and Python call, where the card has one)."""
    return "\n".join(line for line in (model_dir / "README.md").read_text().splitlines()
                     if line.startswith(("oztune predict", "oztune.Classifier")))


def test_the_model_card_shows_how_to_predict_the_kind_the_model_takes(models):
    usage = _card_usage(models["pair"])  # (a text as an argument, or predict of one text: refused)
    assert "--input" in usage and '"a charming' not in usage and '.predict(["a man is playing a guitar"], [' in usage
    assert '"a charming and often affecting journey"' in _card_usage(models["single"])


def test_finetune_refuses_an_eval_file_of_the_other_kind_before_training(files, tiny_base, tmp_path, capsys):
    argv = ["--output", str(tmp_path / "m"), "--model", str(tiny_base), "--no-progress"]
    assert main(["finetune", "--train", str(files["pairs"]), "--eval", str(files["single"]), *argv]) == 2
    err = capsys.readouterr().err
    assert f"{files['single']}: single texts, but the model was fine-tuned on text pairs" in err
    assert "--text-pair-column" in err and not (tmp_path / "m").exists()


@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_cli_refuses_a_file_of_the_other_kind_naming_it(command, models, files, capsys):
    option = "--input" if command == "predict" else "--data"
    assert main([command, "--model", str(models["pair"]), option, str(files["single"])]) == 2
    err = capsys.readouterr().err
    assert f"{files['single']}: single texts, but the model was fine-tuned on text pairs" in err
    assert "--text-pair-column" in err and len(err.strip().splitlines()) == 1
    assert main([command, "--model", str(models["single"]), option, str(files["pairs"])]) == 2
    err = capsys.readouterr().err
    assert f"{files['pairs']}: text pairs, but the model was fine-tuned on single texts" in err
    assert "--text-column" in err and len(err.strip().splitlines()) == 1


def test_predict_refuses_texts_given_as_arguments_to_a_pair_model(models, capsys):
    assert main(["predict", "--model", str(models["pair"]), "the good movie"]) == 2
    err = capsys.readouterr().err
    assert "the texts given as arguments" in err and "fine-tuned on text pairs" in err and "--input" in err


def test_cli_scores_files_of_the_model_s_own_kind(models, files, capsys):
    for kind in ("pair", "single"):
        data = str(files["pairs" if kind == "pair" else "single"])
        assert main(["predict", "--model", str(models[kind]), "--input", data]) == 0
        assert main(["evaluate", "--model", str(models[kind]), "--data", data, "--json"]) == 0
    assert main(["predict", "--model", str(models["single"]), "the good movie"]) == 0
    capsys.readouterr()


def test_api_refuses_the_other_kind(models, files):
    pair, single = Classifier.from_pretrained(models["pair"]), Classifier.from_pretrained(models["single"])
    for call in (pair.predict, pair.logits):
        with pytest.raises(DataError, match="texts: single texts, but the model was fine-tuned on text pairs.*"
                                            "give text_pairs"):
            call(["the good movie"])
    for call in (single.predict, single.logits):
        with pytest.raises(DataError, match="texts: text pairs, but the model was fine-tuned on single texts.*"
                                            "leave text_pairs out"):
            call(["the good movie"], ["it is good"])
    with pytest.raises(DataError, match="single texts, but the model was fine-tuned on text pairs"):
        pair.evaluate(str(files["single"]))
    with pytest.raises(DataError, match="text pairs, but the model was fine-tuned on single texts"):
        single.evaluate(str(files["pairs"]))
    assert len(pair.predict(["the good movie"], ["it is good"])) == 1 and len(single.predict(["a fine film"])) == 1


def test_api_refuses_the_other_kind_with_no_texts_too(models):
    """predict([]) checks the kind as logits([]) does: a caller who forgot text_pairs learns it on the first call,
    not on the first call that happens to hold texts."""
    pair, single = Classifier.from_pretrained(models["pair"]), Classifier.from_pretrained(models["single"])
    for call in (pair.predict, pair.logits):
        with pytest.raises(DataError, match="single texts, but the model was fine-tuned on text pairs"):
            call([])
    with pytest.raises(DataError, match="text pairs, but the model was fine-tuned on single texts"):
        single.predict([], [])
    assert pair.predict([], []) == [] and single.predict([]) == []


def test_a_model_saved_without_the_record_scores_both_kinds(models, files, tmp_path, capsys):
    old = tmp_path / "old"
    shutil.copytree(models["pair"], old)
    config = json.loads((old / "config.json").read_text())
    del config["oztune"]["text_pairs"]  # as oztune wrote it before it recorded this
    (old / "config.json").write_text(json.dumps(config))
    clf = Classifier.from_pretrained(old)
    assert len(clf.predict(["the good movie"])) == len(clf.predict(["the good movie"], ["it is good"])) == 1
    for data in (files["pairs"], files["single"]):
        assert clf.evaluate(str(data))["examples"] == len(ROWS)
        assert main(["predict", "--model", str(old), "--input", str(data)]) == 0
    assert main(["predict", "--model", str(old), "the good movie"]) == 0
    capsys.readouterr()


def test_a_record_that_is_not_true_false_or_null_is_refused_naming_the_field(models, files, tmp_path, capsys):
    edited = tmp_path / "edited"
    shutil.copytree(models["pair"], edited)
    config = json.loads((edited / "config.json").read_text())
    config["oztune"]["text_pairs"] = "true"  # a hand edit: a string, which compared as "not pairs"
    (edited / "config.json").write_text(json.dumps(config))
    assert main(["evaluate", "--model", str(edited), "--data", str(files["pairs"])]) == 2
    assert "oztune.text_pairs is 'true'; expected true, false or null" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["quantize"],
    ["prune", "--train", "{pairs}", "--eval", "{pairs}", "--sparsity", "0.5", "--epochs", "1"],
    ["distill", "--train", "{pairs}", "--eval", "{pairs}", "--student-layers", "1", "--epochs", "1"],
    ["compress", "--train", "{pairs}", "--eval", "{pairs}", "--recipes", "int8", "--max-drop", "100"],
], ids=lambda argv: argv[0])
def test_a_model_made_from_a_pair_model_is_a_pair_model(argv, models, files, tmp_path, capsys):
    source = "--teacher" if argv[0] == "distill" else "--model"
    out = tmp_path / "out"
    argv = [a.format(pairs=files["pairs"]) for a in argv]
    assert main([*argv, source, str(models["pair"]), "--output", str(out), "--no-progress"]) == 0
    assert _recorded(out) is True
    with pytest.raises(DataError, match="fine-tuned on text pairs"):
        Classifier.from_pretrained(out).predict(["the good movie"])
    assert "--input" in _card_usage(out) and '"a charming' not in _card_usage(out)  # (compress: its own card too)
    capsys.readouterr()


def _unrecorded(model_dir, out):
    """A copy of ``model_dir`` as oztune saved it before it recorded text_pairs."""
    shutil.copytree(model_dir, out)
    config = json.loads((out / "config.json").read_text())
    del config["oztune"]["text_pairs"]
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("recipe", [["distill", "--student-layers", "1"], ["prune", "--sparsity", "0.5"]],
                         ids=lambda argv: argv[0])
def test_a_recipe_on_a_model_without_the_record_goes_by_its_train_file(recipe, models, files, tmp_path, capsys):
    """As finetune: the eval file must be of the train file's kind, and the model trained on it records that kind."""
    old = _unrecorded(models["pair"], tmp_path / "old")
    source = ["--teacher" if recipe[0] == "distill" else "--model", str(old)]
    argv = [*recipe, *source, "--train", str(files["pairs"]), "--epochs", "1", "--no-progress"]
    assert main([*argv, "--eval", str(files["single"]), "--output", str(tmp_path / "mixed")]) == 2
    assert f"{files['single']}: single texts, but the model was fine-tuned on text pairs" in capsys.readouterr().err
    assert main([*argv, "--eval", str(files["pairs"]), "--output", str(tmp_path / "out")]) == 0
    assert _recorded(tmp_path / "out") is True
    capsys.readouterr()


@pytest.mark.parametrize("train, other", [("pairs", "single"), ("single", "pairs")])
def test_quantize_on_a_model_without_the_record_checks_eval_against_qat_train(train, other, models, files, tmp_path,
                                                                               capsys):
    """As the other recipes' train and eval files: --eval must be of --qat-train's kind (the model is fine-tuned on
    it), else quantize would report the int8 model's scores of texts of another kind than it was fine-tuned on."""
    old = _unrecorded(models["pair" if train == "pairs" else "single"], tmp_path / "old")
    assert main(["quantize", "--model", str(old), "--qat-train", str(files[train]), "--eval", str(files[other]),
                 "--output", str(tmp_path / "mixed"), "--no-progress"]) == 2
    given, trained = ("single texts", "text pairs") if train == "pairs" else ("text pairs", "single texts")
    err = capsys.readouterr().err
    assert f"{files[other]}: {given}, but the model was fine-tuned on {trained}" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "mixed").exists()


@pytest.mark.parametrize("train", ["pairs", "single"])
def test_quantization_aware_fine_tuning_of_a_model_without_the_record_records_its_train_file_s_kind(
        train, models, files, tmp_path, capsys):
    """As finetune, distill and prune: the model now fine-tuned on --qat-train's kind records it (and refuses the
    other kind), and its card shows how to predict that kind."""
    old = _unrecorded(models["pair" if train == "pairs" else "single"], tmp_path / "old")
    out = tmp_path / "out"
    assert main(["quantize", "--model", str(old), "--qat-train", str(files[train]), "--eval", str(files[train]),
                 "--output", str(out), "--no-progress"]) == 0
    assert _recorded(out) is (train == "pairs")
    other = "single" if train == "pairs" else "pairs"
    assert main(["evaluate", "--model", str(out), "--data", str(files[other])]) == 2
    assert "but the model was fine-tuned on" in capsys.readouterr().err
    assert ("--input" in _card_usage(out)) is (train == "pairs")


def test_post_training_quantization_of_a_model_without_the_record_leaves_it_unrecorded(models, files, tmp_path,
                                                                                        capsys):
    """Without --qat-train nothing is learnt about the input: --eval's kind is not taken for the model's (it may be
    either), so the int8 model scores both kinds, as its source does."""
    old = _unrecorded(models["pair"], tmp_path / "old")
    out = tmp_path / "out"
    assert main(["quantize", "--model", str(old), "--eval", str(files["single"]), "--output", str(out),
                 "--no-progress"]) == 0
    assert _recorded(out) is None
    for data in (files["pairs"], files["single"]):
        assert main(["evaluate", "--model", str(out), "--data", str(data)]) == 0
    capsys.readouterr()


def test_recipes_refuse_data_of_the_other_kind(models, files, tmp_path, capsys):
    assert main(["prune", "--model", str(models["pair"]), "--train", str(files["single"]), "--eval", str(files["pairs"]),
                 "--output", str(tmp_path / "o"), "--no-progress"]) == 2
    assert f"{files['single']}: single texts, but the model was fine-tuned on text pairs" in capsys.readouterr().err
    assert main(["quantize", "--model", str(models["single"]), "--eval", str(files["pairs"]),
                 "--output", str(tmp_path / "o"), "--no-progress"]) == 2
    assert f"{files['pairs']}: text pairs, but the model was fine-tuned on single texts" in capsys.readouterr().err


def test_an_onnx_export_of_a_pair_model_is_a_pair_model(models, files, tmp_path, capsys):
    out = tmp_path / "onnx"
    assert main(["export", "--model", str(models["pair"]), "--output", str(out)]) == 0
    assert _recorded(out) is True
    assert main(["evaluate", "--model", str(out), "--data", str(files["single"])]) == 2
    assert "single texts, but the model was fine-tuned on text pairs" in capsys.readouterr().err
    assert main(["evaluate", "--model", str(out), "--data", str(files["pairs"])]) == 0
