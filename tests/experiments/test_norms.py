"""Tests for experiments/normalization.py: from-scratch BatchNorm vs torch, noisy BN, l_p norms, registry."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from experiments.normalization import (
    NORMS,
    BatchNorm,
    LpNorm,
    NoisyBatchNorm,
    batch_norm,
    make_norm,
)

C = 4
SHAPES = {"NC": (6, C), "NCL": (5, C, 3), "NCHW": (3, C, 2, 3)}


def _torch_bn(shape: tuple[int, ...], **kw) -> nn.Module:
    return nn.BatchNorm2d(C, **kw) if len(shape) == 4 else nn.BatchNorm1d(C, **kw)


def _randomise_affine(*mods: nn.Module, seed: int = 1) -> None:
    """Give every module the same non-trivial weight/bias so affine actually matters."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(C, generator=g, dtype=torch.float64) + 0.5
    b = torch.randn(C, generator=g, dtype=torch.float64)
    for m in mods:
        if m.weight is not None:
            with torch.no_grad():
                m.weight.copy_(w.to(m.weight.dtype))
                m.bias.copy_(b.to(m.bias.dtype))


def _assert_close(a, b, tol: float, what: str) -> None:
    if a is None or b is None:
        assert a is None and b is None, f"{what}: one is None ({a!r} vs {b!r})"
        return
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} vs {b.dtype}"
    assert a.shape == b.shape, f"{what}: shape {a.shape} vs {b.shape}"
    torch.testing.assert_close(a, b, atol=tol, rtol=tol, msg=lambda m: f"{what}: {m}")


def _step(ours, ref, x, g, tol, what, functional_state=None):
    """One forward/backward through our BN (module or functional) and torch's; compare all."""
    xa = x.clone().requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    if functional_state is None:
        out_a = ours(xa)
        params_a = (ours.weight, ours.bias)
    else:
        w, b, rm, rv, nbt = functional_state
        out_a = batch_norm(xa, rm, rv, w, b, training=ref.training, momentum=ref.momentum,
                           eps=ref.eps, num_batches_tracked=nbt)
        params_a = (w, b)
    out_b = ref(xb)
    _assert_close(out_a, out_b, tol, f"{what} output")
    for p in (*params_a, ref.weight, ref.bias):
        if p is not None:
            p.grad = None
    out_a.backward(g)
    out_b.backward(g)
    _assert_close(xa.grad, xb.grad, tol, f"{what} grad x")
    for pa, pb, name in zip(params_a, (ref.weight, ref.bias), ("weight", "bias")):
        if pb is None:
            assert pa is None
        else:
            _assert_close(pa.grad, pb.grad, tol, f"{what} grad {name}")


def _compare_buffers(rm, rv, nbt, ref, tol, what):
    _assert_close(rm, ref.running_mean, tol, f"{what} running_mean")
    _assert_close(rv, ref.running_var, tol, f"{what} running_var")
    if ref.num_batches_tracked is None:
        assert nbt is None
    else:
        assert nbt.dtype == torch.long and nbt.shape == ()
        assert int(nbt) == int(ref.num_batches_tracked), what


def _run_sequence(shape, affine, track, momentum, dtype, tol, functional: bool):
    torch.manual_seed(0)
    ref = _torch_bn(shape, affine=affine, track_running_stats=track, momentum=momentum).to(dtype)
    ours = BatchNorm(C, affine=affine, track_running_stats=track, momentum=momentum).to(dtype)
    _randomise_affine(ref, ours)
    state = None
    if functional:
        w = nn.Parameter(ours.weight.detach().clone()) if affine else None
        b = nn.Parameter(ours.bias.detach().clone()) if affine else None
        rm = torch.zeros(C, dtype=dtype) if track else None
        rv = torch.ones(C, dtype=dtype) if track else None
        nbt = torch.tensor(0, dtype=torch.long) if track else None
        state = (w, b, rm, rv, nbt)
    # 4 training steps on shifted/scaled batches (so running stats move), then 2 eval steps
    for i, training in enumerate([True] * 4 + [False] * 2):
        ref.train(training)
        ours.train(training)
        x = (torch.randn(shape, dtype=dtype) * (1.0 + i) + 0.5 * i)
        g = torch.randn(shape, dtype=dtype)
        what = f"shape={shape} affine={affine} track={track} mom={momentum} step={i}"
        _step(ours, ref, x, g, tol, what, state)
        if functional:
            _compare_buffers(state[2], state[3], state[4], ref, tol, what)
        else:
            _compare_buffers(ours.running_mean, ours.running_var, ours.num_batches_tracked,
                             ref, tol, what)


