"""CPU memory: :func:`tune_cpu_allocator` raises glibc malloc's mmap and trim thresholds for this process, so freed
activations are reused instead of being returned to the kernel and zero-filled again at every Hessian-vector product.
It changes no number; the library never calls it on its own. Details: docs/smoothness.md.
"""
from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3   # glibc's malloc.h
MMAP_THRESHOLD = 256 << 20    # allocations below this come from (and return to) the process's heap
TRIM_THRESHOLD = 512 << 20    # freed memory kept at the top of the heap before any is given back


def user_settings() -> bool:
    """Whether the environment already says how malloc should behave (then it is left alone)."""
    return bool(os.environ.get("MALLOC_MMAP_THRESHOLD_") or os.environ.get("MALLOC_TRIM_THRESHOLD_")
                or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""))


def tune_cpu_allocator() -> bool:
    """Raise glibc malloc's mmap and trim thresholds for this process (see the module docstring); returns whether
    it did (False: not Linux with glibc, or the environment already sets them). Calling it again is harmless."""
    if not sys.platform.startswith("linux") or user_settings():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
        gnu = ctypes.CDLL(None).gnu_get_libc_version   # glibc only: musl's mallopt does nothing
    except (OSError, AttributeError):
        return False
    del gnu
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
