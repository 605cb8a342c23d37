"""Every kind of curvature operator against curvlinops' (HessianLinearOperator, GGNLinearOperator,
EFLinearOperator, curvlinops-for-pytorch 3.x) on BatchNorm-free float64 models, whole and by block."""
import numpy as np
import pytest
import torch
from torch import nn

import smoothness as sm

curvlinops = pytest.importorskip("curvlinops", reason="curvlinops-for-pytorch is not installed (pip install "
                                                      "curvlinops-for-pytorch, in setup.cfg's dev extra)")
CURVLINOPS = {"hessian": curvlinops.HessianLinearOperator, "ggn": curvlinops.GGNLinearOperator,
              "empirical-fisher": curvlinops.EFLinearOperator}


def mlp_mse():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    g = torch.Generator().manual_seed(1)
    chunks = [(torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randn(n, 3, generator=g,
                                                                                 dtype=torch.float64))
              for n in (7, 5)]
    return model, nn.MSELoss(), chunks, ["2.weight", "0.bias"]


def conv_ce():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(3, 4, 3),
                          nn.Tanh(), nn.Flatten(), nn.Linear(4, 3)).double()
    g = torch.Generator().manual_seed(1)
    chunks = [(torch.randn(n, 2, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))
              for n in (6, 4)]
    return model, nn.CrossEntropyLoss(), chunks, ["3.weight"]


@pytest.mark.parametrize("setup", [mlp_mse, conv_ce], ids=["mlp-mse", "conv-ce"])
@pytest.mark.parametrize("kind", sm.KINDS)
def test_matches_curvlinops(setup, kind):
    model, loss_fn, chunks, block = setup()
    named = dict(model.named_parameters())
    x = np.random.default_rng(0).standard_normal((sum(p.numel() for p in named.values()), 2))
    for params in (None, block):
        names = list(named) if params is None else [n for n in named if n in params]
        theirs = CURVLINOPS[kind](model, loss_fn, [named[n] for n in names], chunks).to_scipy()
        ours = sm.curvature_operator(model, loss_fn, chunks, kind=kind, params=params).to_scipy()
        assert ours.shape == theirs.shape
        xb = x[:ours.shape[0]]
        expected = theirs @ xb
        if kind == "empirical-fisher" and isinstance(loss_fn, nn.MSELoss):
            # curvlinops normalises the mean-reduced MSE by N·C but takes each sample's gradient of the loss summed
            # over its C outputs: C times (1/N) Σᵢ gᵢgᵢᵀ with gᵢ the gradient of loss_fn on sample i alone
            expected = expected / chunks[0][1].shape[1]
        np.testing.assert_allclose(ours @ xb, expected, rtol=1e-10, atol=1e-12 * np.abs(expected).max())
