"""oztune.runtime: the allocator settings apply once on glibc Linux and can be turned off; Contention measures
the CPU other processes take while a block runs."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from oztune.runtime import Contention

CHECK = "from oztune.runtime import tune_malloc; print(tune_malloc(), tune_malloc())"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tune_malloc_applies_once_and_is_idempotent():
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "True"]


def test_tune_malloc_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("OZTUNE_TUNE_MALLOC", "0")
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def stat_text(ticks: dict[int, int]) -> str:
    """/proc/stat with ``ticks`` of user time on each cpu (and idle time, which is not busy)."""
    lines = [f"cpu  {sum(ticks.values())} 0 0 999 0 0 0 0 0 0"]
    lines += [f"cpu{n} {t} 0 0 999 5 0 0 0 0 0" for n, t in ticks.items()]
    return "\n".join(lines + ["intr 12345 0", "ctxt 99"]) + "\n"


class Clock:
    """Stands in for the time module: process time and wall time go as set."""

    def __init__(self):
        self.process, self.wall = 0.0, 100.0

    def process_time(self):
        return self.process

    def perf_counter(self):
        return self.wall


def test_contention_counts_the_busy_time_of_this_process_cores_less_its_own(tmp_path, monkeypatch):
    stat, clock, tick = tmp_path / "stat", Clock(), os.sysconf("SC_CLK_TCK")
    monkeypatch.setattr("oztune.runtime.time", clock)
    stat.write_text(stat_text({0: 1000, 1: 1000, 7: 0}))
    load = Contention(threads=2, stat=str(stat))
    load.cpus = {0, 1}
    with load:  # 2 s of wall time; cpus 0 and 1 busy 3 s together, 1 s of it this process's; cpu 7 is not ours
        stat.write_text(stat_text({0: 1000 + 2 * tick, 1: 1000 + tick, 7: 50 * tick}))
        clock.process += 1.0
        clock.wall += 2.0
    assert load.others == pytest.approx(1.0)  # (3 - 1) s / 2 s
    assert load.busy  # both cores are the timing's own: any other core's worth is contention
    load.threads = 1  # a timing on one thread leaves a core idle: others may take it, not more
    assert not load.busy
    load.others = 1.3
    assert load.busy


def test_contention_is_unknown_where_the_cpu_times_cannot_be_read(tmp_path):
    (tmp_path / "odd").write_text("\ncpu0 1 2 x 4 5 6 7 8\n")  # a blank line, a field that is no number
    for stat in (tmp_path / "missing", tmp_path / "odd"):
        with Contention(threads=1, stat=str(stat)) as load:
            load.cpus = {0}
        assert load.others is None and not load.busy


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/stat")
def test_contention_sees_a_process_that_spins_beside_it():
    spin = "import time\nt = time.time()\nwhile time.time() - t < 2: pass"
    proc = subprocess.Popen([sys.executable, "-c", spin])
    try:
        time.sleep(0.3)  # (started)
        with Contention(threads=len(os.sched_getaffinity(0))) as load:
            time.sleep(1)
    finally:
        proc.wait()
    assert load.others is not None and load.others > 0.5, load.others
    assert load.busy


def test_contention_counts_the_child_processes_waited_for_as_its_own(tmp_path, monkeypatch):
    """A benchmark's server or fresh training processes are its own work, not contention, once waited for."""
    stat, clock, tick = tmp_path / "stat", Clock(), os.sysconf("SC_CLK_TCK")
    children = [0.0]
    monkeypatch.setattr("oztune.runtime.time", clock)
    monkeypatch.setattr(os, "times", lambda: os.times_result((0.0, 0.0, children[0], 0.25, 0.0)))
    stat.write_text(stat_text({0: 1000, 1: 1000}))
    load = Contention(threads=2, stat=str(stat))
    load.cpus = {0, 1}
    assert load.start() is load  # (start/stop: the with block's two halves, for a long block)
    # 2 s: both cores busy throughout; this process 0.5 s of it, a child it waited for 1.25 s
    stat.write_text(stat_text({0: 1000 + 2 * tick, 1: 1000 + 2 * tick}))
    clock.process += 0.5
    children[0] = 1.25  # user; its system time stays at 0.25, counted before and after alike
    clock.wall += 2.0
    load.stop()
    assert load.others == pytest.approx((4 - 0.5 - 1.25) / 2)