@pytest.mark.parametrize("momentum", [None, 0.1, 0.3])
@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("functional", [False, True], ids=["module", "functional"])
def test_matches_torch_float64(functional, shape, affine, track, momentum):
    _run_sequence(shape, affine, track, momentum, torch.float64, 1e-6, functional)


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_matches_torch_float32(shape):
    _run_sequence(shape, True, True, 0.1, torch.float32, 1e-5, functional=False)


def test_momentum_none_is_cumulative_average():
    torch.manual_seed(0)
    bn = BatchNorm(C, momentum=None).double()
    xs = [torch.randn(8, C, dtype=torch.float64) * 2 + 1 for _ in range(3)]
    for x in xs:
        bn(x)
    means = torch.stack([x.mean(0) for x in xs]).mean(0)
    vars_ = torch.stack([x.var(0, unbiased=True) for x in xs]).mean(0)
    torch.testing.assert_close(bn.running_mean, means)
    torch.testing.assert_close(bn.running_var, vars_)
    assert int(bn.num_batches_tracked) == 3


def test_batch_norm_functional_conventions():
    """Biased variance normalises, unbiased variance updates, torch momentum weighting."""
    x = torch.tensor([[1.0], [2.0], [4.0], [9.0]], dtype=torch.float64)
    rm = torch.full((1,), 3.0, dtype=torch.float64)
    rv = torch.full((1,), 2.0, dtype=torch.float64)
    y = batch_norm(x, rm, rv, training=True, momentum=0.25, eps=1e-5)
    mu, var_b, var_u = x.mean(), x.var(unbiased=False), x.var(unbiased=True)
    torch.testing.assert_close(y, (x - mu) / torch.sqrt(var_b + 1e-5))
    torch.testing.assert_close(rm, 0.75 * torch.tensor([3.0], dtype=torch.float64) + 0.25 * mu)
    torch.testing.assert_close(rv, 0.75 * torch.tensor([2.0], dtype=torch.float64) + 0.25 * var_u)
    # eval uses the running stats; no running stats -> batch stats even in eval
    y_eval = batch_norm(x, rm, rv, training=False, eps=1e-5)
    torch.testing.assert_close(y_eval, (x - rm) / torch.sqrt(rv + 1e-5))
    torch.testing.assert_close(batch_norm(x, None, None, training=False), y, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="num_batches_tracked"):
        batch_norm(x, rm, rv, training=True, momentum=None)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize("dims", [1, 2])
