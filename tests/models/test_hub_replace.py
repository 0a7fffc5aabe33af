"""Saving over an existing model directory: the new model replaces the old one and nothing is left beside it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import killed_while_writing

from oztune.models.hub import load_classifier, save_classifier
from oztune.outdir import process_space


def test_saving_twice_to_one_directory_holds_the_second_model_and_leaves_no_dot_entries(tiny_base, tmp_path):
    model, enc, _ = load_classifier(tiny_base, num_labels=2)
    out = save_classifier(model, enc, tmp_path / "m", {0: "x", 1: "y"}, run={"save": 1})
    with torch.no_grad():
        model.head.out.bias.fill_(3.0)
    assert save_classifier(model, enc, out, {0: "neg", 1: "pos"}, run={"save": 2}) == out

    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no .m.old-PID, no .m.tmp-*
    again, _, meta = load_classifier(out)
    assert meta["id2label"] == {0: "neg", 1: "pos"}
    assert json.loads((out / "run.json").read_text()) == {"save": 2}
    torch.testing.assert_close(again.head.out.bias, torch.full((2,), 3.0), rtol=0, atol=0)


def _dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    p = subprocess.Popen([sys.executable, "-c", ""])
    p.wait()
    return p.pid


def test_a_save_removes_the_leftovers_of_killed_saves_of_its_output_and_only_those(tiny_base, tmp_path):
    model, enc, _ = load_classifier(tiny_base, num_labels=2)
    out = save_classifier(model, enc, tmp_path / "m", {0: "x", 1: "y"})
    dead, host = _dead_pid(), process_space()
    names = {"dead": f".m.tmp-{dead}@{host}-a1b2", "dead_old": f".m.old-{dead}@{host}-c3d4",
             "live": f".m.tmp-{os.getpid()}@{host}-e5f6", "other_host": f".m.tmp-{dead}@not-{host}-g7h8",
             "no_pid": ".m.tmp-i9j0", "kept": f".m.kept-{dead}@{host}-k1l2", "other_output": f".n.tmp-{dead}@{host}-m3n4",
             "other_container": f".m.tmp-{dead}@{socket.gethostname()}+1-o5p6",  # same host name, another PID namespace
             "dead_earlier_version": f".m.tmp-{dead}@{socket.gethostname()}-q7r8"}  # named by the host name alone
    for name in names.values():
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"partial")
    save_classifier(model, enc, out, {0: "x", 1: "y"})
    left = {n for n in os.listdir(tmp_path) if n != "m"}
    assert left == {names[k] for k in ("live", "other_host", "no_pid", "kept", "other_output", "other_container")}


def test_an_earlier_model_set_aside_by_a_killed_save_stays_while_it_is_the_only_copy(tiny_base, tmp_path):
    # killed between its two renames: the earlier model is in .m.old-*/m and m is missing
    model, enc, _ = load_classifier(tiny_base, num_labels=2)
    aside = tmp_path / f".m.old-{_dead_pid()}@{process_space()}-a1b2"
    save_classifier(model, enc, aside / "m", {0: "x", 1: "y"})
    save_classifier(model, enc, tmp_path / "m", {0: "x", 1: "y"})
    assert (aside / "m" / "model.safetensors").is_file()
    save_classifier(model, enc, tmp_path / "m", {0: "x", 1: "y"})  # m is whole again: the leftover goes
    assert sorted(os.listdir(tmp_path)) == ["m"]


def test_the_temporary_directory_of_a_save_killed_with_sigkill_is_removed_by_the_next_save(tiny_base, tmp_path):
    out = tmp_path / "m"
    script = f"""
import time
from oztune.models import hub
def slow(*a, **k):
    print("writing", flush=True)
    time.sleep(60)
hub.save_file = slow
model, enc, _ = hub.load_classifier({str(tiny_base)!r}, num_labels=2)
hub.save_classifier(model, enc, {str(out)!r}, {{0: "x", 1: "y"}})
"""
    pid = killed_while_writing(script)
    assert [n.startswith(f".m.tmp-{pid}@") for n in os.listdir(tmp_path)] == [True]
    model, enc, _ = load_classifier(tiny_base, num_labels=2)
    save_classifier(model, enc, out, {0: "x", 1: "y"})
    assert os.listdir(tmp_path) == ["m"]


def test_a_name_too_long_for_its_temporary_directory_is_refused_before_any_work(tmp_path):
    # the temporary sibling .NAME.tmp-PID@HOST-XXXXXXXX is ~25 bytes (plus the host name) longer than NAME: a name
    # the file system takes was accepted by the check and then failed at the save, after the whole run
    from oztune.errors import OztuneError
    from oztune.outdir import _stage_prefix, check_output_dir, staged_dir

    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    longest = limit - len(_stage_prefix(Path(""), "kept").encode()) - 8  # (.NAME.kept-: the longest, a result kept)
    out = check_output_dir(tmp_path / ("m" * longest))
    with staged_dir(out) as tmp:
        (tmp / "config.json").write_text("{}")
    assert os.listdir(tmp_path) == [out.name]
    with pytest.raises(OztuneError, match=rf"--output .*: its name is too long \({longest + 1} bytes; at most "
                                          rf"{longest} here, for the temporary directory beside it\)"):
        check_output_dir(tmp_path / ("m" * (longest + 1)))
