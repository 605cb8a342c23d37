"""spectral_density (stochastic Lanczos quadrature) against exact spectra: diagonal quadratics where every node and
weight is known, and dense float64 Hessians of tiny BatchNorm networks in both BN modes."""
import importlib
import math

import numpy as np
import pytest
import torch
from scipy.linalg import eigh_tridiagonal
from scipy.stats import wasserstein_distance
from torch import nn

import smoothness as sm
hvp_module = importlib.import_module("smoothness.hvp")  # the package exports the function `hvp` under that name

DT = torch.float64


class Diagonal(nn.Module):
    """L(w) = ½ Σ λ_i w_i² through a per-sample output: the Hessian is diag(λ) in any bn_mode."""

    def __init__(self, n, seed=0):
        super().__init__()
        self.w = nn.Parameter(torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=DT))

    def forward(self, x):
        return self.w.unsqueeze(0).expand(x.shape[0], -1)


def diagonal_problem(eigenvalues, seed=0):
    lam = torch.as_tensor(eigenvalues, dtype=DT)
    model = Diagonal(len(lam), seed)

    def loss_fn(outputs, targets):
        return 0.5 * ((outputs - targets) ** 2 * lam).sum(dim=1).mean()

    batch = (torch.zeros(3, 1, dtype=DT), torch.zeros(3, len(lam), dtype=DT))
    return model, loss_fn, batch


def w1(result, eigenvalues):
    nodes, weights = result.measure()
    return wasserstein_distance(nodes, np.asarray(eigenvalues), u_weights=weights)


# -- exact answers on quadratics -----------------------------------------------------------------------------------
def test_repeated_eigenvalues_give_exact_nodes_and_weights():
    """diag(λ) with Rademacher probes: (u_iᵀv)² = 1/n, so each distinct eigenvalue is a node of weight
    multiplicity/n, and Lanczos breaks down after as many steps as there are distinct eigenvalues."""
    model, loss_fn, batch = diagonal_problem([1.0] * 5 + [2.0] * 3 + [10.0] * 2)
    out = sm.spectral_density(model, loss_fn, batch, n_probes=3, n_steps=10)
    assert out.n_probes == 3 and out.n_params == 10 and out.n_steps == 10 and out.batch_size == 3
    for nodes, weights in zip(out.nodes, out.weights):
        np.testing.assert_allclose(nodes, [1.0, 2.0, 10.0], rtol=1e-12)
        np.testing.assert_allclose(weights, [0.5, 0.3, 0.2], rtol=1e-12)
    assert out.n_hvp == 3 * 3, "each probe stops at breakdown, after 3 products"
    assert w1(out, [1.0] * 5 + [2.0] * 3 + [10.0] * 2) < 1e-12


def test_gauss_quadrature_matches_moments_up_to_degree_2m_minus_1():
    """m steps give a Gauss rule: Σ τ θ^k = vᵀH^k v / n exactly for k <= 2m−1 (here = tr(H^k)/n for every
    Rademacher probe of a diagonal H), and not beyond."""
    lam = np.linspace(0.5, 3.0, 30) ** 1.5
    model, loss_fn, batch = diagonal_problem(lam)
    m = 5
    out = sm.spectral_density(model, loss_fn, batch, n_probes=2, n_steps=m)
    assert all(len(nodes) == m for nodes in out.nodes)
    for nodes, weights in zip(out.nodes, out.weights):
        nodes, weights = np.array(nodes), np.array(weights)
        for k in range(2 * m):
            assert np.sum(weights * nodes ** k) == pytest.approx(np.mean(lam ** k), rel=1e-10), k
        assert abs(np.sum(weights * nodes ** (2 * m)) / np.mean(lam ** (2 * m)) - 1) > 1e-6
    assert out.moment(1) == pytest.approx(lam.mean(), rel=1e-12)


def naive_lanczos(diag, v, m):
    """Three-term Lanczos without reorthogonalisation: the textbook recurrence that peers start from."""
    q, q_prev, alphas, betas = v / v.norm(), torch.zeros_like(v), [], []
    for j in range(m):
        w = diag * q
        alphas.append(float(w @ q))
        w = w - alphas[-1] * q - (betas[-1] * q_prev if betas else 0.0)
        if j == m - 1:
            break
        betas.append(float(w.norm()))
        q_prev, q = q, w / betas[-1]
    theta, s = eigh_tridiagonal(np.array(alphas), np.array(betas))
    return theta, s[0] ** 2