def test_state_dict_round_trip(dims, track, affine):
    shape = SHAPES["NCHW"] if dims == 2 else SHAPES["NCL"]
    torch.manual_seed(0)
    ref = _torch_bn(shape, affine=affine, track_running_stats=track).double()
    ours = BatchNorm(C, affine=affine, track_running_stats=track).double()
    sd_ref, sd_ours = ref.state_dict(), ours.state_dict()
    assert list(sd_ref) == list(sd_ours)
    for k in sd_ref:
        assert sd_ref[k].shape == sd_ours[k].shape and sd_ref[k].dtype == sd_ours[k].dtype, k
    _randomise_affine(ref, seed=3)
    for _ in range(3):  # move torch's running stats away from their initial values
        ref(torch.randn(shape, dtype=torch.float64) * 3 + 1)

    # torch -> scratch
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(shape, dtype=torch.float64)
    for training in (False, True):
        ref.train(training)
        ours.train(training)
        torch.testing.assert_close(ours(x), ref(x), atol=1e-6, rtol=1e-6)

    # scratch -> torch (after training ours further so the states differ)
    ours.train()
    _randomise_affine(ours, seed=7)
    for _ in range(2):
        ours(torch.randn(shape, dtype=torch.float64) * 2 - 1)
    ref2 = _torch_bn(shape, affine=affine, track_running_stats=track).double()
    ref2.load_state_dict(ours.state_dict(), strict=True)
    for k, v in ours.state_dict().items():
        assert torch.equal(ref2.state_dict()[k], v), k
    for training in (False, True):
        ref2.train(training)
        ours.train(training)
        torch.testing.assert_close(ours(x), ref2(x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("shape", [(1, C), (1, C, 1), (1, C, 1, 1)])
def test_batch_of_one_raises_like_torch(shape):
    x = torch.randn(shape)
    ref = _torch_bn(shape).train()
    with pytest.raises(ValueError, match="Expected more than 1 value per channel") as e_ref:
        ref(x)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel") as e_ours:
        BatchNorm(C).train()(x)
    assert str(e_ours.value) == str(e_ref.value)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        batch_norm(x, torch.zeros(C), torch.ones(C), training=True)
    # eval with running stats is fine (no batch statistics needed)
    BatchNorm(C).eval()(x)
    # a single sample with several spatial positions is fine in training
    if len(shape) > 2:
        BatchNorm(C).train()(torch.randn(1, C, 5))
    # without running stats, eval still needs batch stats -> torch raises too, and so do we
    with pytest.raises(ValueError):
        _torch_bn(shape, track_running_stats=False).eval()(x)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        BatchNorm(C, track_running_stats=False).eval()(x)


def test_wrong_channel_count_and_ndim():
    bn = BatchNorm(C)
    with pytest.raises(ValueError) as e:
        bn(torch.randn(5, C + 1, 3))
    assert f"expected {C}" in str(e.value) and f"got {C + 1}" in str(e.value)
    with pytest.raises(ValueError, match="expected 4 channels"):
        NoisyBatchNorm(C)(torch.randn(5, 3))
    with pytest.raises(ValueError, match="expected 4 channels"):
        LpNorm(C, 2)(torch.randn(5, 3))
    with pytest.raises(ValueError, match="got 5D"):
        bn(torch.randn(2, C, 2, 2, 2))
    with pytest.raises(ValueError, match="got 1D"):
        bn(torch.randn(C))
    with pytest.raises(ValueError, match="expected 4"):
        batch_norm(torch.randn(5, 3), torch.zeros(C), torch.ones(C))


# --------------------------------------------------------------------------------------------
# NoisyBatchNorm
# --------------------------------------------------------------------------------------------
def test_noisy_bn_noise_statistics_large_tensor():
    torch.manual_seed(123)
    x = torch.randn(20000, 8, dtype=torch.float64) * 3 + 2
    noisy = NoisyBatchNorm(8, record_noise=True).double()  # weight 1, bias 0
    out = noisy(x)
    x_hat = batch_norm(x, None, None)  # plain normalised output
    mu, sigma, m, s = noisy.last_mu, noisy.last_sigma, noisy.last_m, noisy.last_s
    assert -0.5 <= mu <= 0.5 and 1.0 <= sigma <= 1.25
    assert m.shape == x.shape and s.shape == x.shape
    torch.testing.assert_close(out, s * x_hat + m)
    # m ~ U(mu - 0.1, mu + 0.1): support, mean 0, variance 0.2^2 / 12
    u = m - mu
    assert u.min() >= -0.1 - 1e-12 and u.max() <= 0.1 + 1e-12
    assert u.min() < -0.099 and u.max() > 0.099
    assert abs(u.mean().item()) < 2e-3
    assert u.var().item() == pytest.approx(0.2**2 / 12, rel=0.02)
    # s ~ N(sigma, 0.1)
    z = s - sigma
    assert abs(z.mean().item()) < 2e-3
    assert z.std().item() == pytest.approx(0.1, rel=0.02)
    # per element, not per channel / per sample: noise varies along both dims
    assert m.std(dim=0).min() > 0.05 and m.std(dim=1).min() > 0.01


def test_noisy_bn_recover_noise_from_seed():
    """Seeding the global RNG reproduces the noise; re-drawing in the documented order
    (mu_t, sigma_t, uniform part of m, normal part of s) recovers it exactly."""
    x = torch.randn(50, C, 3, dtype=torch.float64)
    noisy = NoisyBatchNorm(C).double()
    torch.manual_seed(5)
    out = noisy(x)
    torch.manual_seed(5)
    mu = torch.rand((), dtype=torch.float64).item() - 0.5
    sigma = 1 + 0.25 * torch.rand((), dtype=torch.float64).item()
    m = mu + 0.2 * torch.rand(x.shape, dtype=torch.float64) - 0.1
    s = sigma + 0.1 * torch.randn(x.shape, dtype=torch.float64)
    assert noisy.last_mu == pytest.approx(mu) and noisy.last_sigma == pytest.approx(sigma)
    torch.testing.assert_close(out, s * batch_norm(x, None, None) + m)
    noisy2 = NoisyBatchNorm(C).double()
    torch.manual_seed(5)
    torch.testing.assert_close(noisy2(x), out, rtol=0, atol=0)


def test_noisy_bn_per_step_parameters():
    torch.manual_seed(0)
    noisy = NoisyBatchNorm(3)
    x = torch.randn(4, 3)
    mus, sigmas = [], []
    for _ in range(500):
        noisy(x)
        mus.append(noisy.last_mu)
        sigmas.append(noisy.last_sigma)
    mus_t, sig_t = torch.tensor(mus), torch.tensor(sigmas)
    assert mus_t.min() >= -0.5 and mus_t.max() <= 0.5
    assert sig_t.min() >= 1.0 and sig_t.max() <= 1.25
    assert mus_t.min() < -0.45 and mus_t.max() > 0.45  # spread over the whole interval
    assert sig_t.min() < 1.02 and sig_t.max() > 1.23
    assert abs(mus_t.mean().item()) < 0.05
    assert sig_t.mean().item() == pytest.approx(1.125, abs=0.012)
    assert len(set(mus)) == len(mus)  # fresh per step


def test_noisy_bn_eval_equals_batchnorm_and_generator():
    torch.manual_seed(0)
    noisy, plain = NoisyBatchNorm(C).double(), BatchNorm(C).double()
    _randomise_affine(noisy, plain)
    for _ in range(3):
        xb = torch.randn(16, C, 2, 2, dtype=torch.float64) * 2 + 1
        noisy(xb)
        plain(xb)
    # running stats come from the normalisation, not from the noise
    torch.testing.assert_close(noisy.running_mean, plain.running_mean)
    torch.testing.assert_close(noisy.running_var, plain.running_var)
    noisy.eval()
    plain.eval()
    x = torch.randn(16, C, 2, 2, dtype=torch.float64)
    torch.testing.assert_close(noisy(x), plain(x), rtol=0, atol=0)
    # an explicit generator drives the noise and leaves the global RNG untouched
    noisy.train()
    noisy.generator = torch.Generator().manual_seed(9)
    state = torch.get_rng_state()
    a = noisy(x)
    assert torch.equal(torch.get_rng_state(), state)
    noisy.generator.manual_seed(9)
    b = noisy(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # gradients flow through the noisy layer
    xr = x.clone().requires_grad_(True)
    noisy(xr).sum().backward()
    assert torch.isfinite(xr.grad).all() and noisy.weight.grad is not None


# --------------------------------------------------------------------------------------------
# LpNorm
# --------------------------------------------------------------------------------------------
def test_lpnorm_p2_on_centred_input():
    torch.manual_seed(0)
    x = torch.randn(7, C, 5, dtype=torch.float64) * 2
    x = x - x.mean(dim=(0, 2), keepdim=True)
    eps = 1e-5
    expected = x / (torch.sqrt((x**2).mean(dim=(0, 2), keepdim=True)) + eps)
    torch.testing.assert_close(LpNorm(C, 2).double()(x), expected)


@pytest.mark.parametrize("p", [1, 2, math.inf])
def test_lpnorm_scale_uses_uncentred_values(p):
    torch.manual_seed(1)
    x = torch.randn(6, C, 2, 3, dtype=torch.float64) * 2 + 3  # clearly non-zero mean
    dims = (0, 2, 3)
    mean = x.mean(dim=dims, keepdim=True)
    if p == 1:
        scale = x.abs().mean(dim=dims, keepdim=True)
    elif p == 2:
        scale = x.pow(2).mean(dim=dims, keepdim=True).sqrt()
    else:
        scale = x.abs().amax(dim=dims, keepdim=True)
    # the same thing as the norm definition ||x||_p / m^(1/p)
    flat = x.transpose(0, 1).reshape(C, -1)
    m = flat.shape[1]
    norm = torch.linalg.vector_norm(flat, ord=p, dim=1)
    ref_scale = norm if p == math.inf else norm / m ** (1 / p)
    torch.testing.assert_close(scale.flatten(), ref_scale)
    layer = LpNorm(C, p).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.0, 2.0, 0.5, -1.0]))
        layer.bias.copy_(torch.tensor([0.0, 1.0, -1.0, 0.5]))
    w = layer.weight.detach().view(1, C, 1, 1)
    b = layer.bias.detach().view(1, C, 1, 1)
    torch.testing.assert_close(layer(x), (x - mean) / (scale + 1e-5) * w + b)
    torch.testing.assert_close(layer.batch_scale(x), scale.flatten())


