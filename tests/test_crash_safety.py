"""Crash safety of what commands write: an interrupted or failed save leaves the earlier output whole, and no
command overwrites one of its own inputs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from oztune import cli
from oztune.errors import OztuneError
from oztune.models import hub
from oztune.models.hub import load_classifier, save_classifier


def _two_models(tiny_base, tmp_path):
    """A saved model at tmp_path/m (labels a, b; run 1) and a second one in memory to save over it."""
    model, enc, _ = load_classifier(tiny_base, num_labels=2)
    out = save_classifier(model, enc, tmp_path / "m", {0: "a", 1: "b"}, run={"save": 1})
    with torch.no_grad():
        model.head.out.bias.fill_(3.0)
    return out, model, enc


def _replace_failing_at(monkeypatch, call: int, exc: BaseException):
    real, calls = os.replace, []

    def replace(a, b):
        calls.append((a, b))
        if len(calls) == call:
            raise exc
        return real(a, b)

    monkeypatch.setattr(hub.os, "replace", replace)
    return calls


def _assert_first_model_whole(out):
    _, _, meta = load_classifier(out)
    assert meta["id2label"] == {0: "a", 1: "b"}
    assert json.loads((out / "run.json").read_text()) == {"save": 1}


@pytest.mark.parametrize("exc", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_a_save_stopped_between_its_two_renames_leaves_the_earlier_model_in_place(exc, tiny_base, tmp_path,
                                                                                 monkeypatch):
    # _replace_dir moved the earlier model aside, then the rename of the new one failed (or Ctrl-C / SIGTERM,
    # raised by the signal handler between the two calls): the output directory was simply gone
    out, model, enc = _two_models(tiny_base, tmp_path)
    calls = _replace_failing_at(monkeypatch, 2, exc)
    with pytest.raises((OztuneError, KeyboardInterrupt)):
        save_classifier(model, enc, out, {0: "neg", 1: "pos"}, run={"save": 2})
    assert len(calls) >= 2
    monkeypatch.undo()
    _assert_first_model_whole(out)
    left = sorted(p.name for p in tmp_path.iterdir() if p.name != "m")
    assert not [n for n in left if ".old-" in n], left  # the earlier model is not left aside
    if isinstance(exc, KeyboardInterrupt):
        assert left == [], left  # nothing half-done is left after Ctrl-C
    else:  # the new result is kept and named, under a name no later save takes for a killed save's leftover
        assert len(left) == 1 and left[0].startswith(f".m.kept-{os.getpid()}@")
    assert save_classifier(model, enc, out, {0: "neg", 1: "pos"}, run={"save": 2}) == out  # a rerun works
    assert json.loads((out / "run.json").read_text()) == {"save": 2}
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "m") == left


def test_a_leftover_of_a_run_killed_while_removing_the_earlier_model_does_not_block_the_next_save(tiny_base,
                                                                                                  tmp_path):
    # the earlier model was set aside as .m.old-<pid>: a process killed while deleting it left the folder,
    # and the next run with the same pid (containers) failed with "Directory not empty" (a traceback)
    out, model, enc = _two_models(tiny_base, tmp_path)
    stale = tmp_path / f".m.old-{os.getpid()}"
    shutil.copytree(out, stale)
    (stale / "model.safetensors").unlink()
    save_classifier(model, enc, out, {0: "neg", 1: "pos"}, run={"save": 2})
    assert json.loads((out / "run.json").read_text()) == {"save": 2}


def test_distill_refuses_an_output_that_is_its_student(tiny_finetuned, sentiment_files, tmp_path, capsys):
    student = tmp_path / "student"
    shutil.copytree(tiny_finetuned, student)
    before = {p.name: p.read_bytes() for p in student.iterdir()}
    train, dev = map(str, sentiment_files)
    rc = cli.main(["distill", "--teacher", str(tiny_finetuned), "--student", str(student), "--train", train,
                   "--eval", dev, "--output", str(student), "--epochs", "1", "--max-train-examples", "8",
                   "--no-progress"])
    assert rc == 2 and "is the input" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in student.iterdir()} == before


def test_predict_refuses_an_output_that_is_its_input_file(tiny_finetuned, sentiment_files, tmp_path, capsys):
    texts = tmp_path / "texts.tsv"
    texts.write_bytes(sentiment_files[1].read_bytes())
    rc = cli.main(["predict", "--model", str(tiny_finetuned), "--input", str(texts), "--output", str(texts)])
    assert rc == 2 and "is the input" in capsys.readouterr().err
    assert texts.read_bytes() == sentiment_files[1].read_bytes()


def test_evaluate_refuses_a_mistakes_file_that_is_its_data(tiny_finetuned, sentiment_files, tmp_path, capsys):
    data = tmp_path / "dev.tsv"
    data.write_bytes(sentiment_files[1].read_bytes())
    rc = cli.main(["evaluate", "--model", str(tiny_finetuned), "--data", str(data), "--mistakes", str(data)])
    assert rc == 2 and "is the input" in capsys.readouterr().err
    assert data.read_bytes() == sentiment_files[1].read_bytes()


def test_predict_refuses_to_overwrite_a_file_of_the_model(tiny_finetuned, tmp_path, capsys):
    model = tmp_path / "m"
    shutil.copytree(tiny_finetuned, model)
    config = (model / "config.json").read_bytes()
    rc = cli.main(["predict", "--model", str(model), "good movie", "--output", str(model / "config.json")])
    assert rc == 2 and "is a file of the model" in capsys.readouterr().err
    assert (model / "config.json").read_bytes() == config


def test_an_output_file_neither_clobbers_a_users_dot_tmp_file_nor_leaves_one_when_interrupted(tiny_finetuned,
                                                                                             tmp_path, capsys,
                                                                                             monkeypatch):
    from oztune import outdir

    out = tmp_path / "p.jsonl"
    (tmp_path / "p.jsonl.tmp").write_text("mine")  # was used, then renamed away, as the temporary file
    assert cli.main(["predict", "--model", str(tiny_finetuned), "good movie", "--output", str(out)]) == 0
    assert (tmp_path / "p.jsonl.tmp").read_text() == "mine"
    first = out.read_text()

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(outdir.os, "replace", interrupted)  # (the writer of output files: outdir.write_atomically)
    assert cli.main(["predict", "--model", str(tiny_finetuned), "bad movie", "--output", str(out)]) == 130
    assert out.read_text() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl", "p.jsonl.tmp"]  # no temporary file left


def _dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", ""])
    p.wait()
    return p.pid


@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_an_output_file_write_removes_the_temporary_files_of_killed_writers_and_only_those(command, tiny_finetuned,
                                                                                           sentiment_files, tmp_path,
                                                                                           capsys):
    # predict --output and evaluate --mistakes write through .NAME.tmp-PID@HOST-*: one left by a writer killed on the
    # spot (kill -9: nothing ran to remove it) is removed by the next write of that file; a live writer's is kept,
    # and another host's or container's (a shared file system: its process ids are not ours), and anything else
    # beside it
    import socket

    from oztune.outdir import process_space

    out = tmp_path / "p.jsonl"
    dead, host = _dead_pid(), process_space()
    names = {"dead": f".p.jsonl.tmp-{dead}@{host}-a1b2", "live": f".p.jsonl.tmp-{os.getpid()}@{host}-c3d4",
             "other_host": f".p.jsonl.tmp-{dead}@not-{host}-e5f6", "no_pid": ".p.jsonl.tmp-g7h8",
             "other_container": f".p.jsonl.tmp-{dead}@{socket.gethostname()}+1-k1l2",
             "users": "p.jsonl.tmp", "other_output": f".q.jsonl.tmp-{dead}@{host}-i9j0"}
    for name in names.values():
        (tmp_path / name).write_text("partial")
    if command == "predict":
        args = ["predict", "--model", str(tiny_finetuned), "good movie", "--output", str(out)]
    else:
        args = ["evaluate", "--model", str(tiny_finetuned), "--data", str(sentiment_files[1]), "--mistakes", str(out)]
    assert cli.main(args) == 0, capsys.readouterr().err
    left = {n for n in os.listdir(tmp_path) if n != "p.jsonl"}
    assert left == {names[k] for k in ("live", "other_host", "no_pid", "users", "other_output", "other_container")}
    assert all((tmp_path / n).read_text() == "partial" for n in left)


def test_the_temporary_file_of_a_predict_killed_with_sigkill_is_removed_by_the_next_one(tiny_finetuned, tmp_path):
    from conftest import killed_while_writing

    out = tmp_path / "p.jsonl"
    script = f"""