def test_no_ghost_copies_of_an_outlier():
    """A bulk in [0, 1] and one outlier at 50: after 120 steps plain Lanczos has lost orthogonality and found the
    outlier many times over; full reorthogonalisation finds it once, with its exact weight 1/n."""
    n, m = 400, 120
    lam = np.concatenate([np.linspace(0.0, 1.0, n - 1), [50.0]])
    v = (torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(0)) * 2 - 1).to(DT)
    theta, _ = naive_lanczos(torch.as_tensor(lam), v, m)
    assert np.sum(theta > 25) >= 5, "the setting must be hard enough to make plain Lanczos produce ghosts"
    model, loss_fn, batch = diagonal_problem(lam)
    out = sm.spectral_density(model, loss_fn, batch, n_probes=2, n_steps=m)
    for nodes, weights in zip(out.nodes, out.weights):
        nodes, weights = np.array(nodes), np.array(weights)
        assert np.sum(nodes > 25) == 1
        assert nodes[-1] == pytest.approx(50.0, rel=1e-12)
        assert weights[-1] == pytest.approx(1 / n, rel=1e-9)
        assert np.all((nodes[:-1] > -1e-9) & (nodes[:-1] < 1 + 1e-9)), "no spurious nodes between bulk and outlier"


def test_n_steps_is_capped_at_the_dimension():
    lam = np.arange(1.0, 8.0)
    model, loss_fn, batch = diagonal_problem(lam)
    out = sm.spectral_density(model, loss_fn, batch, n_probes=1, n_steps=50)
    np.testing.assert_allclose(out.nodes[0], lam, rtol=1e-10)
    assert out.n_hvp == 7


# -- dense Hessians of BatchNorm networks --------------------------------------------------------------------------
CASES = [(kind, bn_mode) for kind in ("mlp", "conv") for bn_mode in sm.BN_MODES]


@pytest.fixture(scope="module", params=CASES, ids=[f"{k}-{b}" for k, b in CASES])
def case(request):
    ref = request.getfixturevalue("ref")
    kind, bn_mode = request.param
    model = ref.make_model(kind)
    batch = ref.make_batch(model, n=12)
    loss_fn = nn.CrossEntropyLoss()
    eigenvalues = np.linalg.eigvalsh(ref.dense_hessian(model, loss_fn, batch, bn_mode).numpy())
    return model, loss_fn, batch, bn_mode, eigenvalues


def test_wasserstein_to_exact_spectrum_shrinks_with_probes_and_steps(case):
    """W1 between the quadrature measure and the exact eigenvalue measure falls as probes and steps grow, to under
    1% of the spectrum's width (the tiny networks have 221 and 255 parameters)."""
    model, loss_fn, batch, bn_mode, eigenvalues = case
    spread = eigenvalues[-1] - eigenvalues[0]
    distances = [w1(sm.spectral_density(model, loss_fn, batch, n_probes=p, n_steps=m, bn_mode=bn_mode), eigenvalues)
                 for p, m in [(1, 4), (3, 12), (8, 40)]]
    assert distances[0] > 1.5 * distances[1] > 2.25 * distances[2], distances
    assert distances[2] < 0.01 * spread, (distances, spread)


def test_first_two_moments_are_unbiased(case):
    """Averaged over probes, Σ τ θ → tr(H)/n and Σ τ θ² → tr(H²)/n (Hutchinson with Rademacher probes)."""
    model, loss_fn, batch, bn_mode, eigenvalues = case
    out = sm.spectral_density(model, loss_fn, batch, n_probes=40, n_steps=2, bn_mode=bn_mode,
                              generator=torch.Generator().manual_seed(5))
    for k in (1, 2):
        per_probe = np.array([np.sum(np.array(w) * np.array(x) ** k) for x, w in zip(out.nodes, out.weights)])
        stderr = per_probe.std(ddof=1) / math.sqrt(len(per_probe))
        assert abs(per_probe.mean() - np.mean(eigenvalues ** k)) < 4 * stderr
        assert out.moment(k) == pytest.approx(per_probe.mean(), rel=1e-12)


def test_bn_modes_give_different_spectra(ref):
    model = ref.make_model("mlp")
    batch = ref.make_batch(model, n=12)
    loss_fn = nn.CrossEntropyLoss()
    batch_mode = sm.spectral_density(model, loss_fn, batch, n_probes=1, n_steps=20, bn_mode="batch")
    running = sm.spectral_density(model, loss_fn, batch, n_probes=1, n_steps=20, bn_mode="running")
    assert batch_mode.bn_mode == "batch" and running.bn_mode == "running"
    assert abs(batch_mode.nodes[0][-1] - running.nodes[0][-1]) > 0.1


