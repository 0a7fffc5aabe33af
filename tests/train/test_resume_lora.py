"""Resume, LoRA and their CLI wiring (an audit). Each test failed on the code before its fix.

The interrupted runs are made in-process: ``Checkpointer.save_run`` is wrapped so that the run stops with an
exception right after the checkpoint of step 2 is written, as if it had been killed there.
"""

from __future__ import annotations

import pytest
import torch

import oztune.train.checkpoint as checkpoint
from oztune.cli import main
from oztune.errors import OztuneError
from oztune.models.hub import load_classifier
from oztune.models.lora import apply_lora


class Killed(Exception):
    """Stands for a SIGKILL right after a checkpoint was written."""


def finetune_args(base, files, out, *extra) -> list[str]:
    train, _ = files
    return ["finetune", "--train", str(train), "--model", str(base), "--output", str(out), "--epochs", "1",
            "--batch-size", "16", "--max-train-examples", "64", "--lr", "3e-3", "--precision", "fp32",
            "--no-progress", "--checkpoint-every", "1", *extra]


def interrupted_run(monkeypatch, argv: list[str], at_step: int = 2) -> None:
    """Run ``argv`` until the checkpoint of ``at_step`` is written, then stop as a killed run would."""
    save_run = checkpoint.Checkpointer.save_run

    def save_then_die(self, model, opt, sched, progress, env):
        save_run(self, model, opt, sched, progress, env)
        if progress.step == at_step:
            raise Killed

    with monkeypatch.context() as m:
        m.setattr(checkpoint.Checkpointer, "save_run", save_then_die)
        with pytest.raises(Killed):
            main(argv)


# --- 1. The resume fingerprint leaves out LoRA and head settings: a resume with other ones is not refused ---
# checkpoint.py Checkpointer.for_run builds the fingerprint from the optimisation settings and parameter counts
# only. --lora-alpha (the scale of every update), --lora-dropout and --pooling change what the rest of the run
# computes but not a parameter count, so `--resume` with another value silently continues the old run's
# weights under the new settings: the saved model is neither run's. README: "a checkpoint of other data or
# settings is refused"; docs/training.md lists "LoRA rank" among the settings checked.

@pytest.mark.parametrize("first, second", [
    (["--lora-rank", "2"], ["--lora-rank", "2", "--lora-alpha", "64"]),
    (["--lora-rank", "2"], ["--lora-rank", "2", "--lora-dropout", "0.5"]),
    ([], ["--pooling", "mean"]),
], ids=["lora-alpha", "lora-dropout", "pooling"])
def test_resume_with_other_lora_or_head_settings_is_refused(one_thread, tiny_base, sentiment_files, tmp_path,
                                                             monkeypatch, capsys, first, second):
    out, ck = tmp_path / "model", tmp_path / "ck"
    interrupted_run(monkeypatch, finetune_args(tiny_base, sentiment_files, out, "--checkpoint-dir", str(ck), *first))
    capsys.readouterr()

    rc = main(finetune_args(tiny_base, sentiment_files, out, "--checkpoint-dir", str(ck), *second, "--resume"))

    err = capsys.readouterr().err
    assert rc == 2 and "other settings" in err, (
        f"--resume with {' '.join(second)} continued a checkpoint written with {' '.join(first) or 'the defaults'} "
        f"(rc {rc}); stderr: {err[-500:]}")
    assert not out.exists()


# --- 2. Other --lora-targets with the same parameter count: a raw RuntimeError traceback, not a refusal ---
# up (C -> F) and down (F -> C) give LoRA matrices of the same total size, so the fingerprint matches and
# Checkpointer.resume_run's model.load_state_dict raises torch's "Error(s) in loading state_dict" (missing and
# unexpected keys), which oztune's CLI does not catch: a traceback instead of the one-line "written by a run
# with other settings ... Use the same options, or another --checkpoint-dir".

def test_resume_with_other_lora_targets_is_refused_with_a_message(one_thread, tiny_base, sentiment_files, tmp_path,
                                                                   monkeypatch, capsys):
    out, ck = tmp_path / "model", tmp_path / "ck"
    interrupted_run(monkeypatch, finetune_args(tiny_base, sentiment_files, out, "--checkpoint-dir", str(ck),
                                               "--lora-rank", "2", "--lora-targets", "up"))
    capsys.readouterr()
    try:
        rc = main(finetune_args(tiny_base, sentiment_files, out, "--checkpoint-dir", str(ck),
                                "--lora-rank", "2", "--lora-targets", "down", "--resume"))
    except RuntimeError as e:
        pytest.fail(f"uncaught {type(e).__name__} instead of a one-line refusal: {str(e)[:200]}")
    assert rc == 2 and "other settings" in capsys.readouterr().err


