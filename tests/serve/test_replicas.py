"""How `oztune serve` sizes its model replicas and forward passes from the options."""

from __future__ import annotations

import pytest

from oztune.serve import commands
from oztune.serve.commands import ServeArgs, forward_batch, replicas


@pytest.fixture
def cores(monkeypatch):
    def set_cores(n: int):
        monkeypatch.setattr("oztune.serve.backends.default_threads", lambda: n)
    return set_cores


@pytest.mark.parametrize("n, want", [(1, (1, 1)), (2, (2, 1)), (8, (4, 2)), (16, (4, 4))])
def test_default_is_one_replica_per_core_up_to_four(cores, n, want):
    cores(n)
    assert replicas(ServeArgs(model="m"), processes=True) == want
    assert replicas(ServeArgs(model="m", backend="onnx"), processes=False) == want


def test_explicit_workers_and_threads_win_and_torch_in_process_has_one_replica(cores):
    cores(8)
    assert replicas(ServeArgs(model="m", workers=3), processes=True) == (3, 2)
    assert replicas(ServeArgs(model="m", workers=2, threads=1), processes=True) == (2, 1)
    assert replicas(ServeArgs(model="m", workers=3, worker_process=False), processes=False) == (1, 8)


def test_forward_passes_whole_batches_for_torch_and_eight_for_onnx():
    assert forward_batch(ServeArgs(model="m", max_batch_size=32)) == 32
    assert forward_batch(ServeArgs(model="m", backend="onnx")) == 8
    assert forward_batch(ServeArgs(model="m", forward_batch_size=0, max_batch_size=16)) == 16
    assert forward_batch(ServeArgs(model="m", backend="onnx", forward_batch_size=4)) == 4


def test_negative_workers_is_refused():
    from oztune.errors import OztuneError

    with pytest.raises(OztuneError, match="--workers -1"):
        commands._check(ServeArgs(model="m", workers=-1))


def test_the_onnx_backend_runs_on_the_threads_asked_for(tiny_finetuned):
    """--threads N sets onnxruntime's intra-op threads (the backend ran on 1 whatever was asked)."""
    from oztune.serve.backends import load_backend

    clf = load_backend(str(tiny_finetuned), "onnx", threads=2)
    assert clf.session.get_session_options().intra_op_num_threads == 2
