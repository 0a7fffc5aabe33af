"""Configuration handling end to end: the shipped configs/, --config precedence, bad config files, run.json.

Everything but the two tiny fine-tuning runs works on the argument objects the CLI builds (no training).
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
from pathlib import Path

import pytest

from oztune.cli import COMMANDS, _read_yaml, build_args, main, make_parser
from oztune.train.finetune import FULL_LR, TRAIN_MAX_LENGTH, FinetuneArgs, check_args

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def cli_args(argv: list[str]):
    """The argument object ``oztune ARGV`` would run with (parse + --config + precedence, no run)."""
    parser = make_parser()
    ns = parser.parse_args(argv)
    return build_args(COMMANDS[ns.command][0], ns, parser)


# --- 1. the shipped configs ---------------------------------------------------------------------------------------

def test_there_are_shipped_configs():
    assert len(CONFIGS) >= 10


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_parses_and_validates(path, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # their data/sst2/... paths are relative to the repository root, where they are run
    a = cli_args(["finetune", "--config", str(path.relative_to(REPO)), "--output", str(tmp_path / "o")])
    assert isinstance(a, FinetuneArgs) and a.output == str(tmp_path / "o")
    assert Path(a.train).is_file() and (a.eval is None or Path(a.eval).is_file())
    check_args(dataclasses.replace(a, lr=a.lr or FULL_LR))  # every value in range, the output writable
    assert not (tmp_path / "o").exists()
    text = path.read_text()
    # the command line in its comments runs this very file; configs it names exist
    commands = re.findall(r"oztune finetune --config (\S+)", text)
    assert commands and all(c == f"configs/{path.name}" for c in commands), commands
    for other in re.findall(r"configs/[\w.-]+\.yaml", text):
        assert (REPO / other).is_file(), other


def test_sst2_config_is_the_readme_main_command(tmp_path, monkeypatch):
    """configs/sst2.yaml says it is the README's main command: the same effective arguments."""
    monkeypatch.chdir(REPO)
    readme = (REPO / "README.md").read_text()
    m = re.search(r"```bash\n(oztune finetune --train data/sst2/train\.tsv.*?)\n```", readme, re.S)
    argv = shlex.split(m.group(1).replace("\\\n", " "))[1:]
    from_readme = cli_args(argv)
    from_config = cli_args(["finetune", "--config", "configs/sst2.yaml", "--output", from_readme.output])
    effective = lambda a: dataclasses.replace(a, lr=a.lr or FULL_LR, max_length=a.max_length or TRAIN_MAX_LENGTH)  # noqa: E731
    assert effective(from_readme) == effective(from_config)


# --- 2. precedence ------------------------------------------------------------------------------------------------

def write(tmp_path: Path, text: str, name: str = "c.yaml") -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_flags_win_over_config_and_config_over_defaults(tmp_path):
    cfg = write(tmp_path, "epochs: 1\nbatch_size: 8\nlr: 5.0e-5\nprogress: false\nfreeze_embeddings: false\n"
                          "head_hidden: [16, 8]\nlabel_names: [a, b]\nseed: 3\n")
    a = cli_args(["finetune", "--config", cfg, "--batch-size", "32", "--lr", "1e-4", "--progress",
                  "--freeze-embeddings", "--head-hidden", "4", "--label-names", "x,y"])
    # flags given with the default's value still win over the config
    assert (a.batch_size, a.lr, a.progress, a.freeze_embeddings) == (32, 1e-4, True, True)
    assert (a.head_hidden, a.label_names) == ([4], ["x", "y"])
    assert (a.epochs, a.seed) == (1, 3)  # only in the config
    assert (a.weight_decay, a.patience) == (0.01, 0)  # in neither: the defaults
    b = cli_args(["finetune", "--config", write(tmp_path, "progress: true\nhead_hidden: [4]\n", "d.yaml"),
                  "--no-progress", "--head-hidden", ""])
    assert (b.progress, b.head_hidden) == (False, [])


