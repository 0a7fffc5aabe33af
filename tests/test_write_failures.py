"""A write that fails (a full disk, a read-only or unwritable place) is one line naming the output and the OS
error, exit code 2; the earlier output is kept whole and no temporary directory is left beside it.

Where the writer is oztune's own Python the failure is raised by a patched function; where it is a library's
native code (safetensors' Rust, torch.save's C++), by the operating system itself: the file size limit
(RLIMIT_FSIZE) makes a write past it fail with EFBIG as a full disk fails with ENOSPC.
"""

from __future__ import annotations

import errno
import json
import signal
from contextlib import contextmanager

import pytest
import torch

from oztune import cli
from oztune.errors import OztuneError
from oztune.models import hub
from oztune.models.hub import load_classifier, save_classifier
from oztune.train.checkpoint import Checkpointer, Progress

resource = pytest.importorskip("resource")  # (POSIX)


@contextmanager
def files_limited_to(nbytes: int):
    """Writes past ``nbytes`` of a file fail with EFBIG, in this process, until the block ends."""
    before = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # (its default kills the process)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, before[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, before)
        signal.signal(signal.SIGXFSZ, handler)


def _saved(tiny_base, tmp_path):
    """A model saved at tmp_path/m (run 1), and the model to save over it."""
    model, enc, _ = load_classifier(tiny_base, num_labels=2)
    return save_classifier(model, enc, tmp_path / "m", {0: "a", 1: "b"}, run={"save": 1}), model, enc


def _assert_kept(out, tmp_path):
    assert json.loads((out / "run.json").read_text()) == {"save": 1}
    load_classifier(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no .m.tmp-* left


def _safetensors_disk_full(*a, **k):
    from safetensors import SafetensorError

    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def _disk_full(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("fail,why", [(_disk_full, "No space left on device"),
                                      (_safetensors_disk_full, "No space left on device, model.safetensors")],
                         ids=["OSError", "SafetensorError"])
def test_a_full_disk_while_saving_a_model_names_the_directory_and_keeps_the_earlier_one(fail, why, tiny_base,
                                                                                      tmp_path, monkeypatch):
    out, model, enc = _saved(tiny_base, tmp_path)
    monkeypatch.setattr(hub, "save_file", fail)
    with pytest.raises(OztuneError) as e:
        save_classifier(model, enc, out, {0: "x", 1: "y"}, run={"save": 2})
    assert str(e.value) == f"{out}: cannot be written ({why}); what was there is kept as it was"
    _assert_kept(out, tmp_path)


def test_an_unwritable_file_of_the_tokenizer_is_named_too(tiny_base, tmp_path, monkeypatch):
    out, model, enc = _saved(tiny_base, tmp_path)

    def refused(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(out.parent / ".m.tmp-x" / "tokenizer.json"))

    monkeypatch.setattr(enc, "save", refused)
    with pytest.raises(OztuneError, match=r"m: cannot be written \(Permission denied, .*tokenizer.json\)"):
        save_classifier(model, enc, out, {0: "x", 1: "y"}, run={"save": 2})
    _assert_kept(out, tmp_path)


def test_a_new_output_whose_folder_cannot_be_made_is_one_error(tiny_base, tmp_path):
    model, enc, _ = load_classifier(tiny_base, num_labels=2)
    (tmp_path / "file").write_text("")
    with pytest.raises(OztuneError, match=r"file/m: cannot be written \(File exists, .*file\); nothing was written"):
        save_classifier(model, enc, tmp_path / "file" / "m", {0: "x", 1: "y"})


def test_finetune_over_the_file_size_limit_is_one_line_and_exit_2(tiny_base, sentiment_files, tmp_path, capsys):
    # safetensors writes in Rust: a full disk was its own SafetensorError, a traceback
    out, _, _ = _saved(tiny_base, tmp_path)
    train, _ = sentiment_files
    capsys.readouterr()
    with files_limited_to(20_000):  # the weights are about 90 kB
        code = cli.main(["finetune", "--model", str(tiny_base), "--train", str(train), "--output", str(out),
                         "--epochs", "1", "--max-train-examples", "32", "--precision", "fp32", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err == f"oztune finetune: error: {out}: cannot be written (File too large, model.safetensors); " \
                  "what was there is kept as it was\n"
    _assert_kept(out, tmp_path)


def test_a_checkpoint_over_the_file_size_limit_is_one_error_and_leaves_no_partial_write(tmp_path):
    # torch.save writes in C++: a full disk was a RuntimeError ("unexpected pos 704 vs 598"), a traceback
    from oztune.train.distributed import DistEnv

    ck = Checkpointer(tmp_path / "ck", every=1, keep=2, fingerprint={})
    model = torch.nn.Linear(64, 64)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ck.save_run(model, opt, sched, Progress(step=1), DistEnv())
    with files_limited_to(10_000):  # the weights alone are 16 kB
        with pytest.raises(OztuneError, match=rf"cannot write a checkpoint to {tmp_path / 'ck'}: .*File too large"):
            ck.save_run(model, opt, sched, Progress(step=2), DistEnv())
    assert [p.name for p in (tmp_path / "ck").iterdir()] == ["step-00000001"]
    assert ck.newest_valid() == tmp_path / "ck" / "step-00000001"