def test_linearized_products_give_the_same_density(ref, monkeypatch):
    """The linearized Hessian (torch.func.linearize) and the retained double-backward graph agree to float64
    rounding, in both BN modes; the tiny conv model takes the retained route unless forced."""
    model = ref.make_model("conv")
    batch = ref.make_batch(model, n=12)
    loss_fn = nn.CrossEntropyLoss()
    for bn_mode in sm.BN_MODES:
        retained = sm.spectral_density(model, loss_fn, batch, n_probes=2, n_steps=30, bn_mode=bn_mode)
        monkeypatch.setattr(hvp_module, "LINEARIZE_MIN_CONV_FLOPS", {"cpu": 0.0})
        calls = []
        real = hvp_module.LinearizedHessianOperator

        class Spy(real):
            def __init__(self, objective):
                calls.append(objective.bn_mode)
                super().__init__(objective)

        monkeypatch.setattr(hvp_module, "LinearizedHessianOperator", Spy)
        before = ref.snapshot(model)
        linearized = sm.spectral_density(model, loss_fn, batch, n_probes=2, n_steps=30, bn_mode=bn_mode)
        ref.assert_same_snapshot(before, model)
        monkeypatch.undo()
        assert calls == [bn_mode]
        assert (retained.product, linearized.product) == ("double-backward", "linearize")
        for a, b in zip(retained.nodes + retained.weights, linearized.nodes + linearized.weights):
            np.testing.assert_allclose(a, b, rtol=1e-7, atol=1e-10)


def test_a_device_type_without_a_measurement_keeps_the_double_backward(ref, monkeypatch):
    """The linearize threshold is per device type; where none was measured, PyHessian's product runs."""
    model = ref.make_model("conv")
    batch = ref.make_batch(model, n=12)
    monkeypatch.setattr(hvp_module, "LINEARIZE_MIN_CONV_FLOPS", {"cuda": 0.0})
    out = sm.spectral_density(model, nn.CrossEntropyLoss(), batch, n_probes=1, n_steps=5)
    assert out.product == "double-backward"
    monkeypatch.setattr(hvp_module, "LINEARIZE_MIN_CONV_FLOPS", {"cpu": 0.0})
    assert sm.spectral_density(model, nn.CrossEntropyLoss(), batch, n_probes=1, n_steps=5).product == "linearize"