def test_yaml_lists_and_comma_strings_read_as_the_command_line_reads_them(tmp_path):
    as_list = cli_args(["finetune", "--config", write(tmp_path, "head_hidden: [256, 128]\nlora_targets: [qkv, o]\n")])
    as_text = cli_args(["finetune", "--config", write(tmp_path, "head_hidden: 256,128\nlora_targets: qkv,o\n", "d.yaml")])
    flags = cli_args(["finetune", "--head-hidden", "256,128", "--lora-targets", "qkv,o"])
    assert as_list == as_text == flags


def test_yaml_positional_lists_take_a_scalar_whole_as_the_command_line_does(tmp_path):
    """`oztune predict "good movie, bad film"` is one text; `texts: good movie, bad film` in a config was split
    at the comma into two texts (two answers for one), and a model path with a comma into two models."""
    one = cli_args(["predict", "--config", write(tmp_path, "texts: good movie, bad film\n")])
    assert one.texts == cli_args(["predict", "good movie, bad film"]).texts == ["good movie, bad film"]
    listed = cli_args(["predict", "--config", write(tmp_path, "texts: [a, b, 'c, d']\n", "d.yaml")])
    assert listed.texts == ["a", "b", "c, d"]
    models = cli_args(["compare", "--config", write(tmp_path, "models: runs/a,b\n", "e.yaml")])
    assert models.models == cli_args(["compare", "runs/a,b"]).models == ["runs/a,b"]


def test_yaml_label_names_keep_their_text(tmp_path):
    """--label-names yes,no gives the names yes and no; YAML read [yes, no] as booleans and saved 'True', 'False'."""
    cfg = write(tmp_path, "label_names: [yes, no]\ntext_column: on\nmodel: 1.10\n")
    a = cli_args(["finetune", "--config", cfg])
    assert a.label_names == cli_args(["finetune", "--label-names", "yes,no"]).label_names == ["yes", "no"]
    assert (a.text_column, a.model) == ("on", "1.10")


def test_relative_paths_in_a_config_are_relative_to_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    cfg = write(tmp_path / "sub", "train: data/t.tsv\n")
    monkeypatch.chdir(tmp_path)
    assert cli_args(["finetune", "--config", cfg]).train == "data/t.tsv"
    readme = (REPO / "README.md").read_text()
    assert "relative to the current directory" in readme  # documented next to --config


# --- 3. bad config files --------------------------------------------------------------------------------------------

BAD = [
    ("unknown", "epochz: 3\n", "unknown option(s) epochz"),
    ("other_command", "port: 8000\n", "unknown option(s) port"),
    ("wrong_type", "epochs: three\n", "epochs: expected an integer, got 'three'"),
    ("list_for_scalar", "train: x.tsv\nepochs: [1, 2]\n", "epochs: expected an integer, got [1, 2]"),
    ("list_for_text", "model: [a, b]\n", "model: expected a text value"),
    ("mapping_for_list", "label_names: {a: 1}\n", "label_names: expected a list"),
    ("syntax", "epochs: 3\n  lr: [\n", "line 2"),
    ("syntax_flow", "epochs: 3\nlr: [\n", "line 3"),
    ("a_list", "- epochs\n- 3\n", "expected a mapping of option names to values"),
    ("int_key", "1: 2\n", "unknown option(s) 1"),
    ("null_key", "~: 2\n", "unknown option(s) ~"),
    ("duplicate", "epochs: 1\nlr: 1.0e-4\nepochs: 2\n", "line 3: epochs is given twice"),
    ("duplicate_spelling", "batch-size: 4\nbatch_size: 8\n", "line 2: batch_size is given twice"),
    ("bad_tag", "epochs: !!int x\n", "not valid YAML"),
    ("control_char", "epochs: 1\x07\n", "not valid YAML"),
]


def _one_error_line(capsys, argv, tmp_path) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()
    return err


