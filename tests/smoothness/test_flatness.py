"""PAC-Bayes σ against the quadratic's closed form; relative flatness against a dense Hessian (float64)."""
import pytest
import torch
from torch import nn

import smoothness as sm

DT = torch.float64
N = 10


def quadratic_at_minimum(ref):
    a = torch.tensor([4.0, 2.5, 2.0, 1.0, 0.7, 0.5, 0.3, 0.2, 0.1, 0.05], dtype=DT)
    w_star = torch.linspace(0.5, 2.0, N, dtype=DT) * torch.tensor([1, -1] * (N // 2), dtype=DT)
    model = ref.Quadratic(w_star)
    batch = (torch.zeros(4, 1, dtype=DT), w_star.expand(4, -1).clone())
    return model, ref.quadratic_loss(torch.diag(a)), batch, a, w_star


def test_pacbayes_sigma_on_a_quadratic(ref):
    """E ΔL = σ²/2·Σaᵢ, so σ* = √(2·target/Σaᵢ); with M common draws the estimate of Σaᵢ has relative standard
    deviation √(2Σaᵢ²/M)/Σaᵢ, and σ half of it."""
    model, loss_fn, batch, a, _ = quadratic_at_minimum(ref)
    target, m = 0.1, 64
    out = sm.pacbayes_flatness(model, loss_fn, batch, target=target, n_samples=m,
                               generator=torch.Generator().manual_seed(0))
    expected = (2 * target / float(a.sum())) ** 0.5
    rel_sd = 0.5 * (2 * float((a ** 2).sum()) / m) ** 0.5 / float(a.sum())
    assert abs(out.sigma / expected - 1) < 4 * rel_sd
    assert out.measure == pytest.approx(1 / out.sigma ** 2, rel=1e-12)
    # 12 bisections of a factor-10 bracket pin σ to 10^(1/4096), so ΔL ∝ σ² to 0.11%, from below
    assert target * (1 - 2e-3) <= out.increase <= target
    assert (out.magnitude_aware, out.eps, out.n_samples, out.target) == (False, None, m, target)


def test_pacbayes_mag_sigma_on_a_quadratic(ref):
    """uᵢ ~ N(0, σ²wᵢ² + ε²): E ΔL = ½ Σ aᵢ(σ²wᵢ² + ε²), so σ* = √((2·target − ε²Σaᵢ) / Σ aᵢwᵢ²)."""
    model, loss_fn, batch, a, w = quadratic_at_minimum(ref)
    target, eps = 0.1, 0.05
    out = sm.pacbayes_mag_flatness(model, loss_fn, batch, target=target, eps=eps, n_samples=64,
                                   generator=torch.Generator().manual_seed(1))
    expected = ((2 * target - eps ** 2 * float(a.sum())) / float((a * w ** 2).sum())) ** 0.5
    assert out.sigma == pytest.approx(expected, rel=0.15)
    assert out.magnitude_aware and out.eps == eps
    with pytest.raises(ValueError, match="lower eps"):
        sm.pacbayes_mag_flatness(model, loss_fn, batch, target=target, eps=0.2, n_samples=4,
                                 generator=torch.Generator().manual_seed(1))


def kappa_reference(ref, model, loss_fn, batch, bn_mode, layer):
    """Σ_{s,s'} ⟨w_s, w_s'⟩ Tr(H_{s,s'}) from the dense Hessian, by explicit loops."""
    H = ref.dense_hessian(model, loss_fn, batch, bn_mode)
    names = ref.trainable_names(model)
    params = dict(model.named_parameters())
    start = sum(params[n].numel() for n in names[:names.index(layer)])
    W = params[layer].detach().reshape(params[layer].shape[0], -1)
    m, d = W.shape
    block = H[start:start + m * d, start:start + m * d]
    total = 0.0
    for s in range(m):
        for t in range(m):
            trace = sum(float(block[s * d + j, t * d + j]) for j in range(d))
            total += float(W[s] @ W[t]) * trace
    return total


@pytest.mark.parametrize("bn_mode", sm.BN_MODES)
def test_relative_flatness_matches_the_dense_hessian(ref, bn_mode):
    model = ref.make_model("mlp")
    batch, loss_fn = ref.make_batch(model, n=12), nn.CrossEntropyLoss()
    out = sm.relative_flatness(model, loss_fn, batch, bn_mode=bn_mode)
    assert out.layer == "net.6.weight" and out.method == "exact" and out.n_hvp == 24
    assert out.product == "double-backward"   # an MLP: no convolution for the linearized product to save
    assert out.value == pytest.approx(kappa_reference(ref, model, loss_fn, batch, bn_mode, "net.6.weight"),
                                      rel=1e-10)
    est = sm.relative_flatness(model, loss_fn, batch, n_probes=300, bn_mode=bn_mode,
                               generator=torch.Generator().manual_seed(0))
    assert est.method == "hutchinson" and est.stderr > 0
    assert abs(est.value - out.value) < 4 * est.stderr


def test_relative_flatness_of_a_conv_layer(ref):
    model = ref.make_model("conv")
    batch, loss_fn = ref.make_batch(model, n=8), nn.CrossEntropyLoss()
    out = sm.relative_flatness(model, loss_fn, batch, layer="features.4.weight", bn_mode="running")
    assert out.value == pytest.approx(kappa_reference(ref, model, loss_fn, batch, "running", "features.4.weight"),
                                      rel=1e-10)
    with pytest.raises(ValueError, match="needs a weight matrix"):
        sm.relative_flatness(model, loss_fn, batch, layer="head.bias")
    with pytest.raises(ValueError, match="not a trainable parameter"):
        sm.relative_flatness(model, loss_fn, batch, layer="head.nope")


@pytest.mark.parametrize("bn_mode", sm.BN_MODES)
def test_pacbayes_runs_on_a_bn_network(ref, bn_mode):
    model = ref.make_model("conv")
    batch, loss_fn = ref.make_batch(model, n=8), nn.CrossEntropyLoss()
    out = sm.pacbayes_flatness(model, loss_fn, batch, n_samples=3, n_bisections=6, bn_mode=bn_mode,
                               generator=torch.Generator().manual_seed(0))
    mag = sm.pacbayes_mag_flatness(model, loss_fn, batch, n_samples=3, n_bisections=6, bn_mode=bn_mode,
                                   generator=torch.Generator().manual_seed(0))
    assert out.sigma > 0 and mag.sigma > 0 and out.increase <= 0.1 and mag.increase <= 0.1
    assert out.bn_mode == mag.bn_mode == bn_mode
