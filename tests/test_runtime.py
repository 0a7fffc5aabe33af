"""oztune.runtime: the allocator settings apply once on glibc Linux and can be turned off."""

from __future__ import annotations

import subprocess
import sys

import pytest

CHECK = "from oztune.runtime import tune_malloc; print(tune_malloc(), tune_malloc())"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tune_malloc_applies_once_and_is_idempotent():
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "True"]


def test_tune_malloc_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("OZTUNE_TUNE_MALLOC", "0")
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
