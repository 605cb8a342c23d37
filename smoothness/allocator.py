"""CPU memory: let a process keep the memory of freed tensors instead of handing it back to the kernel each time.

glibc's malloc serves an allocation above its mmap threshold (which its dynamic rule never raises beyond 32 MiB)
with fresh pages from the kernel and returns them on free; every such page is zero-filled at its first touch (a
minor page fault). A Hessian-vector product on 1,000 FashionMNIST images allocates and frees activations of about
50 MB each, so every product faults in 24,000-74,000 pages anew, in PyHessian's product as much as in ours; tuned,
none, and a product takes 8-24% less CPU time (benchmarks/results/density-products.md and
density-products-default-allocator.md). GPU tensors are not concerned (PyTorch's CUDA caching allocator keeps its
blocks), nor are small batches (below the threshold malloc already reuses memory).

:func:`tune_cpu_allocator` raises the mmap threshold to ``MMAP_THRESHOLD`` and lets up to ``TRIM_THRESHOLD`` of
freed memory stay in the process. It changes no number (PyTorch aligns its CPU tensors itself), only where they
live; the price is that a process's resident memory stays near its peak until it exits. The library never calls it
on its own (it is process-wide): ``smoothness-lab`` calls it in every process it starts, and so can a script or a
notebook, once. Settings of your own win: nothing is changed when ``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_`` or a ``glibc.malloc`` entry of ``GLIBC_TUNABLES`` is set, or where there is no glibc.
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
