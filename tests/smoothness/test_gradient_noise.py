"""gradient_noise, gradient_histogram, step_quality and tic against brute-force float64 loops over units (each u_i
from its own backward pass on a copy of the model), METHODS.md §12."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from smoothness import gradient_histogram, gradient_noise, step_quality, tic

DT = torch.float64


def mlp(bn: bool = False, dtype=DT) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(4, 6)] + ([nn.BatchNorm1d(6)] if bn else []) + [nn.Tanh(), nn.Linear(6, 3)]
    model = nn.Sequential(*layers).to(dtype)
    if bn:  # running statistics away from (0, 1), so that the two modes differ
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    return model


def data(n: int = 12, dtype=DT, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


LOSS = nn.CrossEntropyLoss()


def unit_gradients(model, loss_fn, units, bn_mode, names=None):
    """m × n matrix of per-unit gradients, one backward each, on a fresh copy of the model (train mode for 'batch',
    eval mode for 'running'), with the per-unit losses."""
    rows, losses = [], []
    for x, y in units:
        m = copy.deepcopy(model)
        m.train(bn_mode == "batch")
        params = [p for n, p in m.named_parameters() if p.requires_grad and (names is None or n in names)]
        loss = loss_fn(m(x), y)
        grads = torch.autograd.grad(loss, params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]).double())
        losses.append(float(loss.detach()))
    return torch.stack(rows), torch.tensor(losses, dtype=DT)


def reference(u: torch.Tensor, b: int, eps: float = 1e-5) -> dict:
    m = u.shape[0]
    ubar = u.mean(0)
    g2 = float(ubar @ ubar)
    v = float(((u - ubar) ** 2).sum()) / (m - 1)
    p = u @ ubar
    var_p = float(((p - p.mean()) ** 2).sum()) / (m - 1)
    resid = u - (p / g2)[:, None] * ubar
    ortho = float((resid ** 2).sum()) / (m - 1)
    sigma2 = ((u - ubar) ** 2).mean(0)
    signal = g2 - v / m
    return dict(norm_test=math.sqrt(v / (m * g2)), inner_product_test=math.sqrt(var_p / (m * g2 ** 2)),
                orthogonality_test=math.sqrt(ortho / (m * g2)), gsnr=float((ubar ** 2 / (sigma2 + eps)).mean()),
                noise_scale=b * v / signal if signal > 0 else math.inf, gradient_norm=math.sqrt(g2), variance=v)


def check(result, ref, rtol=1e-10):
    for key, value in ref.items():
        assert getattr(result, key) == pytest.approx(value, rel=rtol), key


def examples(x, y):
    return [(x[i:i + 1], y[i:i + 1]) for i in range(x.shape[0])]


def minibatches(x, y, size):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, x.shape[0], size)]


# -- gradient_noise against the loop ---------------------------------------------------------------------------------
@pytest.mark.parametrize("bn, bn_mode", [(False, "batch"), (False, "running"), (True, "running")])
def test_example_units_match_loop(bn, bn_mode):
    model, (x, y) = mlp(bn), data()
    u, _ = unit_gradients(model, LOSS, examples(x, y), bn_mode)
    result = gradient_noise(model, LOSS, (x, y), bn_mode=bn_mode)
    check(result, reference(u, 1))
    assert (result.n_units, result.batch_size, result.unit, result.bn_mode) == (12, 1, "example", bn_mode)
    assert result.n_params == u.shape[1] and result.n_passes == 1


@pytest.mark.parametrize("bn, bn_mode", [(False, "batch"), (True, "batch"), (True, "running")])
def test_batch_units_match_loop(bn, bn_mode):
    model, (x, y) = mlp(bn), data(n=20)
    batches = minibatches(x, y, 4)
    u, _ = unit_gradients(model, LOSS, batches, bn_mode)
    result = gradient_noise(model, LOSS, batches, unit="batch", bn_mode=bn_mode)
    check(result, reference(u, 4))
    assert (result.n_units, result.batch_size, result.unit) == (5, 4, "batch")


def test_batch_units_with_bn_differ_between_modes():
    model, (x, y) = mlp(True), data(n=20)
    a = gradient_noise(model, LOSS, minibatches(x, y, 4), unit="batch", bn_mode="batch")
    b = gradient_noise(model, LOSS, minibatches(x, y, 4), unit="batch", bn_mode="running")
    assert abs(a.norm_test - b.norm_test) > 1e-3


def test_chunks_equal_one_batch():
    model, (x, y) = mlp(), data(n=13)
    one = gradient_noise(model, LOSS, (x, y))
    chunked = gradient_noise(model, LOSS, [(x[:5], y[:5]), (x[5:6], y[5:6]), (x[6:], y[6:])])
    assert chunked.n_passes == 2 and chunked.n_units == 13
    for key in ("norm_test", "inner_product_test", "orthogonality_test", "gsnr", "variance", "gradient_norm"):
        assert getattr(chunked, key) == pytest.approx(getattr(one, key), rel=1e-10), key


def test_float32_agrees_with_float64():
    x, y = data(n=32)
    r64 = gradient_noise(mlp(), LOSS, (x, y))
    r32 = gradient_noise(mlp(dtype=torch.float32), LOSS, (x.float(), y))
    for key in ("norm_test", "inner_product_test", "orthogonality_test", "gsnr", "gradient_norm"):
        assert getattr(r32, key) == pytest.approx(getattr(r64, key), rel=1e-4), key


def test_params_subset():
    model, (x, y) = mlp(), data()
    names = ["2.weight", "0.bias"]
    u, _ = unit_gradients(model, LOSS, examples(x, y), "batch", names=names)
    result = gradient_noise(model, LOSS, (x, y), params=names)
    check(result, reference(u, 1))
    assert result.n_params == 6 * 3 + 6
    with pytest.raises(ValueError, match="unknown parameter names"):
        gradient_noise(model, LOSS, (x, y), params=["nope"])


def test_noise_scale_inf_when_noise_drowns_signal():
    model = nn.Linear(1, 1, bias=False).double()
    nn.init.zeros_(model.weight)
    x, y = torch.ones(2, 1, dtype=DT), torch.tensor([[1.0], [-0.9]], dtype=DT)
    result = gradient_noise(model, nn.MSELoss(), (x, y))
    # u = (-2, 1.8): ‖ū‖² = 0.01 < V/m = 3.61
    assert result.noise_drowns_signal and result.noise_scale == math.inf
    assert result.gradient_norm == pytest.approx(0.1) and result.variance == pytest.approx(7.22)


def test_noise_scale_finite():
    model = nn.Linear(1, 1, bias=False).double()
    nn.init.zeros_(model.weight)
    x, y = torch.ones(4, 1, dtype=DT), torch.tensor([[1.0], [1.2], [0.8], [1.0]], dtype=DT)
    result = gradient_noise(model, nn.MSELoss(), (x, y))
    # u_i = -2 y_i: ū = -2, V = 4·Var(y) = 4·0.08/3
    v = 4 * 0.08 / 3
    assert not result.noise_drowns_signal
    assert result.noise_scale == pytest.approx(v / (4.0 - v / 4), rel=1e-12)


# -- refusals ---------------------------------------------------------------------------------------------------------
def test_example_units_with_batchnorm_in_batch_mode_refused():
    model, (x, y) = mlp(True), data()
    with pytest.raises(ValueError, match=r"unit='batch'.*bn_mode='running'"):
        gradient_noise(model, LOSS, (x, y))
    with pytest.raises(ValueError, match=r"unit='batch'.*bn_mode='running'"):
        step_quality(model, LOSS, (x, y), {n: torch.ones_like(p) for n, p in model.named_parameters()})


class BatchCentre(nn.Module):
    """Subtracts the batch mean: couples examples without any BatchNorm type or running statistics."""

    def forward(self, x):
        return x - x.mean(0, keepdim=True) if self.training else x


def test_unknown_coupling_module_caught_by_probe():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), BatchCentre(), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = data()
    with pytest.raises(ValueError, match=r"unit='batch'.*bn_mode='running'"):
        gradient_noise(model, LOSS, (x, y))
    gradient_noise(model, LOSS, (x, y), bn_mode="running")


def test_unequal_minibatches_refused():
    model, (x, y) = mlp(), data(n=10)
    with pytest.raises(ValueError, match="equal size"):
        gradient_noise(model, LOSS, minibatches(x, y, 4), unit="batch")
    with pytest.raises(ValueError, match="iterable of minibatches"):
        gradient_noise(model, LOSS, (x, y), unit="batch")
    with pytest.raises(ValueError, match="unknown unit"):
        gradient_noise(model, LOSS, (x, y), unit="sample")


def test_model_left_as_found():
    model, (x, y) = mlp(True), data(n=20)
    model[0].bias.requires_grad_(False)
    model[3].weight.grad = torch.full_like(model[3].weight, 3.0)
    model.train()
    model[1].eval()
    state = copy.deepcopy(model.state_dict())
    flags = [m.training for m in model.modules()]
    batches = minibatches(x, y, 5)
    step = {n: 0.1 * torch.ones_like(p) for n, p in model.named_parameters() if p.requires_grad}
    gradient_noise(model, LOSS, batches, unit="batch")
    gradient_noise(model, LOSS, (x, y), bn_mode="running", edges=[-1.0, 0.0, 1.0])
    step_quality(model, LOSS, batches, step, unit="batch")
    tic(model, LOSS, (x, y), bn_mode="running")
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert [m.training for m in model.modules()] == flags
    assert not model[0].bias.requires_grad and model[0].weight.requires_grad
    assert torch.equal(model[3].weight.grad, torch.full_like(model[3].weight, 3.0))
    assert model[0].weight.grad is None


# -- histogram --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("uniform", [True, False])
@pytest.mark.parametrize("unit", ["example", "batch"])
def test_histogram_matches_numpy(unit, uniform):
    model, (x, y) = mlp(), data(n=12)
    edges = np.linspace(-0.3, 0.3, 13) if uniform else np.array([-0.3, -0.1, -0.01, 0.0, 0.02, 0.25])
    units = examples(x, y) if unit == "example" else minibatches(x, y, 3)
    u, _ = unit_gradients(model, LOSS, units, "batch")
    hist = gradient_histogram(model, LOSS, (x, y) if unit == "example" else units, edges=edges, unit=unit)
    counts, _ = np.histogram(u.numpy().ravel(), bins=edges)   # differs only for an entry exactly at edges[-1]
    np.testing.assert_array_equal(hist.counts, counts)
    assert hist.below == int((u < edges[0]).sum()) and hist.above == int((u >= edges[-1]).sum())
    assert hist.clipped_counts.sum() == u.numel()
    same = gradient_noise(model, LOSS, (x, y) if unit == "example" else units, unit=unit, edges=edges).histogram
    np.testing.assert_array_equal(same.counts, counts)


# -- step quality -----------------------------------------------------------------------------------------------------
def linear_problem():
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(16, 3, generator=g, dtype=DT), torch.randn(16, 2, generator=g, dtype=DT)
    step = {"weight": 0.3 * torch.randn(2, 3, generator=g, dtype=DT), "bias": 0.3 * torch.randn(2, generator=g,
                                                                                                 dtype=DT)}
    return model, x, y, step


def exact_alpha(model, x, y, step):
    """α = t/t* − 1 for L(τ) = mean ‖r + τ d‖² / 2 (MSE averages over outputs too): t* = −Σ r·d / Σ d·d along ŝ."""
    with torch.no_grad():
        r = model(x) - y
        t = math.sqrt(sum(float((s ** 2).sum()) for s in step.values()))
        d = (x @ step["weight"].T + step["bias"]) / t
        t_star = -float((r * d).sum()) / float((d * d).sum())
    return t / t_star - 1, t


@pytest.mark.parametrize("scale", [0.2, 1.0, 3.0])
@pytest.mark.parametrize("unit", ["example", "batch"])
def test_alpha_exact_on_quadratic(unit, scale):
    model, x, y, step = linear_problem()
    step = {n: -scale * s.sign() * 0.5 for n, s in step.items()}
    with torch.no_grad():  # point the step downhill
        r = model(x) - y
        slope = float((r * (x @ step["weight"].T + step["bias"])).sum())
    if slope > 0:
        step = {n: -s for n, s in step.items()}
    alpha, t = exact_alpha(model, x, y, step)
    data_ = (x, y) if unit == "example" else minibatches(x, y, 4)
    result = step_quality(model, nn.MSELoss(), data_, step, unit=unit)
    assert result.alpha == pytest.approx(alpha, rel=1e-9, abs=1e-9)
    assert result.step_length == pytest.approx(t) and not result.concave


def test_step_quality_observations_match_loop():
    model, (x, y) = mlp(), data(n=12)
    torch.manual_seed(3)
    step = {n: 0.2 * torch.randn_like(p) for n, p in model.named_parameters()}
    t = math.sqrt(sum(float((s ** 2).sum()) for s in step.values()))
    result = step_quality(model, LOSS, (x, y), step)
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in moved.named_parameters():
            p.add_(step[n])
    shat = torch.cat([s.reshape(-1) for s in step.values()]).double() / t
    for end, net in enumerate((model, moved)):
        u, losses = unit_gradients(net, LOSS, examples(x, y), "batch")
        slopes = u @ shat
        assert result.losses[end] == pytest.approx(float(losses.mean()), rel=1e-12)
        assert result.slopes[end] == pytest.approx(float(slopes.mean()), rel=1e-10)
        assert result.loss_variances[end] == pytest.approx(float(losses.var()), rel=1e-10)
        assert result.slope_variances[end] == pytest.approx(float(slopes.var()), rel=1e-10)
    c, b, a = result.coefficients
    assert result.alpha == pytest.approx(-1.0 if a <= 0 else 2 * t / (-b / a) - 1)


def test_alpha_minus_one_when_concave():
    model, x, y, step = linear_problem()
    result = step_quality(model, lambda out, target: -nn.functional.mse_loss(out, target), (x, y), step)
    assert result.concave and result.alpha == -1.0


def test_step_quality_params_subset_and_bad_step():
    model, x, y, step = linear_problem()
    result = step_quality(model, nn.MSELoss(), (x, y), {"weight": step["weight"]}, params=["weight"])
    alpha, _ = exact_alpha(model, x, y, {"weight": step["weight"], "bias": torch.zeros(2, dtype=DT)})
    assert result.alpha == pytest.approx(alpha, rel=1e-9)
    with pytest.raises(ValueError, match="missing keys"):
        step_quality(model, nn.MSELoss(), (x, y), {"weight": step["weight"]})
    with pytest.raises(ValueError, match="all zeros"):
        step_quality(model, nn.MSELoss(), (x, y), {n: torch.zeros_like(s) for n, s in step.items()})


# -- TIC --------------------------------------------------------------------------------------------------------------
def dense_ggn_diagonal(model, x, y):
    params = dict(model.named_parameters())
    names = list(params)
    total = 0
    for i in range(x.shape[0]):
        def out(*ps):
            return torch.func.functional_call(model, dict(zip(names, ps)), (x[i:i + 1],)).reshape(-1)
        jac = torch.autograd.functional.jacobian(out, tuple(p.detach() for p in params.values()))
        j = torch.cat([a.reshape(a.shape[0], -1) for a in jac], dim=1)
        z = out(*[p.detach() for p in params.values()])
        hz = torch.autograd.functional.hessian(lambda o: LOSS(o.reshape(1, -1), y[i:i + 1]), z)
        total = total + torch.diagonal(j.T @ hz @ j)
    return total / x.shape[0]


@pytest.mark.parametrize("moment", ["centred", "uncentred"])
def test_tic_matches_dense(moment):
    model, (x, y) = mlp(), data(n=10)
    u, _ = unit_gradients(model, LOSS, examples(x, y), "batch")
    g = dense_ggn_diagonal(model, x, y)
    c = u.var(0) if moment == "centred" else (u ** 2).mean(0)
    result = tic(model, LOSS, [(x[:4], y[:4]), (x[4:], y[4:])], moment=moment)
    assert result.tic_diag == pytest.approx(float((c / (g + 1e-7)).sum()), rel=1e-9)
    assert result.tic_trace == pytest.approx(float(c.sum() / (g.sum() + 1e-7)), rel=1e-9)
    assert result.n_units == 10 and result.moment == moment


@pytest.mark.parametrize("unit", ["example", "batch"])
def test_lines_from_the_gradient_pass_equal_step_quality(unit):
    """Cockpit's protocol from parts: the start from gradient_noise's pass at w, the end from observe_line at w + s."""
    from smoothness import observe_line, step_quality_from
    model, (x, y) = mlp(), data(n=12)
    data_ = (x, y) if unit == "example" else minibatches(x, y, 3)
    torch.manual_seed(4)
    step = {n: 0.3 * torch.randn_like(p) for n, p in model.named_parameters()}
    direct = step_quality(model, LOSS, data_, step, unit=unit)
    start = gradient_noise(model, LOSS, data_, unit=unit, directions={"s": step}).lines["s"]
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in moved.named_parameters():
            p.add_(step[n])
    end = observe_line(moved, LOSS, data_, step, unit=unit)
    parts = step_quality_from(start, end, direct.step_length)
    for a, b in ((start, direct.start), (end, direct.end)):
        for key in ("loss", "loss_variance", "slope", "slope_variance"):
            assert getattr(a, key) == pytest.approx(getattr(b, key), rel=1e-10), key
    assert parts.alpha == pytest.approx(direct.alpha, rel=1e-8)


def test_chunks_with_a_summed_loss_refused():
    """Over several chunks ū comes from batched gradients first; a loss that is not a mean breaks that, loudly."""
    model, (x, y) = mlp(), data(n=12)
    summed = nn.CrossEntropyLoss(reduction="sum")
    with pytest.raises(ValueError, match="not the mean of per-example losses"):
        gradient_noise(model, summed, [(x[:6], y[:6]), (x[6:], y[6:])])
    one = gradient_noise(model, summed, (x, y))   # one batch: per-example gradients need no mean
    check(one, reference(unit_gradients(model, summed, examples(x, y), "batch")[0], 1))
