"""Host allocator tuning for XLA:CPU: keep freed memory mapped so big buffers are not re-faulted.

XLA:CPU allocates each program's outputs and temporaries with `malloc`. glibc serves every block
over 32 MiB (and, from the non-main arenas XLA's worker threads use, every block over 64 MiB) with a
fresh `mmap` and returns it with `munmap` when freed, so each training step touches all of its big
buffers (logits, activations, gradients) for the first time again: one page fault per 4 KiB, about
1 ms per MiB here. On the SFT benchmark that was a quarter of the step. `tune()` tells glibc to
serve all blocks from the main heap (one arena, no mmap), to grow it in 512 MiB steps and never to
trim it: memory freed by a step is reused by the next without faults. Resident memory then stays at
its high-water mark, as with any caching allocator.

It runs when the package is imported (before JAX starts its threads, which matters for the arena
setting), only on Linux with glibc and only when no GPU/TPU device node is visible (on accelerator
hosts the big buffers live on the device). `SFTRL_MALLOC_TUNING=1` forces it on, `=0` off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import sys

# mallopt parameters, from glibc's malloc.h.
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX, M_ARENA_MAX = -1, -2, -4, -8

_ACCELERATOR_NODES = ("/dev/nvidia[0-9]*", "/dev/accel[0-9]*", "/dev/vfio/[0-9]*")
_applied: bool | None = None


def wanted() -> bool:
    """Whether `tune()` should act here (see the module docstring)."""
    flag = os.environ.get("SFTRL_MALLOC_TUNING", "auto").strip().lower()
    if flag in ("0", "false", "off", "no"):
        return False
    if not sys.platform.startswith("linux"):
        return False
    if flag in ("1", "true", "on", "yes"):
        return True
    return not any(glob.glob(pattern) for pattern in _ACCELERATOR_NODES)


def tune() -> bool:
    """Apply the glibc settings once; returns whether they are in effect."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if not wanted():
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    settings = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1), (M_TOP_PAD, 512 << 20))
    _applied = all(mallopt(param, value) == 1 for param, value in settings)
    return _applied
