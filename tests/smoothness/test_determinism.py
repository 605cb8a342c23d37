"""Estimates are deterministic functions of the weights even when a module draws random numbers.

The model is a tiny float64 ConvNet with Santurkar's noisy BatchNorm (`experiments.normalization.NoisyBatchNorm`, the
toolkit's `noisy` norm), which draws fresh noise on every train-mode forward from torch's global generator. Before
the fix, every forward inside an estimator drew new noise: two identical calls differed, a line probe's gradient
difference did not vanish as the step went to 0, and estimators advanced the caller's generator.
"""
from __future__ import annotations

import dataclasses
import inspect

import numpy as np
import pytest
import torch
from torch import nn

import smoothness
from experiments.normalization import NoisyBatchNorm
from smoothness import _rng

DT = torch.float64


class NoisyConvNet(nn.Module):
    def __init__(self, norm: nn.Module | None = None):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = norm if norm is not None else NoisyBatchNorm(4)
        self.head = nn.Linear(4 * 3 * 3, 3)

    def forward(self, x):
        return self.head(torch.relu(nn.functional.max_pool2d(self.bn(self.conv(x)), 2)).flatten(1))


class NumpyNoise(nn.Module):
    """A stochastic layer drawing from numpy's global generator, which the estimators cannot seed."""

    def __init__(self, scale: float = 0.1):
        super().__init__()
        self.scale = scale

    def forward(self, x):
        noise = torch.as_tensor(np.random.standard_normal(x.shape), dtype=x.dtype)
        return x + self.scale * noise if self.training else x


def noisy_model(seed: int = 0, norm: nn.Module | None = None) -> nn.Module:
    torch.manual_seed(seed)
    return NoisyConvNet(norm).to(DT)


def batch(n: int = 10, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 6, 6, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)


def halves(b):
    """Two minibatch units (per-example units are undefined with train-mode BatchNorm)."""
    return [(b[0][:5], b[1][:5]), (b[0][5:], b[1][5:])]


def ce(outputs, targets):
    return nn.functional.cross_entropy(outputs, targets)


def direction(model, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in model.named_parameters()}