@pytest.mark.parametrize("p", [1, 2, math.inf])
def test_lpnorm_eval_uses_running_stats(p):
    torch.manual_seed(2)
    layer = LpNorm(C, p, affine=False).double()
    rm = torch.zeros(C, dtype=torch.float64)
    rs = torch.ones(C, dtype=torch.float64)
    for i in range(3):
        xb = torch.randn(10, C, dtype=torch.float64) * (1 + i) + i
        layer(xb)
        rm = 0.9 * rm + 0.1 * xb.mean(0)
        rs = 0.9 * rs + 0.1 * layer.batch_scale(xb)
    torch.testing.assert_close(layer.running_mean, rm)
    torch.testing.assert_close(layer.running_scale, rs)
    assert int(layer.num_batches_tracked) == 3
    layer.eval()
    x = torch.randn(3, C, dtype=torch.float64)
    torch.testing.assert_close(layer(x), (x - rm) / (rs + 1e-5))
    torch.testing.assert_close(layer.running_mean, rm)  # eval does not update


def test_lpnorm_p_parsing():
    x = torch.randn(8, C, dtype=torch.float64)
    for s, num in (("1", 1), ("2", 2), ("inf", math.inf)):
        a, b = LpNorm(C, s).double(), LpNorm(C, num).double()
        torch.testing.assert_close(a(x), b(x))
    assert LpNorm(C, float("inf")).p == math.inf
    for bad in (3, "3", 0.5, "foo", -math.inf):
        with pytest.raises(ValueError, match="choose one of: 1, 2, inf"):
            LpNorm(C, bad)
    assert "weight" not in LpNorm(C, 2, affine=False).state_dict()


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------
def test_make_norm():
    assert list(NORMS) == ["none", "torch", "scratch", "scratch-fn", "noisy", "l1", "l2", "linf"]
    assert isinstance(make_norm("none", C, 1), nn.Identity)
    assert type(make_norm("torch", C, 1)) is nn.BatchNorm1d
    assert type(make_norm("torch", C, 2)) is nn.BatchNorm2d
    assert type(make_norm("scratch", C, 2)) is BatchNorm
    assert type(make_norm("noisy", C, 1)) is NoisyBatchNorm
    for kind, p in (("l1", 1.0), ("l2", 2.0), ("linf", math.inf)):
        layer = make_norm(kind, C, 2)
        assert type(layer) is LpNorm and layer.p == p and layer.num_features == C
    assert make_norm("scratch", 7, 1).num_features == 7
    for kind in ("scratch", "noisy", "l2", "torch"):
        make_norm(kind, C, 2)(torch.randn(3, C, 2, 2))
        make_norm(kind, C, 1)(torch.randn(3, C))
    with pytest.raises(ValueError) as e:
        make_norm("foo", C, 1)
    assert str(e.value) == "unknown norm 'foo'; choose one of: none, torch, scratch, scratch-fn, noisy, l1, l2, linf"
    with pytest.raises(ValueError, match="dims"):
        make_norm("torch", C, 3)
