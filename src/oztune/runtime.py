"""Process-wide settings that make PyTorch's eager CPU mode faster, and a check of the machine's load
(:class:`Contention`) for the commands that time models.

glibc's allocator hands large freed blocks (anything above its mmap threshold, 128 KiB at first) back
to the operating system and maps fresh pages for the next allocation of the same size, so every
training step and every batch page-faults its weight casts, gradients and activations back in: about
10% of a MiniLM training step on a 2-core CPU (bench/profile_step.py). Raising the mmap and trim
thresholds keeps those blocks in the process for reuse, as jemalloc or tcmalloc would, without
preloading a second allocator. The cost: the process keeps its peak heap instead of shrinking.

Set ``OZTUNE_TUNE_MALLOC=0`` to leave the allocator alone.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time

_M_TRIM_THRESHOLD = -1  # glibc mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 256 << 20  # blocks up to 256 MiB come from the reusable heap
TRIM_THRESHOLD = 1 << 30  # return free heap memory to the OS only above 1 GiB
_done: bool | None = None


def tune_malloc() -> bool:
    """Keep freed memory for reuse (glibc on Linux only; once per process). Returns whether it applied."""
    global _done
    if _done is None:
        _done = False
        if sys.platform.startswith("linux") and os.environ.get("OZTUNE_TUNE_MALLOC", "1") != "0":
            try:
                libc = ctypes.CDLL("libc.so.6")
                _done = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
                    libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
            except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tune
                _done = False
    return _done


def usable_cpus() -> set[int]:
    """The CPUs this process may run on (its affinity; every CPU where the OS does not say)."""
    if hasattr(os, "sched_getaffinity"):
        return os.sched_getaffinity(0)
    return set(range(os.cpu_count() or 1))


def _busy_seconds(cpus: set[int], stat: str = "/proc/stat") -> float | None:
    """Seconds the ``cpus`` have been busy since boot (user, nice, system, irq, softirq and steal: time the
    hypervisor gave this VM's cores to other guests) from Linux's ``/proc/stat``; None where it cannot be read."""
    try:
        with open(stat) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    ticks = 0
    for name, *fields in (line.split() for line in lines if line.strip()):
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus and len(fields) >= 8:
            try:
                user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
            except ValueError:  # (not the layout this reads)
                return None
            ticks += user + nice + system + irq + softirq + steal
    return ticks / os.sysconf("SC_CLK_TCK") if ticks else None


def _own_seconds() -> float:
    """CPU seconds of this process (every thread) and of the child processes it has waited for."""
    t = os.times()
    return time.process_time() + t.children_user + t.children_system


class Contention:
    """How much CPU other processes took while a block ran, on the cores this process may run on: ``others``,
    in cores (1.5: one and a half cores' worth of the block's wall time), None where it cannot be known (not
    Linux). Timings taken while others compete for the cores are slower than on a quiet machine, and one
    variant timed in a busy spell can look slower than another timed in a quiet one: ``busy`` says when the
    others took more than the cores the timed work left idle (``threads`` of its own), by a quarter of a core.

    This process's own CPU time counts every thread of it and the child processes it waited for inside the
    block (a benchmark's server or fresh training processes); children still running at the end count as others.

    ``with Contention(threads) as c: ...`` then ``c.others``, ``c.busy``; or ``c = Contention(threads).start()``,
    ``...``, ``c.stop()`` around a long block.
    """

    SLACK = 0.25  # cores: the background of an idle machine stays under it

    def __init__(self, threads: int, stat: str = "/proc/stat"):
        self.threads, self.stat = threads, stat
        self.cpus = usable_cpus()
        self.others: float | None = None

    def start(self) -> Contention:
        self._start = (_busy_seconds(self.cpus, self.stat), _own_seconds(), time.perf_counter())
        return self

    def stop(self) -> None:
        busy, own, wall = _busy_seconds(self.cpus, self.stat), _own_seconds(), time.perf_counter()
        busy0, own0, wall0 = self._start
        if busy is not None and busy0 is not None and wall > wall0:
            self.others = max(0.0, ((busy - busy0) - (own - own0)) / (wall - wall0))

    def __enter__(self) -> Contention:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def busy(self) -> bool:
        return self.others is not None and self.others > max(0, len(self.cpus) - self.threads) + self.SLACK