# How to call each public estimator. The coverage test below fails when an estimator is added to smoothness.__all__
# without an entry here, so no public function escapes the RNG guarantees.
CALLS = {
    "loss_and_gradient": lambda m, b: smoothness.loss_and_gradient(m, ce, b),
    "line_probe": lambda m, b: smoothness.line_probe(m, ce, b, [0.01, 0.1]),
    "local_lipschitz": lambda m, b: smoothness.local_lipschitz(m, ce, b, direction(m)),
    "hvp": lambda m, b: smoothness.hvp(m, ce, b, direction(m)),
    "top_eigenvalues": lambda m, b: smoothness.top_eigenvalues(m, ce, b, k=2, tol=1e-3),
    "hessian_trace": lambda m, b: smoothness.hessian_trace(m, ce, b, n_probes=4),
    "directional_curvature": lambda m, b: smoothness.directional_curvature(m, ce, b, direction(m)),
    "internal_covariate_shift": lambda m, b: smoothness.internal_covariate_shift(m, ce, b, lr=0.1),
    "random_direction": lambda m, b: smoothness.random_direction(m, generator=torch.Generator().manual_seed(5)),
    "loss_surface": lambda m, b: smoothness.loss_surface(m, ce, b, [direction(m)], [np.linspace(-0.5, 0.5, 3)],
                                                         bn_mode="batch"),
    "interpolation": lambda m, b: smoothness.interpolation(
        m, ce, b, {n: p.detach() for n, p in m.named_parameters()},
        {n: p.detach() + d for (n, p), d in zip(m.named_parameters(), direction(m).values())}, [0.0, 0.5, 1.0],
        bn_mode="running", bn_stats="recompute"),
    "spectral_density": lambda m, b: smoothness.spectral_density(m, ce, b, n_probes=2, n_steps=6),
    "gradient_concentration": lambda m, b: smoothness.gradient_concentration(m, ce, b, 2),
    "preconditioned_top_eigenvalues": lambda m, b: smoothness.preconditioned_top_eigenvalues(
        m, ce, b, {n: 1.0 + p.detach().abs() for n, p in m.named_parameters()}, k=2),
    "worst_case_sharpness": lambda m, b: smoothness.worst_case_sharpness(m, ce, b, rho=0.05, n_steps=3),
    "average_case_sharpness": lambda m, b: smoothness.average_case_sharpness(
        m, ce, b, rho=0.05, n_samples=3, generator=torch.Generator().manual_seed(5)),
    "epsilon_sharpness": lambda m, b: smoothness.epsilon_sharpness(m, ce, b, n_steps=3),
    "pacbayes_flatness": lambda m, b: smoothness.pacbayes_flatness(
        m, ce, b, n_samples=2, n_bisections=3, generator=torch.Generator().manual_seed(5)),
    "pacbayes_mag_flatness": lambda m, b: smoothness.pacbayes_mag_flatness(
        m, ce, b, n_samples=2, n_bisections=3, generator=torch.Generator().manual_seed(5)),
    "relative_flatness": lambda m, b: smoothness.relative_flatness(m, ce, b),
    "distance_to_init": lambda m, b: smoothness.distance_to_init(m, {n: p.detach() * 0.5
                                                                     for n, p in m.named_parameters()}),
    "spectral_product": lambda m, b: smoothness.spectral_product(m),
    "path_norm": lambda m, b: smoothness.path_norm(m, (2, 6, 6)),
    "curvature_operator": lambda m, b: smoothness.curvature_operator(m, ce, b, kind="ggn").matvec(direction(m)),
    "gradient_noise": lambda m, b: smoothness.gradient_noise(m, ce, halves(b), unit="batch", edges=[-1.0, 0.0, 1.0],
                                                             directions={"d": direction(m)}),
    "gradient_histogram": lambda m, b: smoothness.gradient_histogram(m, ce, halves(b), unit="batch"),
    "step_quality": lambda m, b: smoothness.step_quality(m, ce, halves(b), direction(m), unit="batch"),
    "observe_line": lambda m, b: smoothness.observe_line(m, ce, halves(b), direction(m), unit="batch"),
    "step_quality_from": lambda m, b: smoothness.step_quality_from(
        *(smoothness.observe_line(m, ce, halves(b), direction(m, seed), unit="batch") for seed in (3, 4)), 0.5),
    "tic": lambda m, b: smoothness.tic(m, ce, b, bn_mode="running"),
}


def test_every_public_estimator_is_covered():
    public = {name for name in smoothness.__all__ if inspect.isfunction(getattr(smoothness, name))}
    assert public == set(CALLS), f"add the new estimators to CALLS: {sorted(public ^ set(CALLS))}"


def same(a, b) -> bool:
    """Exact equality of estimator results: floats, tuples, dicts of tensors, frozen dataclasses."""
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b, equal_nan=True)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if dataclasses.is_dataclass(a):
        return same(dataclasses.astuple(a), dataclasses.astuple(b))
    return a == b


def rng_states() -> list[torch.Tensor]:
    states = [torch.get_rng_state()]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states += torch.cuda.get_rng_state_all()
    return states


@pytest.mark.parametrize("name", sorted(CALLS))
def test_estimator_leaves_caller_rng_untouched_and_repeats_exactly(name):
    model, b = noisy_model(), batch()
    torch.manual_seed(123)
    before = rng_states()
    first = CALLS[name](model, b)
    after = rng_states()
    assert all(torch.equal(x, y) for x, y in zip(before, after)), f"{name} advanced the caller's generator"
    torch.manual_seed(456)  # the caller's seed must not matter either: the estimator seeds its own draws
    second = CALLS[name](model, b)
    assert same(first, second), f"two identical {name} calls differ"


