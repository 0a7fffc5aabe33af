"""Under torchrun the other ranks wait while rank 0 alone evaluates, measures, saves a model or a checkpoint.

gloo fails a collective after its process group's timeout (30 minutes by default), so a rank waiting at one
for rank 0's longer work alone (a large evaluation set, compress measuring many variants on CPU) used to crash
the run. Here the timeout is a few seconds (set by RUNNER, after joining: the ranks may start apart) and rank
0's work alone a few seconds longer than it; the run must still succeed. The training steps' collectives keep
the short timeout: the ranks reach them together.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

TIMEOUT_S, SOLO_S = 3, 5  # the process group's timeout; how much longer rank 0's every piece of work alone takes

RUNNER = textwrap.dedent("""
    import os
    import sys
    import time
    from datetime import timedelta

    import torch._dynamo  # noqa: F401  (the first optimizer step would import it, rank 1 seconds after rank 0 at times)
    import torch.distributed as dist

    import oztune.commands  # noqa: F401  (every command's module: their names are rebound below)
    import oztune.compress.commands  # noqa: F401
    import oztune.compress.report  # noqa: F401
    from oztune.cli import main
    from oztune.models import hub
    from oztune.train import checkpoint, loop

    timeout, solo = float(os.environ["TIMEOUT_S"]), float(os.environ["SOLO_S"])
    join = dist.init_process_group

    def join_with_a_short_timeout(*args, **kwargs):
        join(*args, **kwargs)
        dist.distributed_c10d._set_pg_timeout(timedelta(seconds=timeout))

    def slower(f):
        def slower_f(*args, **kwargs):
            time.sleep(solo)
            if os.environ.get("FAIL"):
                raise OSError("rank 0 failed at its work alone")
            return f(*args, **kwargs)
        return slower_f

    dist.init_process_group = join_with_a_short_timeout
    if os.environ["RANK"] == "0":  # (only rank 0 calls these: its work alone)
        checkpoint.Checkpointer.save = slower(checkpoint.Checkpointer.save)
        for name, f in (("evaluate", loop.evaluate), ("save_classifier", hub.save_classifier)):
            for m in list(sys.modules.values()):
                if getattr(m, "__name__", "").startswith("oztune") and getattr(m, name, None) is f:
                    setattr(m, name, slower(f))
    sys.exit(main(sys.argv[1:]))
""")


def torchrun(tmp_path, args: list[str], **env) -> tuple[subprocess.CompletedProcess, float]:
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER)
    start = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        str(runner), *map(str, args)], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "TIMEOUT_S": str(TIMEOUT_S), "SOLO_S": str(SOLO_S), **env})
    return r, time.perf_counter() - start


def finetune(base, files, out) -> list:
    """2 epochs of 3 steps, each evaluated, a checkpoint at step 4: rank 0 alone between collectives (the next
    is an all_reduce after the checkpoint), and at the end."""
    train, dev = files
    return ["finetune", "--model", base, "--train", train, "--eval", dev, "--output", out, "--epochs", "2",
            "--batch-size", "16", "--max-train-examples", "96", "--checkpoint-every", "4", "--precision", "fp32",
            "--no-progress"]


def prune(teacher, files, out) -> list:
    """Rank 0 evaluates the teacher before the first collective (the ranking), the student after the recovery."""
    train, dev = files
    return ["prune", "--model", teacher, "--train", train, "--eval", dev, "--output", out, "--structured",
            "--heads", "0.5", "--importance-batches", "2", "--epochs", "1", "--batch-size", "16",
            "--max-train-examples", "64", "--precision", "fp32", "--no-progress"]


def compress(teacher, files, out) -> list:
    """Rank 0 measures fp32 before the first recovery and each variant after it."""
    train, dev = files
    return ["compress", "--model", teacher, "--train", train, "--eval", dev, "--output", out, "--recipes", "prune",
            "--sizes", "0.5", "--epochs", "1", "--batch-size", "16", "--importance-batches", "2",
            "--max-train-examples", "64", "--precision", "fp32", "--no-progress"]


@pytest.mark.parametrize("command", [finetune, prune, compress])
def test_the_others_wait_for_rank_0_alone_past_the_process_groups_timeout(tiny_base, tiny_finetuned,
                                                                          sentiment_files, tmp_path, command):
    out = tmp_path / "out"
    model = tiny_base if command is finetune else tiny_finetuned
    r, _ = torchrun(tmp_path, command(model, sentiment_files, out))
    assert r.returncode == 0, r.stderr[-3000:]
    run = json.loads((out / ("report.json" if command is compress else "run.json")).read_text())
    assert run  # (written by rank 0, after the waits)


def test_a_failure_of_rank_0_alone_still_fails_the_run_at_once(tiny_base, sentiment_files, tmp_path):
    """The others wait for rank 0 without a deadline; when rank 0 fails, they do not wait on: torchrun ends
    them and reports the failure."""
    r, seconds = torchrun(tmp_path, finetune(tiny_base, sentiment_files, tmp_path / "out"), FAIL="1")
    assert r.returncode != 0
    assert "rank 0 failed at its work alone" in r.stderr
    assert seconds < 300, f"{seconds:.0f} s"