import time
from oztune import cli, commands
def slow(*a, **k):
    yield "{{}}\\n"
    print("writing", flush=True)
    time.sleep(60)
commands._answer_lines = slow
cli.main(["predict", "--model", {str(tiny_finetuned)!r}, "good movie", "--output", {str(out)!r}])
"""
    pid = killed_while_writing(script)
    assert [n.startswith(f".p.jsonl.tmp-{pid}@") for n in os.listdir(tmp_path)] == [True]
    assert cli.main(["predict", "--model", str(tiny_finetuned), "good movie", "--output", str(out)]) == 0
    assert os.listdir(tmp_path) == ["p.jsonl"]


def test_an_output_file_name_too_long_for_its_temporary_file_is_refused_before_any_work(tiny_finetuned, tmp_path,
                                                                                        capsys):
    # the temporary file .NAME.tmp-PID@HOST-XXXXXXXX is ~25 bytes (plus the host name) longer than NAME
    from oztune.outdir import _stage_prefix

    longest = os.pathconf(tmp_path, "PC_NAME_MAX") - len(_stage_prefix(Path(""), "kept").encode()) - 8
    ok = tmp_path / ("p" * longest)
    assert cli.main(["predict", "--model", str(tiny_finetuned), "good movie", "--output", str(ok)]) == 0
    assert os.listdir(tmp_path) == [ok.name]
    rc = cli.main(["predict", "--model", str(tiny_finetuned), "good movie", "--output", str(ok) + "p"])
    assert rc == 2 and "its name is too long" in capsys.readouterr().err
    assert os.listdir(tmp_path) == [ok.name]


NAME_MAX = "a" * 300  # one name over any file system's 255 bytes: an OSError (ENAMETOOLONG) from a mere exists()


@pytest.mark.parametrize("argv, option", [
    (["finetune", "--train", "{train}", "--model", "{base}", "--output", "{tmp}/" + NAME_MAX], "--output"),
    (["quantize", "--model", "{ft}", "--output", "{tmp}/" + NAME_MAX], "--output"),
    (["compare", "{ft}", "--eval", "{dev}", "--output", "{tmp}/" + NAME_MAX], "--output"),
    (["predict", "--model", "{ft}", "x", "--output", "{tmp}/" + NAME_MAX[:250] + ".jsonl"], "--output"),
    (["evaluate", "--model", "{ft}", "--data", "{dev}", "--mistakes", "{tmp}/" + NAME_MAX[:250] + ".jsonl"],
     "--mistakes"),
    (["predict", "--model", "{tmp}/" + NAME_MAX, "x"], "--model"),
    (["predict", "--model", NAME_MAX, "x"], "--model"),
    (["compare", "{tmp}/" + NAME_MAX, "--eval", "{dev}"], "model"),
])
def test_a_name_too_long_for_the_file_system_is_one_line(argv, option, tiny_base, tiny_finetuned, sentiment_files,
                                                         tmp_path, capsys):
    # an OSError [Errno 36] File name too long from a path check (exists, is_dir, resolve): a traceback, exit 1
    train, dev = sentiment_files
    argv = [a.format(train=train, dev=dev, base=tiny_base, ft=tiny_finetuned, tmp=tmp_path) for a in argv]
    rc = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err[-600:]
    assert f"{option} " in err and "its name is too long for the file system (File name too long)" in err
    assert os.listdir(tmp_path) == []


TRAIN = ["--train", "{train}", "--eval", "{dev}", "--epochs", "1", "--max-train-examples", "8", "--no-progress"]


@pytest.mark.parametrize("argv", [
    ["quantize", "--model", "{model}", "--no-progress"],
    ["prune", "--model", "{model}", *TRAIN],
    ["distill", "--teacher", "{model}", "--student-layers", "1", *TRAIN],
    ["compress", "--model", "{model}", "--recipes", "int8", *TRAIN],
    ["finetune", "--model", "{model}", *TRAIN],
    ["export", "--model", "{model}"],
], ids=lambda argv: argv[0])
@pytest.mark.parametrize("inside", ["out", "sub/out"])
def test_an_output_inside_an_input_model_directory_is_refused(argv, inside, tiny_finetuned, sentiment_files, tmp_path,
                                                              capsys):
    """A model written inside its input model: replacing (or copying) that directory later takes it along."""
    model = tmp_path / "model"
    shutil.copytree(tiny_finetuned, model)
    before = sorted(p.relative_to(model) for p in model.rglob("*"))
    train, dev = map(str, sentiment_files)
    argv = [a.format(model=model, train=train, dev=dev) for a in argv]
    assert cli.main([*argv, "--output", str(model / inside)]) == 2
    err = capsys.readouterr().err
    assert f"is inside the input {model}" in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.relative_to(model) for p in model.rglob("*")) == before


def test_a_saved_model_directory_is_on_disk_before_it_is_renamed_into_place(tiny_base, tmp_path, monkeypatch):
    """Checkpoints were fsynced, the final model directory was not: renamed into place with its files still in
    the page cache, a power cut soon after could leave a complete-looking directory of empty or torn files. Its
    files and the directory itself are now flushed before the rename (with the checkpoints' helper), the
    rename after it."""
    real_fsync, real_replace, events = os.fsync, os.replace, []

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(a, b):
        events.append(("replace", os.fspath(a), os.fspath(b)))
        return real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    model, enc, _ = load_classifier(tiny_base, num_labels=2)
    out = save_classifier(model, enc, tmp_path / "m", {0: "a", 1: "b"})
    monkeypatch.undo()

    renames = [i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(out)]
    assert len(renames) == 1, events
    tmp = events[renames[0]][1]  # the temporary directory renamed to the output
    synced = [e[1] for e in events[:renames[0]] if e[0] == "fsync"]
    names = sorted(p.name for p in out.iterdir())
    assert {"model.safetensors", "config.json"} <= set(names)
    assert sorted(os.path.basename(p) for p in synced if os.path.dirname(p) == tmp) == names, synced
    assert synced[-1] == tmp  # the directory itself, after its files
    assert ("fsync", str(tmp_path)) in events[renames[0]:]  # and the rename, on disk too


def test_predict_output_through_a_symbolic_link_replaces_its_target_and_keeps_the_link(tiny_finetuned, tmp_path):
    """The rename of the temporary file went over the link itself: the link became a regular file and its target
    kept the old answers. Now the target is replaced (through a temporary file beside it) and the link stays."""
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "p.jsonl"
    target.write_text("old answers\n")
    link = tmp_path / "p.jsonl"
    link.symlink_to(os.path.join("real", "p.jsonl"))  # (relative, as `ln -s` makes it)
    assert cli.main(["predict", "--model", str(tiny_finetuned), "good movie", "--output", str(link)]) == 0
    assert link.is_symlink() and os.readlink(link) == os.path.join("real", "p.jsonl")
    answers = [json.loads(line) for line in target.read_text().splitlines()]
    assert len(answers) == 1 and answers[0]["label"] in ("neg", "pos")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl", "real"]
    assert sorted(p.name for p in (tmp_path / "real").iterdir()) == ["p.jsonl"]  # no temporary file left


def test_an_atomic_write_through_a_link_to_a_missing_file_creates_the_target(tmp_path):
    from oztune.outdir import write_atomically

    link = tmp_path / "out.txt"
    link.symlink_to(tmp_path / "new.txt")
    write_atomically(link, "x\n")
    assert link.is_symlink() and (tmp_path / "new.txt").read_text() == "x\n"


@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_a_new_output_file_inside_the_model_directory_is_refused(command, tiny_finetuned, sentiment_files, tmp_path,
                                                                 capsys):
    """README: `predict --output` or `evaluate --mistakes` naming "a file of the model directory" is refused; a
    new file there was written (only an existing one was refused), and would go with the model when a later run
    replaces it."""
    model = tmp_path / "m"
    shutil.copytree(tiny_finetuned, model)
    before = sorted(p.name for p in model.iterdir())
    out = model / "sub" / ".." / "new.jsonl" if command == "predict" else model / "wrong.jsonl"
    (model / "sub").mkdir()
    argv = (["predict", "--model", str(model), "good movie", "--output", str(out)] if command == "predict" else
            ["evaluate", "--model", str(model), "--data", str(sentiment_files[1]), "--mistakes", str(out)])
    assert cli.main(argv) == 2
    option = "--output" if command == "predict" else "--mistakes"
    assert f"{option} {out}: is inside the model directory {model}" in capsys.readouterr().err
    assert sorted(p.name for p in model.iterdir()) == sorted(before + ["sub"])
