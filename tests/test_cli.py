"""The command line end to end on a tiny random model: finetune -> evaluate -> predict, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from oztune.cli import main
from oztune.data.load import Columns, read_labelled
from oztune.train.loop import bf16_supported


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "oztune", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def trained(tiny_base, sentiment_files, tmp_path_factory):
    train, dev = sentiment_files
    out = tmp_path_factory.mktemp("run") / "model"
    code = main(["finetune", "--train", str(train), "--eval", str(dev), "--output", str(out), "--model", str(tiny_base),
                 "--epochs", "4", "--lr", "3e-3", "--batch-size", "16", "--no-progress", "--no-freeze-embeddings"])
    assert code == 0
    return out


def test_finetune_learns_and_saves_a_complete_directory(trained):
    names = {p.name for p in trained.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "run.json", "README.md", "train_log.csv"} <= names
    run = json.loads((trained / "run.json").read_text())
    assert run["metrics"]["accuracy"] >= 0.9  # the synthetic task is decided by one word
    ran = "bf16 autocast" if bf16_supported() else "fp32"  # what --precision auto (the default) ran here
    assert run["precision"] == ran and f"precision {ran} (auto), seed" in (trained / "README.md").read_text()
    cfg = json.loads((trained / "config.json").read_text())
    assert cfg["architectures"] == ["BertForSequenceClassification"]
    assert cfg["id2label"] == {"0": "neg", "1": "pos"} and cfg["problem_type"] == "single_label_classification"
    assert not [p for p in trained.parent.iterdir() if p.name.startswith(".")], "temporary directory left behind"


def test_evaluate_json_in_a_fresh_process(trained, sentiment_files):
    r = run("evaluate", "--model", str(trained), "--data", str(sentiment_files[1]), "--json")
    assert r.returncode == 0, r.stderr
    metrics = json.loads(r.stdout)
    assert metrics["accuracy"] == pytest.approx(json.loads((trained / "run.json").read_text())["metrics"]["accuracy"])
    assert metrics["examples"] == 100
    # and how far its scores can be trusted: the calibration of the same model's probabilities, in this process
    from oztune import Classifier
    from oztune.train.metrics import calibration_metrics

    clf = Classifier.from_pretrained(trained)
    rows = [line.split("\t") for line in sentiment_files[1].read_text().splitlines()[1:]]
    ids = {name: i for i, name in clf.id2label.items()}
    gold = np.array([int(g) if g.isdigit() else ids[g] for _, g in rows])
    want = calibration_metrics(np.asarray(clf.logits([t for t, _ in rows])), gold)
    assert metrics["log_loss"] == pytest.approx(want["log_loss"], rel=1e-4) and metrics["log_loss"] > 0
    assert metrics["ece"] == pytest.approx(want["ece"], abs=1e-4)


def test_evaluate_per_label_and_mistakes_file(trained, sentiment_files, tmp_path):
    from oztune import Classifier

    lines = sentiment_files[1].read_text().splitlines()
    flip = {"0": "1", "1": "0", "neg": "pos", "pos": "neg"}
    for i in range(1, 11):  # ten gold labels flipped: the model gets those wrong
        text, label = lines[i].split("\t")
        lines[i] = f"{text}\t{flip[label]}"
    dev = tmp_path / "noisy.tsv"
    dev.write_text("\n".join(lines) + "\n")
    mistakes = tmp_path / "wrong.jsonl"
    mistakes.write_text("an older file, replaced whole\n")
    r = run("evaluate", "--model", str(trained), "--data", str(dev), "--json", "--per-label", "--mistakes", str(mistakes))
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    clf = Classifier.from_pretrained(trained)
    pred = [p["label"] for p in clf.predict([line.split("\t")[0] for line in dev.read_text().splitlines()[1:]])]
    gold = [line.split("\t")[1] for line in dev.read_text().splitlines()[1:]]
    gold = [clf.id2label[int(g)] if g.isdigit() else g for g in gold]
    cm = m["confusion_matrix"]  # rows gold, columns predicted, in the model's label order (neg, pos)
    assert cm == [[sum(g == a and p == b for g, p in zip(gold, pred)) for b in ("neg", "pos")] for a in ("neg", "pos")]
    assert m["per_label"]["pos"]["support"] == gold.count("pos")
    assert m["per_label"]["pos"]["recall"] == pytest.approx(cm[1][1] / max(1, sum(cm[1])))
    rows = [json.loads(line) for line in mistakes.read_text().splitlines()]
    assert len(rows) == cm[0][1] + cm[1][0] == round((1 - m["accuracy"]) * m["examples"])
    assert len(rows) >= 10  # the flipped labels at least
    for row in rows:  # each names its line in the file, and is a real mistake
        line = dev.read_text().splitlines()[row["line"] - 1].split("\t")
        assert line[0] == row["text"] and row["predicted"] != row["label"] == gold[row["line"] - 2]
    assert [row["score"] for row in rows] == sorted((row["score"] for row in rows), reverse=True)
    table = run("evaluate", "--model", str(trained), "--data", str(dev), "--per-label")
    assert "confusion matrix" in table.stdout and "support" in table.stdout


def test_evaluate_reliability_diagram(trained, sentiment_files, tmp_path, tiny_hf_dir, capsys):
    """--reliability FILE.png: a PNG of the diagram beside the usual output (--json stays one object on standard
    output); refused for a regression model, and for an input file, before anything runs."""
    from oztune.cli import main

    png = tmp_path / "rel.png"
    assert main(["evaluate", "--model", str(trained), "--data", str(sentiment_files[1]), "--json",
                 "--reliability", str(png)]) == 0
    out, err = capsys.readouterr()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "ece" in json.loads(out) and f"reliability diagram written to {png}" in err
    reg, _ = tiny_hf_dir("bert", num_labels=1, problem_type="regression")
    data = tmp_path / "reg.jsonl"
    data.write_text('{"text": "good", "label": 1.0}\n{"text": "bad film", "label": 0.0}\n')
    capsys.readouterr()  # (transformers' save_pretrained draws a progress bar)
    for model, dev, target, words in [
            (reg, data, tmp_path / "r.png", "a reliability diagram (--reliability) is for classification models"),
            (trained, sentiment_files[1], sentiment_files[1], "which would be replaced")]:
        before = target.read_bytes() if target.exists() else None
        assert main(["evaluate", "--model", str(model), "--data", str(dev), "--reliability", str(target)]) == 2
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1, err
        assert (target.read_bytes() if target.exists() else None) == before


def test_predict_texts_and_all_scores(trained):
    r = run("predict", "--model", str(trained), "good movie", "an awful plot", "--all-scores")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [p["label"] for p in rows] == ["pos", "neg"]
    for p in rows:
        assert set(p["scores"]) == {"neg", "pos"} and p["score"] == pytest.approx(max(p["scores"].values()))
        assert sum(p["scores"].values()) == pytest.approx(1.0, abs=1e-5)


def test_predict_input_file_to_output_file(trained, sentiment_files, tmp_path):
    out = tmp_path / "preds.jsonl"
    assert main(["predict", "--model", str(trained), "--input", str(sentiment_files[1]), "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 100 and all(p["label"] in ("neg", "pos") for p in rows)


def test_saved_model_loads_in_transformers_with_same_logits(trained):
    import transformers
    from oztune import Classifier

    clf = Classifier.from_pretrained(trained)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(trained).eval()
    batch = clf.encoder(["good movie", "the plot was very dull and the film was bad"])
    with torch.no_grad():
        torch.testing.assert_close(clf.model(**batch), hf(**batch).logits, atol=1e-5, rtol=1e-5)


def test_python_api_predict(trained):
    from oztune import Classifier

    preds = Classifier.from_pretrained(trained).predict(["great film", "poor film"])
    assert [p["label"] for p in preds] == ["pos", "neg"] and all(0.5 < p["score"] <= 1 for p in preds)


def test_finetune_without_eval_says_its_metrics_are_the_last_epochs(tiny_base, sentiment_files, tmp_path, capsys):
    """Without --eval nothing picks a best epoch (the last one is saved): the closing line said "best: epoch 2"."""
    assert main(["finetune", "--train", str(sentiment_files[0]), "--output", str(tmp_path / "m"), "--model",
                 str(tiny_base), "--epochs", "2", "--max-train-examples", "40", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "train metrics (last: epoch 2): train_loss " in out and "best" not in out, out


def test_config_yaml_supplies_options(tiny_base, sentiment_files, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"train: {sentiment_files[0]}\nmodel: {tiny_base}\nepochs: 1\nmax_train_examples: 40\nprogress: false\n")
    out = tmp_path / "m"
    assert main(["finetune", "--config", str(cfg), "--output", str(out)]) == 0
    assert json.loads((out / "run.json").read_text())["train_examples"] == 40


BAD = [
    (["finetune", "--train", "missing.tsv", "--output", "{tmp}/o"], "missing.tsv: file not found"),
    (["finetune", "--train", "{train}", "--output", "{tmp}/o", "--text-column", "txt"], "no column 'txt'; columns are: sentence, label"),
    (["finetune", "--train", "{train}", "--output", "{tmp}/o", "--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["finetune", "--train", "{train}", "--output", "{tmp}/o", "--model", "{tmp}/plain"], "not a model directory"),
    (["evaluate", "--model", "{trained}", "--data", "{badlabel}"], "label 'maybe' is not one the model knows (neg, pos)"),
    (["evaluate", "--model", "{tmp}", "--data", "{train}"], "not a model directory"),
    (["finetune", "--train", "{ragged}", "--output", "{tmp}/o"], "line 3: expected 2 fields"),
    (["finetune", "--train", "{binary}", "--output", "{tmp}/o"], "not valid UTF-8"),
    (["evaluate", "--model", "{trained}", "--data", "{glue}"], "glue.tsv: line 2: ambiguous quoting: the '\"' here closes on line 3"),
    (["finetune", "--train", "{train}", "--output", "{tmp}/o", "--epochs", "0"], "--epochs must be at least 1"),
    (["finetune", "--train", "{train}", "--output", "{tmp}/o", "--layer-lr-decay", "1.5"], "--layer-lr-decay must be in (0, 1]"),
    (["finetune", "--train", "{train}", "--output", "{tmp}/o", "--pooling", "max"], "--pooling must be cls, mean or last"),
    (["finetune", "--train", "{train}", "--output", "{tmp}/o", "--head-hidden", "0"], "each width must be at least 1"),
    (["finetune", "--train", "{train}", "--output", "{tmp}/o", "--patience", "2"], "--patience works on the --eval metrics"),
    (["finetune", "--train", "{train}", "--output", "{tmp}/o", "--eval-every", "100"], "--eval-every works on the --eval"),
    (["finetune", "--train", "{train}", "--output", "{tmp}/o", "--eval", "{train}", "--eval-every", "-1"],
     "--eval-every must be 0 or more"),
    (["finetune", "--train", "{train}", "--output", "{tmp}/o", "--tensorboard", "{tmp}/o/tb"], "is inside --output"),
    (["finetune", "--train", "{train}", "--output", "{tmp}/o", "--ema-decay", "1"], "--ema-decay must be in [0, 1)"),
    (["finetune", "--train", "{train}", "--output", "{tmp}/o", "--lora-alpha", "8"], "--lora-alpha sets up LoRA updates"),
    (["finetune", "--train", "{train}", "--output", "{tmp}/o", "--lora-rank", "4", "--no-freeze-embeddings"],
     "with --lora-rank only the LoRA updates and the task head train"),
    (["finetune", "--train", "{train}", "--output", "{tmp}/o", "--lora-dropout", "0.1", "--lora-targets", "qkv"],
     "--lora-dropout, --lora-targets set up LoRA updates: give --lora-rank R too"),
    (["finetune", "--train", "{train}", "--output", "{tmp}/o", "--warmup-ratio", "2"], "--warmup-ratio must be in [0, 1)"),
    (["finetune", "--train", "{onelabel}", "--output", "{tmp}/o"], "a classifier needs at least 2 labels"),
    (["finetune", "--train", "{nan}", "--output", "{tmp}/o"], "nan.csv: line 4: label 'nan' is not a number"),
    (["predict", "--model", "{base}", "good"], "not a fine-tuned classifier"),
    (["predict", "--model", "{trained}", "good", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["evaluate", "--model", "{trained}", "--data", "{train}", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["predict", "--model", "{trained}", "good", "--output", "{tmp}"], "is a directory; give a file name"),
    (["predict", "--model", "{trained}", "good", "--output", "{tmp}/none/p.jsonl"], "does not exist"),
    (["predict", "--model", "{trained}", "extra", "--input", "{pairs}"], "holds text pairs: texts given as arguments"),
    (["predict", "--model", "{corrupt}", "good"], "model.safetensors: cannot be read as safetensors"),
]


@pytest.mark.parametrize("argv,message", BAD)
def test_bad_input_gives_one_line_and_exit_2(argv, message, trained, tiny_base, sentiment_files, tmp_path):
    (tmp_path / "bad.tsv").write_text("sentence\tlabel\ngood\tpos\nfine film\tmaybe\n")
    (tmp_path / "ragged.tsv").write_text("sentence\tlabel\ngood\tpos\nbad\tneg\textra\n")
    (tmp_path / "bin.tsv").write_bytes(b"sentence\tlabel\ngood\tpos\n\xff\xfe bad\tneg\n")
    (tmp_path / "one.tsv").write_text("sentence\tlabel\ngood\tpos\nfine\tpos\n")
    (tmp_path / "nan.csv").write_text("text,score\ngood,0.9\nbad,0.1\nmeh,nan\n")
    (tmp_path / "pairs.tsv").write_text("sentence1\tsentence2\na\tb\nc\td\n")
    (tmp_path / "glue.tsv").write_text('sentence\tlabel\n"opens\tpos\ncloses"\tneg\n')  # 1 row quoted, 2 not
    (tmp_path / "plain").mkdir()  # a directory, not a model
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for f in trained.iterdir():
        (corrupt / f.name).write_bytes(f.read_bytes()[:100] if f.name == "model.safetensors" else f.read_bytes())
    fill = {"tmp": str(tmp_path), "train": str(sentiment_files[0]), "trained": str(trained),
            "badlabel": str(tmp_path / "bad.tsv"), "ragged": str(tmp_path / "ragged.tsv"), "binary": str(tmp_path / "bin.tsv"),
            "onelabel": str(tmp_path / "one.tsv"), "nan": str(tmp_path / "nan.csv"), "pairs": str(tmp_path / "pairs.tsv"),
            "glue": str(tmp_path / "glue.tsv"),
            "base": str(tiny_base), "corrupt": str(corrupt)}
    r = run(*[a.format(**fill) for a in argv])
    assert r.returncode == 2, r.stderr
    assert message in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_yaml_values_are_read_as_the_options_types(tmp_path):
    from oztune.cli import _read_yaml
    from oztune.errors import OztuneError
    from oztune.train.finetune import FinetuneArgs

    cfg = tmp_path / "c.yaml"
    cfg.write_text('lr: 5e-5\nepochs: "2"\nhead_hidden: 64\nlabel_names: negative,positive\nprogress: false\n')
    assert _read_yaml(str(cfg), FinetuneArgs) == {"lr": 5e-5, "epochs": 2, "head_hidden": [64],
                                                 "label_names": ["negative", "positive"], "progress": False}
    for text, message in [("epochs: three", "epochs: expected an integer, got 'three'"),
                          ("lr: fast", "lr: expected a number"), ("progress: 1", "progress: expected true or false"),
                          ("epochs: 2.5", "epochs: expected an integer")]:
        cfg.write_text(text + "\n")
        with pytest.raises(OztuneError, match=message):
            _read_yaml(str(cfg), FinetuneArgs)


def test_the_training_max_length_is_the_reloaded_models(tiny_base, sentiment_files, tmp_path):
    train, dev = sentiment_files
    long_dev = tmp_path / "long.tsv"  # texts longer than 8 tokens: truncation changes what the model sees
    long_dev.write_text("sentence\tlabel\n" + "".join(f"{line.split(chr(9))[0]} and so on and on and on\t"
                                                        f"{line.split(chr(9))[1]}" for line in dev.read_text().splitlines(True)[1:]))
    out = tmp_path / "m"
    assert main(["finetune", "--train", str(train), "--eval", str(long_dev), "--output", str(out), "--model",
                 str(tiny_base), "--epochs", "1", "--max-length", "8", "--no-progress"]) == 0
    from oztune import Classifier

    clf = Classifier.from_pretrained(out)
    assert clf.encoder.max_length == 8
    tok = json.loads((out / "tokenizer.json").read_text())
    assert tok["truncation"]["max_length"] == 8 and tok["padding"] is None
    recorded = json.loads((out / "run.json").read_text())["metrics"]["accuracy"]
    assert clf.evaluate(str(long_dev))["accuracy"] == pytest.approx(recorded)


def _finetune_on_three_labels(model, tmp_path):
    """finetune ``model`` on a file of three labels (neg, mid, pos) into tmp_path / "m3": the finished process."""
    three = tmp_path / "three.tsv"
    three.write_text("sentence\tlabel\n" + "".join(f"{w} film\t{lab}\n" for w, lab in
                                                    [("good", "pos"), ("bad", "neg"), ("ok", "mid")] * 10))
    r = run("finetune", "--model", str(model), "--train", str(three), "--output", str(tmp_path / "m3"),
            "--epochs", "1", "--no-progress")
    assert r.returncode == 0, r.stderr
    return r


def test_finetuning_a_finetuned_model_on_other_labels_gets_a_new_head(trained, tmp_path):
    r = _finetune_on_three_labels(trained, tmp_path)
    assert "its task head is replaced by a new one" in r.stdout
    from oztune import Classifier

    assert set(Classifier.from_pretrained(tmp_path / "m3").id2label.values()) == {"neg", "mid", "pos"}
    with pytest.raises(ValueError, match="3 texts but 1 text_pairs"):
        Classifier.from_pretrained(trained).predict(["a", "b", "c"], ["x"])


def test_a_finetuned_model_whose_config_names_no_labels_has_transformers_default_names(trained, tmp_path):
    # transformers 5 leaves default label names (LABEL_0, ...) out of config.json; it reads them back as those
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(trained, bare)
    cfg = json.loads((bare / "config.json").read_text())
    cfg.pop("id2label"), cfg.pop("label2id")
    (bare / "config.json").write_text(json.dumps(cfg))
    r = _finetune_on_three_labels(bare, tmp_path)
    assert "was fine-tuned for other labels (LABEL_0, LABEL_1); its task head is replaced" in r.stdout


def test_model_directory_without_weights(trained, tmp_path):
    d = tmp_path / "noweights"
    d.mkdir()
    (d / "config.json").write_text((trained / "config.json").read_text())
    r = run("predict", "--model", str(d), "good")
    assert r.returncode == 2 and "no weights (expected model.safetensors" in r.stderr


def test_label_names_show_in_predictions_and_integer_gold_still_evaluates(tiny_base, sentiment_files, tmp_path):
    lines = sentiment_files[0].read_text().replace("\tpos\n", "\t1\n").replace("\tneg\n", "\t0\n")
    train = tmp_path / "ids.tsv"
    train.write_text(lines)
    out = tmp_path / "m"
    assert main(["finetune", "--train", str(train), "--output", str(out), "--model", str(tiny_base), "--epochs", "3",
                 "--lr", "3e-3", "--batch-size", "16", "--no-progress", "--no-freeze-embeddings",
                 "--label-names", "negative,positive"]) == 0
    from oztune import Classifier

    clf = Classifier.from_pretrained(out)
    assert [p["label"] for p in clf.predict(["good movie", "awful plot"])] == ["positive", "negative"]
    assert clf.evaluate(str(train))["accuracy"] > 0.9  # gold labels 0/1 map to the named classes
    # and so in the compression commands, which read the same files (quantize here; distill, prune and
    # compress share load_task_data)
    assert main(["quantize", "--model", str(out), "--output", str(tmp_path / "q"), "--eval", str(train)]) == 0
    q = json.loads((tmp_path / "q" / "run.json").read_text())
    assert q["metrics"]["accuracy"] > 0.9
    r = run("finetune", "--train", str(train), "--output", str(tmp_path / "x"), "--model", str(tiny_base),
            "--label-names", "a")  # names for class 0 only, but the file holds 1s
    assert r.returncode == 2 and "--label-names names the class ids 0..0; " in r.stderr


@pytest.mark.parametrize("command", ["finetune", "distill", "prune", "compress"])
def test_shared_recipe_options_have_help_and_come_after_the_commands_own(command, capsys):
    import oztune.commands  # noqa: F401  (registers the commands)
    from oztune.cli import COMMANDS, _arg_help, _fields_in_help_order

    cls = COMMANDS[command][0]
    helps = _arg_help(cls)
    names = [f.name for f in _fields_in_help_order(cls)]
    for shared in ("text_column", "label_column", "seed", "precision", "max_length"):
        assert helps.get(shared), f"{command} --{shared} has no help"
        assert names.index(shared) > names.index("train")
    assert all(helps.get(n) for n in names), [n for n in names if not helps.get(n)]
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert "--text-pair-column" in capsys.readouterr().out


def test_help_shows_each_options_default(capsys):
    with pytest.raises(SystemExit):
        main(["compress", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "(default: 40000)" in text and "(default: 0.5,0.33)" in text and "--prune-vocab" in text
    assert "keep only the embeddings of tokens in the training file" in text and "(default: on)" in text
    assert "(default: None)" not in text
    assert "--fastest {throughput,latency}" in text and "--precision {auto,bf16,fp32}" in text  # the choices shown


def test_python_m_oztune_cli_has_the_commands():
    """`python -m oztune.cli` (the module named in the console script) runs the same command line as `oztune`: it
    listed no commands ("invalid choice: 'evaluate' (choose from )"), since they register in oztune.cli, and run
    as a script the module is __main__, another module."""
    r = subprocess.run([sys.executable, "-m", "oztune.cli", "evaluate", "--help"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "--per-label" in r.stdout, r.stderr


_MODULES_AFTER = """
import sys
from oztune.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(sorted(m for m in ("torch", "numpy", "tokenizers", "safetensors") if m in sys.modules))
"""


@pytest.mark.parametrize("argv", [["--help"], ["finetune", "--help"], ["compress", "--help"], ["serve", "--help"],
                                  ["predict", "--no-such-option"], ["quantize", "--weight-bits", "eight"],
                                  ["--version"]])
def test_help_and_a_bad_option_are_answered_without_importing_torch(argv):
    """`oztune --help`, `oztune finetune --help` and a mistyped option took ~3 s: the commands' option dataclasses
    lived in modules that import torch. They are answered from torch-free modules now (~0.2 s)."""
    r = subprocess.run([sys.executable, "-c", _MODULES_AFTER, *argv], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1] == "[]", (r.stdout[-300:], r.stderr[-1000:])
    if argv == ["--version"]:  # (the installed package's version, and torch's, read without importing it)
        from importlib import metadata

        assert r.stdout.startswith(f"oztune {metadata.version('oztune')} (torch {metadata.version('torch')})\n")
    else:
        assert ("usage: oztune" in r.stdout) if "--help" in argv else ("error:" in r.stderr), r.stderr


def test_oztune_alone_lists_the_commands(capsys):
    """`oztune` with no command said only "the following arguments are required: COMMAND": now the help, which lists
    the commands, on standard error, and the usage error's exit code."""
    from oztune.cli import COMMANDS

    assert main([]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("usage: oztune") and all(f"    {name} " in err for name in COMMANDS), err


def test_every_command_imports_what_it_runs_on_before_it_runs():
    """What a command runs on is imported by main() before the command, with a stop held meanwhile: every
    command names modules to import (torch comes with them), and each of them exists."""
    import importlib

    from oztune import commands  # noqa: F401  (registers the commands)
    from oztune.cli import COMMANDS, NEEDS

    assert set(NEEDS) == set(COMMANDS)
    for name, needs in NEEDS.items():
        assert needs, name
        for module in needs:
            importlib.import_module(module)
    r = subprocess.run([sys.executable, "-c", "import sys, importlib; from oztune.cli import NEEDS, make_parser; "
                        "make_parser(); [importlib.import_module(m) for m in NEEDS['predict']]; "
                        "print('torch' in sys.modules)"], capture_output=True, text=True, timeout=300)
    assert r.stdout.strip() == "True", r.stderr


def test_predict_into_a_pipe_closed_early_is_no_traceback(trained, tmp_path):
    texts = tmp_path / "many.txt"
    # ~1 MB of output, more than a pipe holds, written in three chunks (oztune.commands.PREDICT_CHUNK): the
    # writes after the reader has gone fail (on some kernels a pipe takes a whole first write, gone reader or not)
    texts.write_text("a good film with a fine plot\n" * 9000)
    p = subprocess.Popen([sys.executable, "-m", "oztune", "predict", "--model", str(trained), "--input", "-",
                          "--all-scores"], stdin=texts.open(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout.readline().startswith(b'{"label"')
    p.stdout.close()  # as `| head -1` does
    err = p.stderr.read().decode()
    assert p.wait(timeout=300) == 141 and "Traceback" not in err and "Broken pipe" not in err


def test_predict_answers_a_chunk_at_a_time_the_same_as_all_at_once(trained, sentiment_files, tmp_path, capsys,
                                                                    monkeypatch):
    import oztune.commands as commands
    from oztune import Classifier

    dev = str(sentiment_files[1])
    texts = [e.text for e in read_labelled(dev, Columns())]
    expected = [p["label"] for p in Classifier.from_pretrained(trained).predict(texts)]
    calls = []
    real = Classifier.predict
    monkeypatch.setattr(Classifier, "predict", lambda self, t, *a, **k: calls.append(len(t)) or real(self, t, *a, **k))
    monkeypatch.setattr(commands, "PREDICT_CHUNK", 7)
    assert main(["predict", "--model", str(trained), "--input", dev]) == 0
    shown = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert main(["predict", "--model", str(trained), "--input", dev, "--output", str(tmp_path / "p.jsonl")]) == 0
    written = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [p["label"] for p in shown] == [p["label"] for p in written] == expected
    assert calls == [7] * 14 + [2] + [7] * 14 + [2]  # 100 texts, each a chunk's worth at a time


# Every command with --max-train-examples, with what it needs besides ({model}: a fine-tuned model).
SAMPLING = {
    "finetune": ["--train", "{train}", "--output", "{tmp}/o", "--model", "{base}"],
    "quantize": ["--model", "{model}", "--output", "{tmp}/o", "--qat-train", "{train}"],
    "prune": ["--model", "{model}", "--train", "{train}", "--eval", "{dev}", "--output", "{tmp}/o"],
    "distill": ["--teacher", "{model}", "--train", "{train}", "--eval", "{dev}", "--output", "{tmp}/o",
                "--student-layers", "1"],
    "compress": ["--model", "{model}", "--train", "{train}", "--eval", "{dev}", "--output", "{tmp}/o",
                 "--recipes", "int8"],
}


@pytest.mark.parametrize("count", ["0", "-3"])
@pytest.mark.parametrize("command", list(SAMPLING))
def test_every_command_refuses_a_max_train_examples_below_1_alike(command, count, trained, tiny_base, sentiment_files,
                                                                  tmp_path, capsys):
    """compress took --max-train-examples 0 as 'every example' while finetune, quantize, prune and distill
    refused it: each now refuses 0 and negatives through the one check, with the one message, before any work."""
    fill = {"tmp": str(tmp_path), "train": str(sentiment_files[0]), "dev": str(sentiment_files[1]),
            "model": str(trained), "base": str(tiny_base)}
    argv = [command, *(a.format(**fill) for a in SAMPLING[command]), "--max-train-examples", count, "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"oztune {command}: error: --max-train-examples must be at least 1, not {count}", err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("prefix, argv", [("--mod", ["evaluate", "--mod", "m", "--data", "d.tsv"]),
                                          ("--out", ["predict", "--model", "m", "--out", "p.jsonl", "good movie"]),
                                          ("--epoch", ["finetune", "--train", "t.tsv", "--output", "o", "--epoch", "2"])])
def test_a_prefix_of_an_option_is_refused_not_taken_for_the_option(prefix, argv, capsys):
    """argparse's allow_abbrev took `--out` for `--output` (and would take it for another option added later)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"oztune {argv[0]}: error: unrecognized arguments: {prefix}" in err  # (the command named, as other errors)
    assert err.startswith(f"usage: oztune {argv[0]} ")  # the command's usage, not the list of commands


def test_with_no_progress_a_commands_output_starts_with_its_result(tiny_finetuned, tmp_path, capsys):
    """The blank line that sets a result apart from the progress bars came first with --no-progress too."""
    args = ["quantize", "--model", str(tiny_finetuned), "--no-progress"]
    assert main([*args, "--output", str(tmp_path / "q")]) == 0
    assert capsys.readouterr().out.startswith(f"quantized {tiny_finetuned} ")
    assert main([*args[:-1], "--output", str(tmp_path / "q2")]) == 0
    assert capsys.readouterr().out.startswith(f"\nquantized {tiny_finetuned} ")
