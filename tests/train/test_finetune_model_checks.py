"""finetune on an already fine-tuned model: the labels it reads, and the models it refuses before any work."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import synthetic_sentiment, write_tsv
from oztune.cli import main


def _args(model, train, out, *extra) -> list[str]:
    return ["finetune", "--model", str(model), "--train", str(train), "--output", str(out), "--epochs", "1",
            "--batch-size", "8", "--max-train-examples", "16", "--checkpoint-every", "0", "--precision", "fp32",
            *extra]


def test_integer_labels_on_a_model_with_label_names_are_its_class_ids(one_thread, tiny_finetuned, tmp_path,
                                                                       capsys, monkeypatch):
    """SST-2's 0/1 on a model fine-tuned for names (here neg/pos) replaced its head by a new one, trained from
    scratch, and the saved model named its labels 0 and 1; evaluate, distill and prune read such a file as
    the model's class ids (README), and so does finetune now: the head and the names are kept."""
    from oztune.models.hub import load_classifier
    from oztune.train import finetune as ft

    ids = write_tsv(tmp_path / "ids.tsv", [(t, {"neg": "0", "pos": "1"}[lab]) for t, lab in synthetic_sentiment(32, 5)])
    heads = []
    real_fit = ft.fit

    def fit(model, *a, **kw):  # the head as training starts
        heads.append({k: v.clone() for k, v in model.head.state_dict().items()})
        return real_fit(model, *a, **kw)

    monkeypatch.setattr(ft, "fit", fit)
    assert main(_args(tiny_finetuned, ids, tmp_path / "m")) == 0
    out = capsys.readouterr().out
    assert "replaced" not in out and "(single_label, 2 outputs)" in out
    before = load_classifier(tiny_finetuned)[0].head.state_dict()
    assert heads[0].keys() == before.keys() and all(torch.equal(heads[0][k], before[k]) for k in before)
    assert json.loads((tmp_path / "m" / "config.json").read_text())["id2label"] == {"0": "neg", "1": "pos"}


@pytest.mark.parametrize("eval_labels", ["names", "ids"])
def test_the_eval_file_is_read_as_evaluate_reads_it(one_thread, tiny_finetuned, tmp_path, eval_labels):
    """The head kept for SST-2-like 0/1 training labels: --eval was read as class ids only, so an eval file
    labelled with the model's names (neg/pos), which `oztune evaluate` reads by name, was refused as labels the
    model does not know. finetune now reads --eval as evaluate does (by name, or as class ids)."""
    rows = synthetic_sentiment(32, 5)
    ids = write_tsv(tmp_path / "ids.tsv", [(t, {"neg": "0", "pos": "1"}[lab]) for t, lab in rows])
    dev = write_tsv(tmp_path / "dev.tsv", [(t, lab if eval_labels == "names" else {"neg": "0", "pos": "1"}[lab])
                                           for t, lab in synthetic_sentiment(20, 6)])
    assert main(_args(tiny_finetuned, ids, tmp_path / "m", "--eval", str(dev), "--no-progress")) == 0
    run = json.loads((tmp_path / "m" / "run.json").read_text())
    assert run["eval_examples"] == 20 and 0 <= run["metrics"]["accuracy"] <= 1


def test_integers_beyond_the_models_class_ids_are_other_labels(one_thread, tiny_finetuned, tmp_path, capsys):
    three = write_tsv(tmp_path / "three.tsv", [(t, str(i % 3)) for i, (t, _) in enumerate(synthetic_sentiment(30, 5))])
    assert main(_args(tiny_finetuned, three, tmp_path / "m", "--no-progress")) == 0
    assert "its task head is replaced by a new one" in capsys.readouterr().out
    assert json.loads((tmp_path / "m" / "config.json").read_text())["id2label"] == {"0": "0", "1": "1", "2": "2"}


@pytest.fixture(scope="module")
def int8_model(one_thread, tiny_finetuned, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "int8"
    assert main(["quantize", "--model", str(tiny_finetuned), "--output", str(out)]) == 0
    return out


def test_an_int8_model_is_refused_before_any_work(int8_model, sentiment_files, tmp_path, capsys):
    """finetune loaded an int8 model, printed that its head was replaced and how many parameters would train,
    and only then failed inside the training loop: it is refused from its config.json, before anything."""
    capsys.readouterr()
    assert main(_args(int8_model, sentiment_files[0], tmp_path / "m")) == 2
    out, err = capsys.readouterr()
    assert out == "" and not (tmp_path / "m").exists()
    assert err.count("\n") == 1 and "an int8 model (from oztune quantize), whose weights do not train" in err
    assert "fine-tune the fp32 model it was quantized from" in err and "--qat-train" in err


def test_a_max_length_beyond_the_position_table_is_refused_before_any_work(tiny_base, sentiment_files, tmp_path,
                                                                            capsys):
    """--max-length 1000 on a model of 512 positions was cut to 512 without a word (config.json recorded 512):
    it is refused, as other out-of-range values are; up to the window is taken, and the default is cut to it."""
    capsys.readouterr()
    assert main(_args(tiny_base, sentiment_files[0], tmp_path / "m", "--max-length", "65")) == 2
    out, err = capsys.readouterr()
    assert out == "" and not (tmp_path / "m").exists()
    assert err == ("oztune finetune: error: --max-length 65: the model reads at most 64 tokens (its position "
                   "table); give at most 64\n")
    for given, saved in ((["--max-length", "64"], 64), ([], 64)):  # the default, 128, is cut to the window
        assert main(_args(tiny_base, sentiment_files[0], tmp_path / f"m{saved}{len(given)}", "--no-progress", *given)) == 0
        assert json.loads((tmp_path / f"m{saved}{len(given)}" / "config.json").read_text())["oztune"]["max_length"] == saved


def test_label_names_with_an_eval_file_labelled_by_those_names(tiny_base, tmp_path):
    """Training labels 0/1 named by --label-names neg,pos and an --eval file labelled neg/pos: the eval file is
    read as evaluate reads it (the names), not with the training file's map (an "unknown label" refusal)."""
    rows = synthetic_sentiment(40, 1)
    train = write_tsv(tmp_path / "t.tsv", [(t, "1" if lab == "pos" else "0") for t, lab in rows])
    dev = write_tsv(tmp_path / "d.tsv", synthetic_sentiment(20, 2))
    assert main(["finetune", "--train", str(train), "--eval", str(dev), "--output", str(tmp_path / "m"),
                 "--model", str(tiny_base), "--epochs", "1", "--batch-size", "16", "--no-progress",
                 "--label-names", "neg,pos"]) == 0
