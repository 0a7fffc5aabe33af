"""Process-wide settings that make PyTorch's eager CPU mode faster.

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
