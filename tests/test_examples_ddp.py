"""The torchrun example of docs/how-to/torchrun.md (examples/top_eigenvalue_ddp.py) runs as written with 2 gloo
processes on CPU, and both ranks print the eigenvalues one process computes over all the samples."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import smoothness

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "top_eigenvalue_ddp.py"


def test_torchrun_example_equals_one_process(tmp_path):
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(SCRIPT), "--cpu",
                          "--samples", "1024"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    found = re.findall(r"rank (\d)/2: top (\w+) eigenvalue ([\d.]+) over 1024 samples", out.stdout)
    assert sorted((r, k) for r, k, _ in found) == [("0", "ggn"), ("0", "hessian"), ("1", "ggn"), ("1", "hessian")]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(1024, 1, 28, 28, generator=g), torch.randint(0, 10, (1024,), generator=g)
    chunks = [(x[i:i + 256], y[i:i + 256]) for i in range(0, 1024, 256)]
    for rank, kind, value in found:
        one = smoothness.top_eigenvalues(model, F.cross_entropy, chunks, k=1, kind=kind).values[0]
        assert float(value) == pytest.approx(one, rel=1e-4), (rank, kind)
