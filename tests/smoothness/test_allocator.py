"""smoothness.tune_cpu_allocator: memory of freed tensors stays in the process (no page faults per product), the
user's own malloc settings win, and numbers do not change."""
import ctypes
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]

# In a fresh process: a tensor as large as an activation of a 1,000-image Hessian product, allocated and freed again
# and again; prints whether the tuning applied, the page faults of the last rounds, and a checksum of a product.
CHILD = textwrap.dedent("""
    import resource, sys, torch
    from smoothness.allocator import tune_cpu_allocator
    applied = tune_cpu_allocator() if sys.argv[1] == "tune" else None
    torch.manual_seed(0)
    w = torch.randn(512, 512)
    def step():
        x = torch.randn(64 << 20 >> 2)        # 64 MiB: above glibc's largest dynamic mmap threshold (32 MiB)
        return float((x[:512 * 512].view(512, 512) @ w).sum())
    for _ in range(3):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        step()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    torch.manual_seed(1)
    a, b = torch.randn(300, 300), torch.randn(300, 300)
    print(applied, faults, repr(float((a @ b).sum())))
""")


def has_glibc() -> bool:
    try:
        return sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "gnu_get_libc_version")
    except OSError:
        return False


GLIBC = pytest.mark.skipif(not has_glibc(), reason="glibc's malloc: Linux with glibc only")


def run_child(mode, **env):
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True,
                         env={**{k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_"))},
                              "PYTHONPATH": str(ROOT), **env})
    applied, faults, checksum = out.stdout.split()
    return applied, int(faults), checksum


@GLIBC
def test_tuned_allocator_keeps_freed_memory_and_changes_no_number():
    applied, faults, checksum = run_child("tune")
    plain_applied, plain_faults, plain_checksum = run_child("plain")
    assert applied == "True" and plain_applied == "None"
    # 5 rounds of 64 MiB: untuned, every round faults its pages in anew (16k of 4 KiB; at least 32 even with
    # transparent huge pages); tuned, the memory is reused
    assert plain_faults >= 5 * 32
    assert faults * 20 <= plain_faults
    assert checksum == plain_checksum


@GLIBC
def test_settings_of_the_user_win():
    applied, faults, _ = run_child("tune", MALLOC_TRIM_THRESHOLD_="0")
    assert applied == "False"
    applied, _, _ = run_child("tune", GLIBC_TUNABLES="glibc.malloc.mmap_threshold=65536")
    assert applied == "False"


def test_workers_and_the_cli_tune_it(monkeypatch):
    """Every process smoothness-lab starts (and the CLI itself) calls it."""
    import torch
    from click.testing import CliRunner

    import smoothness.allocator as allocator
    from experiments.cli import main
    from experiments.executors import base
    calls = []
    monkeypatch.setattr(allocator, "tune_cpu_allocator", lambda: calls.append(1) or True)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(("threads", n)))
    base.prepare_worker(3)
    assert calls == [("threads", 3), 1]
    calls.clear()
    assert CliRunner().invoke(main, ["studies"]).exit_code == 0
    assert calls == [1]
