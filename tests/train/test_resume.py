"""Checkpoints survive SIGKILL: a run killed at random points and resumed ends bit-identical to an uninterrupted one.

Bit-identical holds on CPU because a checkpoint holds everything the rest of the run depends on: weights,
AdamW moments, the scheduler position, the Python/NumPy/torch RNG states (dropout draws from torch's
default generator) and the position in the epoch's deterministic batch order.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from oztune.errors import OztuneError
from oztune.train.checkpoint import Checkpointer, remove_checkpoints

STEPS = 40  # 160 examples / batch 8 x 2 epochs


def args(base, files, out) -> list[str]:
    train, dev = files
    return ["finetune", "--train", str(train), "--eval", str(dev), "--model", str(base), "--output", str(out),
            "--epochs", "2", "--batch-size", "8", "--max-train-examples", "160", "--lr", "3e-3", "--precision", "fp32",
            "--no-progress"]


def newest_step(folder: Path) -> int:
    names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
    return max((int(m.group(1)) for n in names if (m := re.fullmatch(r"step-(\d+)", n))), default=0)


def log_rows(model_dir: Path) -> list[tuple]:
    with open(model_dir / "train_log.csv") as f:
        return [(r["step"], r["epoch"], r["loss"], r["lr"]) for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def reference(tiny_base, sentiment_files, tmp_path_factory) -> Path:
    """The uninterrupted run, without checkpoints, in a fresh process like the killed ones: bit-identical
    needs the same thread count (the reduction order of the matmuls), which other tests may change here."""
    out = tmp_path_factory.mktemp("ref") / "model"
    subprocess.run([sys.executable, "-m", "oztune", *args(tiny_base, sentiment_files, out), "--checkpoint-every", "0"],
                   check=True, capture_output=True, timeout=300)
    return out


def test_sigkill_at_random_points_then_resume_is_bit_identical(reference, tiny_base, sentiment_files, tmp_path):
    seed = int(os.environ.get("OZTUNE_RESUME_SEED") or random.randrange(2**32))  # rerun a failure with its seed
    rng = random.Random(seed)
    out, ckpt = tmp_path / "model", tmp_path / "model.checkpoints"
    cmd = [sys.executable, "-m", "oztune", *args(tiny_base, sentiment_files, out), "--checkpoint-every",
           str(rng.choice([1, 2])), "--resume"]
    for target in sorted(rng.sample(range(2, STEPS - 6), 3)):
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        while newest_step(ckpt) < target and p.poll() is None:
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.05))  # land anywhere: mid-step, mid-write
        p.kill()
        _, err = p.communicate()
        assert p.returncode == -signal.SIGKILL, f"seed {seed}: the run ended before the kill at step {target}: {err}"
    assert not out.exists()
    newest = ckpt / f"step-{newest_step(ckpt):08d}" / "state.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a torn write

    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)

    assert r.returncode == 0, r.stderr
    assert "skipping checkpoint" in r.stderr and "truncated" in r.stderr and "resuming from" in r.stderr
    want, got = load_file(reference / "model.safetensors"), load_file(out / "model.safetensors")
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want), f"seed {seed}: weights differ from the uninterrupted run"
    assert log_rows(out) == log_rows(reference)
    assert json.loads((out / "run.json").read_text())["history"] == json.loads((reference / "run.json").read_text())["history"]
    assert not ckpt.exists(), "checkpoints of a finished run are removed"


def state(step: int) -> dict:
    return {"model": {"w": torch.full((64, 64), float(step))}, "progress": {"step": step}}


def test_truncated_corrupted_or_unfinished_checkpoints_are_skipped(tmp_path, capsys):
    ck = Checkpointer(tmp_path, every=1, keep=5, fingerprint={"seed": 1})
    paths = [ck.save(s, state(s)) for s in (1, 2, 3, 4)]
    (paths[3] / "state.pt").write_bytes((paths[3] / "state.pt").read_bytes()[:-100])
    data = bytearray((paths[2] / "state.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (paths[2] / "state.pt").write_bytes(bytes(data))
    (paths[1] / "manifest.json").unlink()
    (tmp_path / ".step-00000005.tmp-x").mkdir()  # a write cut short before its rename

    assert ck.newest_valid() == paths[0]
    assert ck.load(paths[0])["model"]["w"][0, 0] == 1
    err = capsys.readouterr().err
    assert "step-00000004: state.pt has" in err and "truncated" in err
    assert "step-00000003: state.pt does not match its SHA-256 checksum" in err
    assert "step-00000002: no manifest.json" in err
    assert not (tmp_path / ".step-00000005.tmp-x").exists()
    (paths[0] / "manifest.json").write_text("{not json")
    assert ck.newest_valid() is None


def test_only_the_newest_k_are_kept(tmp_path):
    ck = Checkpointer(tmp_path, every=3, keep=2, fingerprint={})
    for s in range(1, 8):
        if ck.due(s):
            ck.save(s, state(s))
    assert [p.name for _, p in ck.checkpoints()] == ["step-00000006", "step-00000003"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_keep_counts_the_checkpoint_just_written(tmp_path):
    """--keep-checkpoints 2 keeps two checkpoints on disk, not three (a big model's disk use is bounded by it)."""
    ck = Checkpointer(tmp_path, every=1, keep=2, fingerprint={})
    for s in range(1, 5):
        ck.save(s, state(s))
    assert [p.name for _, p in ck.checkpoints()] == ["step-00000004", "step-00000003"]


def test_the_same_step_written_again_replaces_it(tmp_path):
    """A resumed run writes the step it resumed at again (e.g. its SIGTERM checkpoint): the new state replaces
    the old one, and the write does not fail on the existing folder."""
    ck = Checkpointer(tmp_path, every=1, keep=2, fingerprint={})
    ck.save(3, {"x": 1})
    ck.save(3, {"x": 2})
    assert [p.name for _, p in ck.checkpoints()] == ["step-00000003"]
    assert ck.load(ck.newest_valid())["x"] == 2


def test_removing_checkpoints_leaves_other_files(tmp_path):
    ck = Checkpointer(tmp_path / "ck", 1, 2, {})
    ck.save(1, state(1))
    (tmp_path / "ck" / ".step-00000002.tmp-abc").mkdir()
    remove_checkpoints(tmp_path / "ck")
    assert not (tmp_path / "ck").exists()
    ck.save(1, state(1))
    (tmp_path / "ck" / "notes.txt").write_text("mine")
    remove_checkpoints(tmp_path / "ck")
    assert [p.name for p in (tmp_path / "ck").iterdir()] == ["notes.txt"]


def test_resume_with_other_settings_is_refused(tmp_path):
    path = Checkpointer(tmp_path, 1, 2, {"batch_size": 16, "seed": 1}).save(5, state(5))
    with pytest.raises(OztuneError, match=r"other settings: batch_size 16 \(now 32\)"):
        Checkpointer(tmp_path, 1, 2, {"batch_size": 32, "seed": 1}).load(path)


OTHER_SETTINGS = {"batch_size": 16, "grad_accum": 2, "epochs": 4, "seed": 7, "bucket": 1, "lr": 1e-4,
                  "weight_decay": 0.0, "warmup_ratio": 0.0, "max_grad_norm": 0.5, "layer_lr_decay": 0.9,
                  "precision": "bf16", "ema_decay": 0.9, "freeze_embeddings": True, "class_weights": [1.0, 2.0],
                  "rdrop": 0.5, "eval_every": 5, "patience": 2}  # each unlike TrainConfig's default


@pytest.mark.parametrize("key", [*OTHER_SETTINGS, "examples", "data", "eval_data", "processes", "trainable",
                                 "base_weights"])
def test_resume_with_any_other_fingerprinted_setting_is_refused_naming_it(tiny_base, tmp_path, key):
    """--resume with another value of any setting the run's fingerprint records (an option, the data, the
    evaluation data, the number of processes, what is frozen, the pre-trained weights) is refused naming it:
    continuing the old run's state under the new setting would save a model neither run would have made."""
    from oztune.data.dataset import EncodedData
    from oztune.models.hub import load_classifier
    from oztune.train.distributed import DistEnv
    from oztune.train.loop import TrainConfig

    model = load_classifier(tiny_base)[0]
    data = EncodedData([([1, 5, 2], [0, 0, 0]), ([1, 6, 7, 2], [0, 0, 0, 0])], torch.tensor([0, 1]), 0)
    given = {"checkpoint_dir": str(tmp_path), "checkpoint_every": 1, "precision": "fp32"}
    Checkpointer.for_run(TrainConfig(**given), data, model, DistEnv()).save(1, state(1))
    env, eval_data = DistEnv(), None
    if key in OTHER_SETTINGS:
        given[key] = OTHER_SETTINGS[key]
    elif key == "examples":
        data = data.subset([0])
    elif key == "data":
        data = EncodedData([([1, 5, 2], [0, 0, 0]), ([1, 6, 8, 2], [0, 0, 0, 0])], torch.tensor([0, 1]), 0)
    elif key == "eval_data":
        eval_data = data
    elif key == "processes":
        env = DistEnv(rank=0, world=2)
    elif key == "trainable":
        next(model.backbone.parameters()).requires_grad_(False)
    else:
        with torch.no_grad():
            next(model.backbone.parameters()).add_(1.0)
    ck = Checkpointer.for_run(TrainConfig(**given, resume=True), data, model, env, eval_data)
    with pytest.raises(OztuneError, match=rf"other settings: (.*; )?{key} "):
        ck.load(ck.newest_valid())


def test_fresh_start_over_an_unfinished_run_is_refused(tiny_base, sentiment_files, tmp_path):
    out = tmp_path / "model"
    Checkpointer(tmp_path / "model.checkpoints", 1, 2, {}).save(7, state(7))
    r = subprocess.run([sys.executable, "-m", "oztune", *args(tiny_base, sentiment_files, out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert "holds checkpoints of an unfinished run (newest: step 7): pass --resume" in r.stderr
    assert "Traceback" not in r.stderr and not out.exists()


EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


@pytest.mark.parametrize("manifest", ['{"files": []}', '{"files": null}', '{"files": {"state.pt": 5}}',
                                      '{"files": {"state.pt": {}}}', '{"files": {"state.pt": {"bytes": "9", "sha256": 1}}}',
                                      '{"files": {}}', '{"files": {"notes.txt": {"bytes": 0, "sha256": "%s"}}}' % EMPTY_SHA256])
def test_a_manifest_of_another_shape_is_skipped_not_a_traceback_nor_trusted(tmp_path, capsys, manifest):
    """A manifest.json that is JSON but not what save writes raised AttributeError, TypeError, KeyError or
    ValueError out of newest_valid (a traceback instead of skipping the checkpoint), and one that listed no
    state.pt passed as valid: its state.pt was loaded unchecked."""
    ck = Checkpointer(tmp_path, every=1, keep=5, fingerprint={})
    older, newer = ck.save(1, state(1)), ck.save(2, state(2))
    (newer / "manifest.json").write_text(manifest)
    (newer / "state.pt").write_bytes(b"not a checkpoint")
    (newer / "notes.txt").write_bytes(b"")

    assert ck.newest_valid() == older
    assert "skipping checkpoint" in capsys.readouterr().err


def test_sigterm_checkpoints_the_step_it_came_in_and_the_resumed_run_is_bit_identical(reference, tiny_base,
                                                                                       sentiment_files, tmp_path):
    """A preempted job (SIGTERM): finetune writes a checkpoint at the step it was told to stop in (none was due:
    one every 1,000 steps), exits 143, and --resume ends with the uninterrupted run's weights. Before, it
    stopped at once and the run started again from the beginning."""
    out, ckpt = tmp_path / "model", tmp_path / "model.checkpoints"
    cmd = [sys.executable, "-m", "oztune", *args(tiny_base, sentiment_files, out), "--checkpoint-every", "1000",
           "--resume"]
    cmd.remove("--no-progress")  # the progress bar says when training has begun
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen = b""
    while b"epoch 1/2" not in seen:
        chunk = p.stderr.read1(4096)
        assert chunk, seen.decode()
        seen += chunk
    p.send_signal(signal.SIGTERM)  # (in the first steps: held until the step ends)
    err = (seen + p.communicate(timeout=120)[1]).decode()
    assert p.returncode == 143 and "stopped by SIGTERM" in err, err
    step = newest_step(ckpt)
    assert 0 < step < STEPS and not out.exists(), step
    assert Checkpointer(ckpt, 1000, 1, {}).problem(ckpt / f"step-{step:08d}") is None  # whole: its manifest matches

    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)

    assert r.returncode == 0 and f"step-{step:08d}" in r.stderr, r.stderr
    want, got = load_file(reference / "model.safetensors"), load_file(out / "model.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_a_removal_cut_short_leaves_no_checkpoint_that_blocks_a_fresh_start(tmp_path, monkeypatch):
    """Deleting checkpoints once the model is saved takes a while; a run stopped in it (Ctrl-C, SIGTERM) left a
    half-deleted step-* folder, and the next run without --resume was refused as "an unfinished run"."""
    import shutil

    from oztune.train import checkpoint

    ck = Checkpointer(tmp_path / "ck", 1, 2, {})
    ck.save(1, state(1))
    ck.save(2, state(2))
    real = shutil.rmtree

    def cut_short(path, *a, **kw):
        (Path(path) / "state.pt").unlink()  # part of the folder is gone, then the stop
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.shutil, "rmtree", cut_short)
    with pytest.raises(KeyboardInterrupt):
        remove_checkpoints(tmp_path / "ck")
    monkeypatch.setattr(checkpoint.shutil, "rmtree", real)
    assert ck.checkpoints() == []
    ck.check_fresh_start()  # not refused
    assert ck.newest_valid() is None and [p.name for p in (tmp_path / "ck").iterdir()] == []  # and cleaned up