@pytest.mark.parametrize("text,message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_a_bad_config_gives_one_line_naming_file_and_key(text, message, tmp_path, capsys, sentiment_files):
    cfg = write(tmp_path, text, "bad.yaml")
    err = _one_error_line(capsys, ["finetune", "--config", cfg, "--train", str(sentiment_files[0]),
                                   "--output", str(tmp_path / "o")], tmp_path)
    assert err.startswith(f"oztune finetune: error: {cfg}: ") and message in err, err


@pytest.mark.parametrize("kind", ["missing", "directory", "not_utf8"])
def test_an_unreadable_config_gives_one_line(kind, tmp_path, capsys):
    path = {"missing": tmp_path / "none.yaml", "directory": tmp_path, "not_utf8": tmp_path / "b.yaml"}[kind]
    (tmp_path / "b.yaml").write_bytes(b"epochs: 1\nmodel: \xff\xfe\n")
    err = _one_error_line(capsys, ["finetune", "--config", str(path), "--output", str(tmp_path / "o")], tmp_path)
    assert err.startswith(f"oztune finetune: error: {path}: "), err


def test_an_option_of_another_command_says_which(tmp_path, capsys):
    """Not a bug before (the key was named), a better hint now: a serve option in a finetune config."""
    cfg = write(tmp_path, "port: 8000\nworkers: 2\n")
    err = _one_error_line(capsys, ["finetune", "--config", cfg, "--output", str(tmp_path / "o")], tmp_path)
    assert "unknown option(s) port (an option of serve), workers (an option of serve)" in err


def test_an_empty_config_supplies_nothing(tmp_path):
    assert _read_yaml(write(tmp_path, "# nothing yet\n"), FinetuneArgs) == {}


# --- 4. --help and the Python API ------------------------------------------------------------------------------------

def test_help_shows_each_options_python_default():
    """The help's "(default: X)" comes from the dataclass field, so help and Python API cannot disagree;
    prose defaults ("default: 128", "default 1e-4") are checked against the values the code uses."""
    from oztune.models.hub import DEFAULT_MODEL

    help_text = {a.dest: a.help for a in make_parser()._subparsers._group_actions[0].choices["finetune"]._actions}
    assert "default: 128" in help_text["max_length"] and TRAIN_MAX_LENGTH == 128
    assert "default 1e-4" in help_text["lr"] and FULL_LR == 1e-4
    assert DEFAULT_MODEL in help_text["model"] and FinetuneArgs().model == DEFAULT_MODEL
    assert "(default: 32)" in help_text["batch_size"] and FinetuneArgs().batch_size == 32
    assert "(default: on)" in help_text["freeze_embeddings"] and FinetuneArgs().freeze_embeddings is True


# --- 5. run.json and the model card hold the effective configuration; --resume from a config ---------------------

def test_run_json_and_card_record_the_effective_configuration(tiny_base, sentiment_files, tmp_path, monkeypatch):
    train, _ = sentiment_files
    (tmp_path / "cfg").mkdir()
    cfg = write(tmp_path / "cfg", f"train: {train}\nmodel: {tiny_base}\nepochs: 1\nmax_train_examples: 40\n"
                                  "batch_size: 8\nprecision: fp32\nprogress: false\ncheckpoint_every: 2\n")
    monkeypatch.chdir(tmp_path)
    assert main(["finetune", "--config", cfg, "--output", "m", "--batch-size", "32", "--seed", "7"]) == 0
    run = json.loads((tmp_path / "m" / "run.json").read_text())
    args = run["args"]
    assert (args["epochs"], args["max_train_examples"], args["precision"]) == (1, 40, "fp32")  # from --config
    assert (args["batch_size"], args["seed"]) == (32, 7)  # from the command line, over the config's 8
    assert args["lr"] == FULL_LR and run["max_length"] == 64  # defaults, resolved (128, capped by the tiny
    # model's 64 positions)
    card = (tmp_path / "m" / "README.md").read_text()
    assert "1 epoch(s), batch 32, lr 0.0001" in card and "seed 7" in card
    assert not (tmp_path / "m.checkpoints").exists()  # removed once the model is saved
    # the same command again with --resume (docs/training.md): no checkpoint left, so it starts from the
    # beginning and replaces the saved model
    before = (tmp_path / "m" / "model.safetensors").stat().st_mtime_ns
    assert main(["finetune", "--config", cfg, "--output", "m", "--batch-size", "32", "--seed", "7", "--resume"]) == 0
    assert (tmp_path / "m" / "model.safetensors").stat().st_mtime_ns != before
    assert json.loads((tmp_path / "m" / "run.json").read_text())["args"]["resume"] is True
