"""An output directory that cannot be written, or that holds anything but a model, is a one-line error
before training starts, not after; nothing of the user's is ever replaced."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from oztune.errors import OztuneError
from oztune.outdir import _replace_dir, check_output_dir


def writable(d: str) -> bool:
    try:
        with tempfile.TemporaryFile(dir=d):
            return True
    except OSError:
        return False


def test_a_path_under_a_regular_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OztuneError, match=r"--output .*file/sub/model: cannot be created, .*file is not a directory"):
        check_output_dir(str(tmp_path / "file" / "sub" / "model"))


def test_an_existing_file(tmp_path):
    (tmp_path / "model").write_text("x")
    with pytest.raises(OztuneError, match="exists and is not a directory"):
        check_output_dir(str(tmp_path / "model"))


def test_missing_parents_that_can_be_created_pass_and_nothing_is_left(tmp_path):
    check_output_dir(str(tmp_path / "a" / "b" / "model"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits")
def test_a_read_only_directory(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    try:
        with pytest.raises(OztuneError, match=r"--checkpoint-dir .*ro/new/ckpt: cannot write to .*ro \(Permission denied\)"):
            check_output_dir(str(ro / "new" / "ckpt"), "--checkpoint-dir")
    finally:
        ro.chmod(0o700)


@pytest.mark.skipif(not Path("/sys").is_dir() or writable("/sys"), reason="needs a read-only /sys (as in containers)")
def test_a_read_only_file_system_even_for_root():
    with pytest.raises(OztuneError, match=r"--output /sys/oztune/model: cannot write to /sys"):
        check_output_dir("/sys/oztune/model")


def test_the_command_fails_before_any_training(tiny_base, sentiment_files, tmp_path):
    (tmp_path / "file").write_text("x")
    r = subprocess.run([sys.executable, "-m", "oztune", "finetune", "--train", str(sentiment_files[0]), "--model",
                        str(tiny_base), "--output", str(tmp_path / "file" / "model")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "is not a directory" in r.stderr
    assert "fine-tuning" not in r.stdout and "Traceback" not in r.stderr


def test_a_directory_holding_other_things_is_never_replaced(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OztuneError, match=r"--output .*out: exists and is not a model directory \(it holds notes.txt\); "
                       "oztune replaces its output directory as a whole: choose a new one or empty this one"):
        check_output_dir(str(out))
    new = tmp_path / "new"
    new.mkdir()
    with pytest.raises(OztuneError, match="not replaced, the result is in"):
        _replace_dir(new, out)  # the last line of defence, where a command skipped the check
    assert (out / "notes.txt").read_text() == "mine" and new.is_dir()


def test_an_earlier_model_or_an_empty_directory_may_be_replaced(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "empty").mkdir()
    assert check_output_dir(str(tmp_path / "model")) == tmp_path / "model"
    assert check_output_dir(str(tmp_path / "empty")) == tmp_path / "empty"


@pytest.mark.parametrize("name", ["README.md", "vocab.txt", "run.json", "variants"])
def test_a_folder_of_model_file_names_without_a_model_is_refused(tmp_path, name):
    """Names a model save writes (a README.md, vocab.txt, run.json, variants/) are a user's files where no
    config.json or model.onnx says the folder is a model: replacing it would delete them."""
    out = tmp_path / "out"
    out.mkdir()
    (out / name).mkdir() if name == "variants" else (out / name).write_text("mine")
    with pytest.raises(OztuneError, match=rf"exists and is not a model directory \(it holds {name}\)"):
        check_output_dir(str(out))


def test_the_current_directory_or_one_holding_an_input_is_refused(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path / "data")
    for out in (".", "..", str(tmp_path)):
        with pytest.raises(OztuneError, match="the current directory or one above it"):
            check_output_dir(out)
    with pytest.raises(OztuneError, match=r"holds the input .*train.tsv"):
        check_output_dir(str(tmp_path / "other"), inputs=(None, str(tmp_path / "other" / "train.tsv")))


def test_a_written_model_directory_has_the_modes_of_new_files(tiny_base, tmp_path):
    from oztune.models.hub import load_classifier, save_classifier

    model, enc, meta = load_classifier(tiny_base)
    old = os.umask(0o022)
    try:
        out = save_classifier(model, enc, tmp_path / "m", {0: "a", 1: "b"})
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755  # not mkdtemp's 0700
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o644


def test_a_written_file_has_the_mode_of_a_new_file(tmp_path):
    """predict --output and evaluate --mistakes files are readable by others as any new file is (umask), not
    left at mkstemp's owner-only 0600."""
    from oztune.outdir import write_atomically

    old = os.umask(0o022)
    try:
        write_atomically(tmp_path / "p.jsonl", "x\n")
    finally:
        os.umask(old)
    assert (tmp_path / "p.jsonl").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "p.jsonl").read_text() == "x\n"