# --- 3. --checkpoint-dir inside (or equal to) --output is accepted, then breaks the run ---
# finetune.check_args refuses a --tensorboard folder inside --output (the output is replaced as a whole) but not
# a --checkpoint-dir there. The run trains to the end, then save_classifier refuses to replace an output folder
# holding the checkpoints ("exists and is not a model directory; not replaced, the result is in .m.tmp-...");
# and after a crash, `--resume` is refused outright by check_output_dir (the output holds the checkpoint folder),
# so the run can never be resumed. It should be refused before any work, like --tensorboard.

@pytest.mark.parametrize("where", ["inside", "same"])
def test_checkpoint_dir_inside_output_is_refused_before_training(one_thread, tiny_base, sentiment_files, tmp_path,
                                                                  capsys, where):
    out = tmp_path / "model"
    ck = out / "checkpoints" if where == "inside" else out
    rc = main(finetune_args(tiny_base, sentiment_files, out, "--checkpoint-dir", str(ck)))
    err = capsys.readouterr().err
    if rc == 0:  # (a fix that keeps this combination working must leave a loadable model)
        assert (out / "config.json").is_file()
        return
    assert "--checkpoint-dir" in err, f"refused only after training, and not naming --checkpoint-dir: {err[-400:]}"
    assert not any(p.name.startswith(".model.tmp-") for p in tmp_path.iterdir()), "a trained result left aside"


def test_resume_after_a_crash_with_checkpoint_dir_inside_output(one_thread, tiny_base, sentiment_files, tmp_path,
                                                               monkeypatch, capsys):
    """The crash case of the test above: once checkpoints exist there, --resume is refused for them."""
    out = tmp_path / "model"
    argv = finetune_args(tiny_base, sentiment_files, out, "--checkpoint-dir", str(out / "checkpoints"), "--resume")
    save_run = checkpoint.Checkpointer.save_run

    def save_then_die(self, model, opt, sched, progress, env):
        save_run(self, model, opt, sched, progress, env)
        if progress.step == 2:
            raise Killed

    with monkeypatch.context() as m:
        m.setattr(checkpoint.Checkpointer, "save_run", save_then_die)
        try:
            rc0 = main(argv)
        except Killed:
            rc0 = None
    if rc0 is not None:  # (a fix that refuses the combination up front never gets here)
        assert rc0 == 2 and "--checkpoint-dir" in capsys.readouterr().err
        return
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 0, f"the interrupted run cannot be resumed: {err[-400:]}"


# --- 4. A repeated --lora-targets name gets an error blaming quantization ---
# lora.apply_lora wraps the first "qkv", then finds a LoRALinear at the second and raises "LoRA needs plain linear
# layers; layers.0.attn.qkv is a LoRALinear (quantized or sparse models cannot take LoRA)": the model is a plain
# one, the problem is the repeated name (it should be ignored, or reported as such).

def test_a_repeated_lora_target_is_not_reported_as_a_quantized_model(tiny_base):
    torch.manual_seed(0)
    model = load_classifier(tiny_base, num_labels=2)[0]
    try:
        apply_lora(model, rank=2, targets=["qkv", "o", "qkv"])
    except OztuneError as e:
        assert "quantized" not in str(e) and "LoRALinear" not in str(e), f"misleading: {e}"


# --- 5. Pruning old checkpoints counts a corrupt newer one and deletes the checkpoint just written ---
# Checkpointer.save drops all but the newest `keep` by step number, valid or not. After a resume that skipped a
# torn newer checkpoint (here step 10) with --keep-checkpoints 1 (not part of the fingerprint: allowed to change),
# the new checkpoint of step 8 is deleted at once and the torn step 10 kept: a crash now has nothing to resume from.
# (Edge case: needs a corrupt checkpoint and a resumed run whose next checkpoint lands below it.)

def test_keeping_the_newest_never_deletes_the_checkpoint_just_written(tmp_path):
    from oztune.train.checkpoint import Checkpointer

    first = Checkpointer(tmp_path, 5, 2, {})
    first.save(5, {"x": torch.zeros(1)})
    first.save(10, {"x": torch.zeros(1)})
    (tmp_path / "step-00000010" / "state.pt").write_bytes(b"torn")
    resumed = Checkpointer(tmp_path, 4, 1, {})
    assert resumed.newest_valid() == tmp_path / "step-00000005"
    written = resumed.save(8, {"x": torch.zeros(1)})
    assert written.is_dir() and resumed.newest_valid() == written