def test_conv_flops_do_not_count_the_first_use_determinism_check(ref):
    """The linearize choice depends on the model and batch shape only. Failed before: the first estimator on a model
    counted the determinism check's forward and backward passes too (about 7x the FLOPs of one forward pass)."""
    from smoothness._objective import Objective
    model = ref.make_model("conv")
    batch = ref.make_batch(model, n=12)
    first = hvp_module._conv_flops(Objective(model, nn.CrossEntropyLoss(), batch))
    again = hvp_module._conv_flops(Objective(model, nn.CrossEntropyLoss(), batch))
    expected = []   # 2 x (multiply-adds per output element) x output elements, per convolution
    hooks = [m.register_forward_hook(lambda m, i, o: expected.append(2 * m.weight[0].numel() * o.numel()))
             for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(batch[0])
    for h in hooks:
        h.remove()
    assert len(expected) == 2 and first == again == sum(expected)


class Untraceable(nn.Module):
    """A conv model that writes to a tensor attribute in its forward: torch.func refuses to trace it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.calls = torch.zeros(())

    def forward(self, x):
        self.calls.add_(1)
        return self.conv(x).mean(dim=(2, 3))


def test_untraceable_model_falls_back_to_double_backward(monkeypatch):
    torch.manual_seed(0)
    model = Untraceable().to(DT)
    batch = (torch.randn(6, 1, 5, 5, dtype=DT), torch.tensor([0, 1, 0, 1, 1, 0]))
    monkeypatch.setattr(hvp_module, "LINEARIZE_MIN_CONV_FLOPS", {"cpu": 0.0})
    out = sm.spectral_density(model, nn.CrossEntropyLoss(), batch, n_probes=1, n_steps=5)
    monkeypatch.undo()
    assert out.product == "double-backward"
    expected = sm.spectral_density(model, nn.CrossEntropyLoss(), batch, n_probes=1, n_steps=5)
    np.testing.assert_allclose(out.nodes[0], expected.nodes[0], rtol=1e-10)


# -- the result ----------------------------------------------------------------------------------------------------
def test_density_is_the_normalised_gaussian_mixture():
    result = sm.DensityResult(nodes=((0.0, 2.0), (1.0,)), weights=((0.25, 0.75), (1.0,)), n_params=3, n_steps=2,
                              n_hvp=3, bn_mode="batch", batch_size=4)
    grid = np.linspace(-3.0, 5.0, 4001)
    sigma = 0.3

    def gauss(mu):
        return np.exp(-0.5 * ((grid - mu) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))

    expected = 0.5 * (0.25 * gauss(0.0) + 0.75 * gauss(2.0)) + 0.5 * gauss(1.0)
    np.testing.assert_allclose(result.density(grid, sigma), expected, rtol=1e-12)
    assert np.trapezoid(result.density(grid, sigma), grid) == pytest.approx(1.0, abs=1e-6)
    nodes, weights = result.measure()
    np.testing.assert_allclose(nodes, [0.0, 1.0, 2.0])
    np.testing.assert_allclose(weights, [0.125, 0.5, 0.375])


@pytest.mark.parametrize("sigma", [0.0, -1.0, float("nan"), float("inf"), True, "0.1"])
def test_bad_sigma(sigma):
    result = sm.DensityResult(nodes=((0.0,),), weights=((1.0,),), n_params=1, n_steps=1, n_hvp=1, bn_mode="batch",
                              batch_size=1)
    with pytest.raises(ValueError, match="sigma must be a positive finite number"):
        result.density([0.0, 1.0], sigma)


@pytest.mark.parametrize("grid", [[], [[0.0, 1.0]], [0.0, float("nan")]])
def test_bad_grid(grid):
    result = sm.DensityResult(nodes=((0.0,),), weights=((1.0,),), n_params=1, n_steps=1, n_hvp=1, bn_mode="batch",
                              batch_size=1)
    with pytest.raises(ValueError, match="grid must be a non-empty 1-D array"):
        result.density(grid, 0.1)


def test_result_checks_its_lists():
    with pytest.raises(ValueError, match="same number"):
        sm.DensityResult(nodes=((0.0,),), weights=(), n_params=1, n_steps=1, n_hvp=1, bn_mode="batch", batch_size=1)
    with pytest.raises(ValueError, match="probe 0: 2 nodes but 1 weights"):
        sm.DensityResult(nodes=((0.0, 1.0),), weights=((1.0,),), n_params=2, n_steps=2, n_hvp=2, bn_mode="batch",
                         batch_size=1)


# -- determinism, restoration, bad input ---------------------------------------------------------------------------
def test_deterministic_and_seeded_by_generator(ref):
    model = ref.make_model("mlp")
    batch = ref.make_batch(model, n=12)
    loss_fn = nn.CrossEntropyLoss()
    a = sm.spectral_density(model, loss_fn, batch, n_probes=2, n_steps=8)
    b = sm.spectral_density(model, loss_fn, batch, n_probes=2, n_steps=8)
    c = sm.spectral_density(model, loss_fn, batch, n_probes=2, n_steps=8, generator=torch.Generator().manual_seed(1))
    assert a == b
    assert a.nodes != c.nodes


@pytest.mark.parametrize("bn_mode", sm.BN_MODES)
@pytest.mark.parametrize("start", ["train", "eval"])
def test_model_restored_bit_for_bit(ref, bn_mode, start):
    model = ref.make_model("conv")
    model.train() if start == "train" else model.eval()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    batch = ref.make_batch(model, n=12)
    before = ref.snapshot(model)
    sm.spectral_density(model, nn.CrossEntropyLoss(), batch, n_probes=2, n_steps=6, bn_mode=bn_mode)
    ref.assert_same_snapshot(before, model)


@pytest.mark.parametrize("name,value", [("n_probes", 0), ("n_probes", -1), ("n_probes", 1.5), ("n_probes", True),
                                        ("n_steps", 0), ("n_steps", None), ("n_steps", "10")])
def test_bad_counts(ref, name, value):
    model = ref.make_model("mlp")
    with pytest.raises(ValueError, match=f"{name} must be a positive int"):
        sm.spectral_density(model, nn.CrossEntropyLoss(), ref.make_batch(model), **{name: value})


def test_bad_batch_and_mode(ref):
    model = ref.make_model("mlp")
    batch = ref.make_batch(model)
    with pytest.raises(ValueError, match="unknown bn_mode"):
        sm.spectral_density(model, nn.CrossEntropyLoss(), batch, bn_mode="train")
    with pytest.raises(ValueError, match="batch is empty"):
        sm.spectral_density(model, nn.CrossEntropyLoss(), (batch[0][:0], batch[1][:0]))
    with pytest.raises(TypeError, match="batch must"):
        sm.spectral_density(model, nn.CrossEntropyLoss(), batch[0])


def test_non_finite_loss(ref):
    model = ref.make_model("mlp")
    with torch.no_grad():
        model.net[-1].bias[0] = float("nan")
    with pytest.raises(sm.NonFiniteLossError, match="not finite"):
        sm.spectral_density(model, nn.CrossEntropyLoss(), ref.make_batch(model), n_probes=1, n_steps=3)