def test_the_command_refuses_an_output_that_holds_its_training_file(tiny_base, sentiment_files, tmp_path):
    out = tmp_path / "work"
    out.mkdir()
    train = out / "train.tsv"
    train.write_bytes(sentiment_files[0].read_bytes())
    r = subprocess.run([sys.executable, "-m", "oztune", "finetune", "--train", str(train), "--model",
                        str(tiny_base), "--output", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "holds the input" in r.stderr and "Traceback" not in r.stderr
    assert train.read_bytes() == sentiment_files[0].read_bytes()


def test_an_output_inside_an_input_directory_is_refused_but_not_inside_a_hub_name(tmp_path, monkeypatch):
    (tmp_path / "model").mkdir()
    for out in ("model/q", "model/a/b"):
        with pytest.raises(OztuneError, match=r"is inside the input .*/model, and would go with it"):
            check_output_dir(str(tmp_path / out), inputs=(str(tmp_path / "model"),))
    monkeypatch.chdir(tmp_path)  # a hub model id, not a directory here: nothing to be inside of
    assert check_output_dir("org/name/out", inputs=("org/name",)) == tmp_path / "org" / "name" / "out"


def _project(tmp_path) -> Path:
    """A user's folder that happens to hold a config.json: not a model, whatever its name says."""
    proj = tmp_path / "proj"
    (proj / "src").mkdir(parents=True)
    (proj / "config.json").write_text('{"db": "x"}')
    (proj / "important.txt").write_text("hi")
    (proj / "src" / "main.py").write_text("print(1)")
    return proj


def _tree(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() if p.is_file() else None for p in sorted(d.rglob("*"))}


def test_a_config_json_beside_other_files_is_not_a_model_directory(tmp_path):
    # any directory holding a config.json counted as a model and was replaced whole: important.txt and src/ gone
    proj = _project(tmp_path)
    before = _tree(proj)
    with pytest.raises(OztuneError, match=r"--output .*proj: exists and holds files that are not a model's "
                       r"\(important.txt, src\); oztune replaces its output directory as a whole: choose a new "
                       r"one or move them$"):
        check_output_dir(str(proj))
    new = tmp_path / "new"
    new.mkdir()
    with pytest.raises(OztuneError, match=r"not a model's \(important.txt, src\); not replaced, the result is in"):
        _replace_dir(new, proj)  # the last line of defence, where a command skipped the check
    assert _tree(proj) == before


def test_quantize_refuses_a_folder_with_a_config_json_and_deletes_nothing(tiny_finetuned, tmp_path, capsys):
    from oztune.cli import main

    proj = _project(tmp_path)
    before = _tree(proj)
    assert main(["quantize", "--model", str(tiny_finetuned), "--output", str(proj), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--output" in err and "not a model's (important.txt, src)" in err
    assert _tree(proj) == before and sorted(p.name for p in tmp_path.iterdir()) == ["proj"]


def test_a_model_directory_with_the_users_notes_in_it_is_refused(tiny_finetuned, tmp_path, capsys):
    import shutil

    from oztune.cli import main

    m = tmp_path / "m"
    shutil.copytree(tiny_finetuned, m)
    (m / "notes.txt").write_text("mine")
    (m / "predictions.jsonl").write_text('{"label": "pos"}\n')
    before = _tree(m)
    assert main(["quantize", "--model", str(tiny_finetuned), "--output", str(m), "--no-progress"]) == 2
    assert "not a model's (notes.txt, predictions.jsonl)" in capsys.readouterr().err
    assert _tree(m) == before


def test_what_model_saves_write_may_be_replaced(tiny_base, tmp_path):
    """Every name oztune's saves and Hugging Face's save_pretrained write; a real save_pretrained directory."""
    from oztune.outdir import MODEL_FILES

    out = tmp_path / "all"
    out.mkdir()
    for name in MODEL_FILES | {"model-00001-of-00002.safetensors", "pytorch_model-00002-of-00002.bin"}:
        (out / name).mkdir() if name in ("variants", "aoti") else (out / name).write_text("x")
    assert check_output_dir(str(out)) == out
    assert check_output_dir(str(tiny_base)) == tiny_base  # (save_pretrained and a tokenizer.json)


def test_commands_run_again_over_their_own_outputs(tiny_finetuned, tmp_path, capsys):
    """A re-run replaces what an earlier run wrote: a finetune's output (quantized over), a quantize's, an export's."""
    import shutil

    from oztune.cli import main

    ft = tmp_path / "ft"
    shutil.copytree(tiny_finetuned, ft)
    (ft / "train_log.csv").write_text("step,loss\n")  # (a finetune's step log and model card, as the command writes)
    (ft / "README.md").write_text("# model\n")
    q = ["quantize", "--model", str(tiny_finetuned), "--no-progress", "--output"]
    assert main([*q, str(ft)]) == 0
    assert main([*q, str(tmp_path / "q")]) == 0 and main([*q, str(tmp_path / "q")]) == 0
    assert main(["export", "--model", str(tiny_finetuned), "--output", str(tmp_path / "onnx")]) == 0
    assert main(["export", "--model", str(tiny_finetuned), "--output", str(tmp_path / "onnx")]) == 0
    assert (tmp_path / "onnx" / "model.onnx").is_file(), capsys.readouterr().err