def test_noise_is_still_applied_inside_estimators():
    """Fixing the draws must not switch the noise off: the noisy loss differs from plain BatchNorm's at the same
    weights, and equals the loss of one explicit forward that starts from the documented seed."""
    noisy = noisy_model()
    plain = noisy_model()
    plain.bn = nn.BatchNorm2d(4).to(DT)
    plain.load_state_dict(noisy.state_dict())
    b = batch()
    noisy_loss, _ = smoothness.loss_and_gradient(noisy, ce, b)
    plain_loss, _ = smoothness.loss_and_gradient(plain, ce, b)
    assert abs(noisy_loss - plain_loss) > 1e-3
    by_hand = noisy_model().train()  # same weights; a fresh copy, as a train-mode forward moves running stats
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(smoothness.ESTIMATOR_SEED)
        expected = float(ce(by_hand(b[0]), b[1]))
    assert noisy_loss == pytest.approx(expected, rel=1e-12)


def test_line_probe_gradient_difference_vanishes_as_the_step_does():
    """With the same draws at w and at w + s·d, ‖∇L(w + s·d) − ∇L(w)‖ / (s‖d‖) -> ‖H d‖ / ‖d‖ as s -> 0, H the
    Hessian of the loss with those draws (`hvp` uses the same seed). Before the fix it grew like 1/s (β ~ 1e8 at
    s = 1e-8): the noise, not the step, made the difference."""
    model, b = noisy_model(), batch()
    d = direction(model)
    probe = smoothness.line_probe(model, ce, b, [1e-9, 1e-7, 1e-5], direction=d)
    hd = smoothness.hvp(model, ce, b, d)
    limit = float(torch.sqrt(sum((t ** 2).sum() for t in hd.values()))) / probe.direction_norm
    ratios = [g / r for g, r in zip(probe.grad_diff_norms, probe.distances)]
    assert 0 < limit < 1e3
    for ratio in ratios:
        assert ratio == pytest.approx(limit, rel=1e-4)
    assert probe.grad_diff_norms[0] < 1e-6  # the difference itself goes to 0


def test_own_generator_is_refused_and_named():
    """A module seeding its own torch.Generator escapes the fixed seed: refuse, naming the module, on the line-probe
    path and on the Hessian path."""
    model = noisy_model(norm=NoisyBatchNorm(4, generator=torch.Generator().manual_seed(0)))
    for call in (CALLS["line_probe"], CALLS["top_eigenvalues"], CALLS["loss_and_gradient"]):
        with pytest.raises(smoothness.NondeterministicLossError) as error:
            call(model, batch())
        message = str(error.value)
        assert "bn (NoisyBatchNorm) draws from its own torch.Generator" in message
        assert "bn_mode='batch'" in message and "bn_mode='running'" in message
    # in eval mode noisy BatchNorm adds no noise: the same model is fine there
    smoothness.line_probe(model, ce, batch(), [0.01], bn_mode="running")


def test_numpy_randomness_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), NumpyNoise(), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    x = torch.randn(8, 5, dtype=DT)
    y = torch.arange(8) % 3
    with pytest.raises(smoothness.NondeterministicLossError, match="numpy"):
        smoothness.local_lipschitz(model, ce, (x, y), direction(model))


def test_rounding_level_differences_pass_and_real_noise_does_not():
    """The tolerance (DETERMINISM_RTOL = 1e-5, relative) separates kernel rounding noise from randomness."""
    torch.manual_seed(0)
    for scale, refused in ((1e-12, False), (1e-3, True)):
        model = nn.Sequential(nn.Linear(5, 4), NumpyNoise(scale), nn.Tanh(), nn.Linear(4, 3)).to(DT)
        x, y = torch.randn(8, 5, dtype=DT), torch.arange(8) % 3
        if refused:
            with pytest.raises(smoothness.NondeterministicLossError):
                smoothness.loss_and_gradient(model, ce, (x, y))
        else:
            smoothness.loss_and_gradient(model, ce, (x, y))


