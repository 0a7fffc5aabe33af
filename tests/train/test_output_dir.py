"""An output directory that cannot be written is a one-line error before training starts, not after."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from oztune.errors import OztuneError
from oztune.train.finetune import check_output_dir


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
