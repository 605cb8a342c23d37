"""gradient_noise, step_quality and tic equal Cockpit's quantities on a network without BatchNorm (same batch, float64).

Cockpit (cockpit-for-pytorch, with BackPACK) pins ``setuptools<81`` and is not in the project's environment: the
test is skipped unless it imports (see benchmarks/bench_gradient_noise.py for the environment that has it)."""
from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    cockpit = pytest.importorskip("cockpit", reason="cockpit-for-pytorch is not installed (it needs setuptools<81 "
                                                    "and backpack-for-pytorch; see benchmarks/bench_gradient_noise.py)")
    backpack = pytest.importorskip("backpack")

from smoothness import gradient_noise, step_quality, tic  # noqa: E402
from smoothness.gradient_noise import DEFAULT_EDGES  # noqa: E402


def test_equal_to_cockpit():
    from cockpit import Cockpit, quantities as q
    from cockpit.utils.schedules import linear
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 5)).double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 5, (16,), generator=g)
    lr, loss_fn = 0.1, nn.CrossEntropyLoss()
    ours = copy.deepcopy(model)
    every = linear(1)
    qs = [q.NormTest(every), q.InnerTest(every), q.OrthoTest(every), q.MeanGSNR(every),
          q.TICDiag(every, curvature="diag_ggn_exact"), q.GradHist1d(every, bins=40, range=(-0.5, 0.5)),
          q.Alpha(every)]
    net = backpack.extend(model)
    bp_loss = backpack.extend(nn.CrossEntropyLoss())
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    cp = Cockpit(net.parameters(), quantities=qs)
    for step in range(2):   # the same batch twice: Cockpit's α then has its end point on our data
        opt.zero_grad()
        out = net(x)
        loss = bp_loss(out, y)
        with cp(step, info={"batch_size": 16, "individual_losses": nn.CrossEntropyLoss(reduction="none")(out, y),
                            "loss": loss, "optimizer": opt}):
            loss.backward(create_graph=cp.create_graph(step))
        opt.step()
    output = cp.get_output()[0]
    edges = np.linspace(-0.5, 0.5, 41)
    noise = gradient_noise(ours, loss_fn, (x, y), edges=edges)
    assert noise.norm_test == pytest.approx(output["NormTest"], rel=1e-10)
    assert noise.inner_product_test == pytest.approx(output["InnerTest"], rel=1e-10)
    assert noise.orthogonality_test == pytest.approx(output["OrthoTest"], rel=1e-10)
    assert noise.gsnr == pytest.approx(output["MeanGSNR"], rel=1e-10)
    np.testing.assert_array_equal(noise.histogram.clipped_counts, np.asarray(output["GradHist1d"]["hist"]))
    t = tic(ours, loss_fn, (x, y), moment="uncentred")
    assert t.tic_diag == pytest.approx(output["TICDiag"], rel=1e-9)
    grad = torch.autograd.grad(loss_fn(ours(x), y), list(ours.parameters()))
    step = {n: -lr * gr for (n, _), gr in zip(ours.named_parameters(), grad)}
    assert step_quality(ours, loss_fn, (x, y), step).alpha == pytest.approx(output["Alpha"], rel=1e-8)
    assert DEFAULT_EDGES[0] == -2.0 and len(DEFAULT_EDGES) == 101 and math.isclose(DEFAULT_EDGES[-1], 2.0)
