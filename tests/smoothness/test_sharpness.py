"""Worst-case, average-case and ε-sharpness against closed forms (linear and quadratic losses, float64)."""
import math

import pytest
import torch
from torch import nn

import smoothness as sm

DT = torch.float64
N = 10


def weights():
    w = torch.linspace(-1.5, 2.0, N, dtype=DT)
    w[3] = 0.0   # a zero weight: the adaptive ball cannot move it unless eta > 0
    return w


def linear_case(ref):
    """L(w) = c·w, built as the project builds quadratics: the model outputs w per sample."""
    c = torch.linspace(0.5, -2.0, N, dtype=DT) + 0.1
    model = ref.Quadratic(weights())
    loss_fn = lambda outputs, targets: (outputs @ c).mean()  # noqa: E731
    return model, loss_fn, (torch.zeros(4, 1, dtype=DT), torch.zeros(4, N, dtype=DT)), c


def quadratic_at_minimum(ref):
    """L(w) = ½ Σ aᵢ (wᵢ − w*ᵢ)² with w = w* (no zero weights, so every direction is free)."""
    a = torch.tensor([4.0, 2.5, 2.0, 1.0, 0.7, 0.5, 0.3, 0.2, 0.1, 0.05], dtype=DT)
    w_star = torch.linspace(0.5, 2.0, N, dtype=DT) * torch.tensor([1, -1] * (N // 2), dtype=DT)
    model = ref.Quadratic(w_star)
    batch = (torch.zeros(4, 1, dtype=DT), w_star.expand(4, -1).clone())
    return model, ref.quadratic_loss(torch.diag(a)), batch, a, w_star


@pytest.mark.parametrize("adaptive,norm", [(True, 2), (False, 2), (True, math.inf), (False, math.inf)])
def test_worst_case_of_a_linear_loss_is_exact(ref, adaptive, norm):
    model, loss_fn, batch, c = linear_case(ref)
    rho = 0.05
    t = weights().abs() if adaptive else torch.ones(N, dtype=DT)
    expected = rho * float(torch.linalg.vector_norm(t * c, ord=1 if norm == math.inf else 2))
    out = sm.worst_case_sharpness(model, loss_fn, batch, rho=rho, adaptive=adaptive, norm=norm, n_steps=5)
    assert out.value == pytest.approx(expected, rel=1e-10)
    assert out.start == "gradient" and out.increases[0] == pytest.approx(expected, rel=1e-10)  # the first step
    assert (out.rho, out.adaptive, out.norm, out.n_steps, out.n_passes) == (rho, adaptive, float(norm), 5, 6)
    assert out.bn_mode == "batch" and out.batch_size == 4


def test_eta_lets_zero_weights_move(ref):
    model, loss_fn, batch, c = linear_case(ref)
    rho, eta = 0.05, 0.01
    out = sm.worst_case_sharpness(model, loss_fn, batch, rho=rho, eta=eta, n_steps=3)
    assert out.value == pytest.approx(rho * float(torch.linalg.vector_norm((weights().abs() + eta) * c)), rel=1e-10)
    assert out.eta == eta


def test_epsilon_sharpness_of_a_linear_loss(ref):
    model, loss_fn, batch, c = linear_case(ref)
    eps = 1e-3
    base = float(weights() @ c)
    increase = eps * float(((weights().abs() + 1) * c).abs().sum())
    out = sm.epsilon_sharpness(model, loss_fn, batch, epsilon=eps, n_steps=3)
    assert out.value == pytest.approx(100 * increase / (1 + base), rel=1e-9)
    assert out.base_loss == pytest.approx(base, rel=1e-12)
    assert out.max_loss == pytest.approx(base + increase, rel=1e-12)


def test_worst_case_l2_at_a_quadratic_minimum_is_half_rho_squared_max_a(ref):
    """∇L(w*) = 0: the ascent starts from a random point of the sphere and must find the top direction."""
    model, loss_fn, batch, a, _ = quadratic_at_minimum(ref)
    rho = 0.1
    expected = rho ** 2 / 2 * float(a.max())
    out = sm.worst_case_sharpness(model, loss_fn, batch, rho=rho, adaptive=False, n_steps=40,
                                  generator=torch.Generator().manual_seed(1))
    assert out.start == "random"
    assert expected * 0.999 <= out.value <= expected * (1 + 1e-12)


def test_worst_case_linf_at_a_quadratic_minimum_is_a_corner(ref):
    model, loss_fn, batch, a, w_star = quadratic_at_minimum(ref)
    rho = 0.1
    expected = rho ** 2 / 2 * float((a * w_star ** 2).sum())   # adaptive box: |δᵢ| ≤ ρ|wᵢ|
    out = sm.worst_case_sharpness(model, loss_fn, batch, rho=rho, norm=math.inf, n_steps=5)
    assert out.value == pytest.approx(expected, rel=1e-10)


def test_average_case_at_a_quadratic_minimum(ref):
    """E ½ Σ aᵢ δᵢ² with δᵢ ~ N(0, ρ²wᵢ²) = ρ²/2 Σ aᵢwᵢ²; the standard error shrinks like 1/√n."""
    model, loss_fn, batch, a, w_star = quadratic_at_minimum(ref)
    rho = 0.2
    expected = rho ** 2 / 2 * float((a * w_star ** 2).sum())
    small = sm.average_case_sharpness(model, loss_fn, batch, rho=rho, n_samples=100,
                                      generator=torch.Generator().manual_seed(0))
    large = sm.average_case_sharpness(model, loss_fn, batch, rho=rho, n_samples=1600,
                                      generator=torch.Generator().manual_seed(1))
    for out in (small, large):
        assert abs(out.value - expected) < 4 * out.stderr
    assert 3.0 < small.stderr / large.stderr < 5.3
    plain = sm.average_case_sharpness(model, loss_fn, batch, rho=rho, adaptive=False, n_samples=400,
                                      generator=torch.Generator().manual_seed(2))
    assert abs(plain.value - rho ** 2 / 2 * float(a.sum())) < 4 * plain.stderr
    assert (plain.adaptive, plain.n_samples, plain.n_passes) == (False, 400, 401)


def test_same_generator_same_numbers_and_chunks_match_one_batch(ref):
    model = ref.make_model("mlp")
    x, y = ref.make_batch(model, n=12)
    chunks = [(x[:6], y[:6]), (x[6:], y[6:])]
    loss_fn = nn.CrossEntropyLoss()
    one = sm.average_case_sharpness(model, loss_fn, (x, y), rho=0.1, n_samples=5, bn_mode="running",
                                    generator=torch.Generator().manual_seed(3))
    two = sm.average_case_sharpness(model, loss_fn, chunks, rho=0.1, n_samples=5, bn_mode="running",
                                    generator=torch.Generator().manual_seed(3))
    assert two.value == pytest.approx(one.value, rel=1e-10) and two.batch_size == 12
    worst_one = sm.worst_case_sharpness(model, loss_fn, (x, y), rho=0.05, n_steps=6, bn_mode="running")
    worst_two = sm.worst_case_sharpness(model, loss_fn, chunks, rho=0.05, n_steps=6, bn_mode="running")
    assert worst_two.value == pytest.approx(worst_one.value, rel=1e-8)


@pytest.mark.parametrize("bn_mode", sm.BN_MODES)
def test_bn_networks_run_in_both_modes(ref, bn_mode):
    model = ref.make_model("conv")
    batch, loss_fn = ref.make_batch(model, n=8), nn.CrossEntropyLoss()
    worst = sm.worst_case_sharpness(model, loss_fn, batch, rho=0.05, n_steps=4, bn_mode=bn_mode)
    avg = sm.average_case_sharpness(model, loss_fn, batch, rho=0.05, n_samples=4, bn_mode=bn_mode,
                                    generator=torch.Generator().manual_seed(0))
    eps = sm.epsilon_sharpness(model, loss_fn, batch, n_steps=4, bn_mode=bn_mode)
    assert worst.value > 0 and eps.value > 0 and math.isfinite(avg.value)
    assert worst.bn_mode == avg.bn_mode == eps.bn_mode == bn_mode
    assert max(worst.increases) == worst.value


def test_bad_arguments_are_explained(ref):
    model, loss_fn, batch, _ = linear_case(ref)
    with pytest.raises(ValueError, match="norm must be 2 or float"):
        sm.worst_case_sharpness(model, loss_fn, batch, rho=0.1, norm=1)
    with pytest.raises(ValueError, match="rho must be positive"):
        sm.worst_case_sharpness(model, loss_fn, batch, rho=0.0)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        sm.average_case_sharpness(model, loss_fn, batch, rho=0.1, n_samples=4, generator=0)
    with pytest.raises(ValueError, match="n_samples must be an int >= 2"):
        sm.average_case_sharpness(model, loss_fn, batch, rho=0.1, n_samples=1, generator=torch.Generator())


def test_non_finite_perturbed_losses_are_reported_the_same_way_everywhere(ref):
    """A perturbed loss that is NaN or inf counts as +inf in every measure, with n_non_finite > 0 (before, the worst
    case skipped NaN iterates and reported the best finite one while the average case returned NaN)."""
    model, loss_fn, batch, _, _ = quadratic_at_minimum(ref)

    def blows_up(outputs, targets):   # NaN once a weight moves by more than 1 from w*
        loss = loss_fn(outputs, targets)
        return torch.where((outputs - targets).abs().max() > 1, torch.full_like(loss, math.nan), loss)

    gen = torch.Generator().manual_seed(0)
    worst = sm.worst_case_sharpness(model, blows_up, batch, rho=100.0, adaptive=False)
    average = sm.average_case_sharpness(model, blows_up, batch, rho=100.0, n_samples=4, generator=gen,
                                        adaptive=False)
    eps = sm.epsilon_sharpness(model, blows_up, batch, epsilon=10.0)
    for result in (worst, average, eps):
        assert result.value == math.inf and result.n_non_finite >= 1, result
    assert average.n_non_finite == 4 and math.isnan(average.stderr)
    assert worst.n_passes == 2 and worst.increases == (math.inf,)   # the ascent stops at the first blow-up
    # rho = 1e308 overflows the weights themselves: the same report
    assert sm.average_case_sharpness(model, loss_fn, batch, rho=1e308, n_samples=2,
                                     generator=torch.Generator().manual_seed(0)).value == math.inf
    # the PAC-Bayes search counts a blown-up loss as too large an increase: σ stays where the loss is finite
    pac = sm.pacbayes_flatness(model, blows_up, batch, generator=torch.Generator().manual_seed(0), target=1e6)
    assert pac.n_non_finite > 0 and math.isfinite(pac.increase) and pac.sigma < 1
    # finite everywhere: nothing counted
    assert sm.worst_case_sharpness(model, loss_fn, batch, rho=0.1).n_non_finite == 0