def count_forwards(model) -> list:
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_check_runs_once_per_model_and_again_when_it_changes():
    """The check costs one extra pass at the first estimate on a model; later estimates skip it, until the model
    runs in another mode, precision or module tree (here: a module gains its own generator, and is refused)."""
    model, b = noisy_model(), batch()
    forwards = count_forwards(model)
    u = direction(model)
    smoothness.local_lipschitz(model, ce, b, u)
    assert len(forwards) == 3  # w, w again (the check), w + u
    smoothness.local_lipschitz(model, ce, b, u)
    assert len(forwards) == 5
    smoothness.local_lipschitz(model, ce, b, u, bn_mode="running")
    assert len(forwards) == 8  # a new mode is checked
    model.bn.generator = torch.Generator().manual_seed(1)
    with pytest.raises(smoothness.NondeterministicLossError, match="bn .NoisyBatchNorm."):
        smoothness.local_lipschitz(model, ce, b, u)
    model.bn.generator = None
    smoothness.local_lipschitz(model, ce, b, u)


def test_caller_generator_restored_when_the_estimator_fails():
    model = noisy_model(norm=NoisyBatchNorm(4, generator=torch.Generator().manual_seed(0)))
    torch.manual_seed(7)
    before = torch.get_rng_state()
    with pytest.raises(smoothness.NondeterministicLossError):
        smoothness.loss_and_gradient(model, ce, batch())
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_generator_fixed_and_restored():
    """On a GPU the noise is drawn by the device's generator: it is seeded for each evaluation and restored, and the
    float32 model passes the check despite nondeterministic cuDNN kernels."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = NoisyConvNet().to(device)
    x, y = batch()
    b = (x.float().to(device), y.to(device))
    torch.cuda.manual_seed(99)
    before = torch.cuda.get_rng_state(device)
    cpu_before = torch.get_rng_state()
    first = smoothness.line_probe(model, ce, b, [1e-3, 1e-2])
    second = smoothness.line_probe(model, ce, b, [1e-3, 1e-2])
    assert torch.equal(torch.cuda.get_rng_state(device), before) and torch.equal(torch.get_rng_state(), cpu_before)
    assert first.losses == pytest.approx(second.losses, rel=1e-6)
    assert first.grad_diff_norms == pytest.approx(second.grad_diff_norms, rel=1e-4)


def test_fixed_rng_seeds_and_restores_the_cpu_generator():
    torch.manual_seed(5)
    before = torch.get_rng_state()
    with _rng.fixed_rng([torch.device("cpu")]):
        inside = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(inside, torch.rand(3, generator=torch.Generator().manual_seed(_rng.ESTIMATOR_SEED)))


class FunctionalDropoutNet(nn.Module):
    """Dropout through F.dropout in forward: no nn.Dropout module for the estimators to switch off."""

    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(6, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(nn.functional.dropout(torch.tanh(self.hidden(x)), 0.5, training=self.training))


def test_functional_dropout_is_refused_and_nn_dropout_named():
    torch.manual_seed(0)
    model = FunctionalDropoutNet().to(DT)
    g = torch.Generator().manual_seed(1)
    b = torch.randn(20, 6, generator=g, dtype=DT), torch.randint(0, 3, (20,), generator=g)
    with pytest.raises(smoothness.NondeterministicLossError, match=r"nn\.Dropout"):
        smoothness.top_eigenvalues(model, ce, b)
    with pytest.raises(smoothness.NondeterministicLossError, match=r"F\.dropout"):
        smoothness.loss_and_gradient(model, ce, b)
    # in eval mode (bn_mode="running") the function does not drop: the loss is deterministic and accepted
    assert smoothness.top_eigenvalues(model, ce, b, bn_mode="running").values[0] > 0
    # nn.Dropout modules are switched off, so they pass (and noisy BatchNorm, drawing from the seeded generator, too)
    with_module = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 3)).to(DT)
    smoothness.top_eigenvalues(with_module, ce, b)
