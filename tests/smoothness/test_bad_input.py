"""Bad input gets a clear ValueError/TypeError naming the problem, from every estimator where it applies."""
import pytest
import torch
from torch import nn

import smoothness as sm

ALL = ["line_probe", "line_probe_direction", "local_lipschitz", "hvp", "top_eigenvalues", "hessian_trace",
       "directional_curvature", "internal_covariate_shift", "loss_and_gradient"]
WITH_DIRECTION = ["line_probe_direction", "local_lipschitz", "hvp", "directional_curvature"]
REFUSE_ZERO_DIRECTION = ["line_probe_direction", "local_lipschitz", "directional_curvature"]


def call(name, model, loss_fn, batch, direction=None, bn_mode="batch", steps=(0.1, 0.2), k=1, **kw):
    if direction is None:
        direction = {n: torch.ones_like(p) for n, p in model.named_parameters() if p.requires_grad}
    if name == "line_probe":
        return sm.line_probe(model, loss_fn, batch, steps, bn_mode=bn_mode)
    if name == "line_probe_direction":
        return sm.line_probe(model, loss_fn, batch, steps, direction=direction, bn_mode=bn_mode)
    if name == "local_lipschitz":
        return sm.local_lipschitz(model, loss_fn, batch, direction, bn_mode=bn_mode)
    if name == "hvp":
        return sm.hvp(model, loss_fn, batch, direction, bn_mode=bn_mode)
    if name == "top_eigenvalues":
        return sm.top_eigenvalues(model, loss_fn, batch, k=k, bn_mode=bn_mode, **kw)
    if name == "hessian_trace":
        return sm.hessian_trace(model, loss_fn, batch, n_probes=kw.get("n_probes", 3), bn_mode=bn_mode)
    if name == "directional_curvature":
        return sm.directional_curvature(model, loss_fn, batch, direction, bn_mode=bn_mode)
    if name == "internal_covariate_shift":
        return sm.internal_covariate_shift(model, loss_fn, batch, lr=0.1, bn_mode=bn_mode)
    if name == "loss_and_gradient":
        return sm.loss_and_gradient(model, loss_fn, batch, bn_mode=bn_mode)
    raise KeyError(name)


@pytest.fixture
def setup(ref):
    model = ref.make_model("mlp", freeze=True)
    return model, nn.CrossEntropyLoss(), ref.make_batch(model, n=8)


@pytest.mark.parametrize("name", ALL)
def test_all_good_inputs_work(setup, name):
    """The baseline every other test here perturbs is itself valid."""
    call(name, *setup)


# -- the model -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_no_trainable_parameters(setup, name):
    model, loss_fn, batch = setup
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        call(name, model, loss_fn, batch, direction={})
    parameterless = nn.Sequential(nn.Flatten(), nn.Identity())
    with pytest.raises(ValueError, match="no trainable parameters"):
        call(name, parameterless, loss_fn, batch, direction={})


@pytest.mark.parametrize("name", ALL)
def test_not_a_module(setup, name):
    _, loss_fn, batch = setup
    with pytest.raises(TypeError, match="torch.nn.Module"):
        call(name, lambda x: x, loss_fn, batch, direction={})


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_loss(setup, name, value):
    model, loss_fn, batch = setup
    with torch.no_grad():
        model.net[-1].bias[1] = value
    with pytest.raises(sm.NonFiniteLossError, match="not finite"):
        call(name, model, loss_fn, batch)


@pytest.mark.parametrize("name", ALL)
def test_loss_not_scalar(setup, name):
    model, _, batch = setup
    with pytest.raises(TypeError, match="scalar"):
        call(name, model, nn.CrossEntropyLoss(reduction="none"), batch)


# -- the batch -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_empty_batch(setup, name):
    model, loss_fn, _ = setup
    batch = (torch.zeros(0, 6, dtype=torch.float64), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="batch is empty"):
        call(name, model, loss_fn, batch)


@pytest.mark.parametrize("name", ALL)
def test_inputs_targets_length_mismatch(setup, name):
    model, loss_fn, (x, y) = setup
    with pytest.raises(ValueError, match="differ in length.*8 inputs, 7 targets"):
        call(name, model, loss_fn, (x, y[:7]))
    with pytest.raises(ValueError, match="differ in length"):
        call(name, model, loss_fn, (x, y[0]))


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("bad", ["tensor", "triple", "not_tensors"])
def test_batch_not_a_pair_of_tensors(setup, name, bad):
    model, loss_fn, (x, y) = setup
    batch = {"tensor": x, "triple": (x, y, y), "not_tensors": (x.tolist(), y)}[bad]
    with pytest.raises(TypeError, match="batch must"):
        call(name, model, loss_fn, batch)


# -- bn_mode ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("bn_mode", ["train", "eval", "", None])
def test_unknown_bn_mode(setup, name, bn_mode):
    with pytest.raises(ValueError, match="unknown bn_mode"):
        call(name, *setup, bn_mode=bn_mode)


# -- directions ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", WITH_DIRECTION)
def test_direction_missing_key(setup, name):
    model, loss_fn, batch = setup
    d = {n: torch.ones_like(p) for n, p in model.named_parameters() if p.requires_grad}
    del d["net.3.bias"]
    with pytest.raises(ValueError, match=r"missing keys \['net.3.bias'\]"):
        call(name, model, loss_fn, batch, direction=d)


@pytest.mark.parametrize("name", WITH_DIRECTION)
@pytest.mark.parametrize("extra", ["bogus", "net.0.bias", "net.1.running_mean"])
def test_direction_extra_key(setup, name, extra):
    """Unknown names, frozen parameters and buffers are all refused."""
    model, loss_fn, batch = setup
    d = {n: torch.ones_like(p) for n, p in model.named_parameters() if p.requires_grad}
    d[extra] = torch.ones(10, dtype=torch.float64)
    with pytest.raises(ValueError, match=f"unexpected keys \\['{extra}'\\]"):
        call(name, model, loss_fn, batch, direction=d)


@pytest.mark.parametrize("name", WITH_DIRECTION)
def test_direction_wrong_shape(setup, name):
    model, loss_fn, batch = setup
    d = {n: torch.ones_like(p) for n, p in model.named_parameters() if p.requires_grad}
    d["net.3.weight"] = d["net.3.weight"].T.contiguous()
    with pytest.raises(ValueError, match=r"'net.3.weight'\] has shape \(10, 8\).*\(8, 10\)"):
        call(name, model, loss_fn, batch, direction=d)
    d["net.3.weight"] = torch.ones(80, dtype=torch.float64)  # right size, wrong shape
    with pytest.raises(ValueError, match="has shape"):
        call(name, model, loss_fn, batch, direction=d)


@pytest.mark.parametrize("name", WITH_DIRECTION)
def test_direction_wrong_type(setup, name):
    model, loss_fn, batch = setup
    d = {n: torch.ones_like(p) for n, p in model.named_parameters() if p.requires_grad}
    with pytest.raises(TypeError, match="must be a dict"):
        call(name, model, loss_fn, batch, direction=list(d.values()))
    d["net.3.bias"] = [1.0] * 8
    with pytest.raises(TypeError, match="must be a tensor"):
        call(name, model, loss_fn, batch, direction=d)


@pytest.mark.parametrize("name", WITH_DIRECTION)
def test_direction_not_finite(setup, name):
    model, loss_fn, batch = setup
    d = {n: torch.ones_like(p) for n, p in model.named_parameters() if p.requires_grad}
    d["net.3.bias"][2] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        call(name, model, loss_fn, batch, direction=d)


@pytest.mark.parametrize("name", REFUSE_ZERO_DIRECTION)
def test_direction_all_zero(setup, name):
    model, loss_fn, batch = setup
    d = {n: torch.zeros_like(p) for n, p in model.named_parameters() if p.requires_grad}
    with pytest.raises(ValueError, match="all zeros"):
        call(name, model, loss_fn, batch, direction=d)


def test_hvp_of_zero_vector_is_zero(setup):
    """H·0 is well defined, so hvp (unlike the directional estimators) accepts it."""
    model, loss_fn, batch = setup
    d = {n: torch.zeros_like(p) for n, p in model.named_parameters() if p.requires_grad}
    out = sm.hvp(model, loss_fn, batch, d)
    assert all(torch.equal(t, torch.zeros_like(t)) for t in out.values())


# -- estimator-specific arguments ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["line_probe", "line_probe_direction"])
@pytest.mark.parametrize("steps,match", [
    ([], "step_sizes is empty"),
    ((), "step_sizes is empty"),
    ([0.0], "positive and finite"),
    ([0.1, -0.1], "positive and finite"),
    ([float("nan")], "positive and finite"),
    ([float("inf")], "positive and finite"),
])
def test_bad_step_sizes(setup, name, steps, match):
    with pytest.raises(ValueError, match=match):
        call(name, *setup, steps=steps)


@pytest.mark.parametrize("steps", [0.1, None])
def test_step_sizes_not_a_sequence(setup, steps):
    with pytest.raises(TypeError, match="step_sizes must be a sequence"):
        call("line_probe", *setup, steps=steps)


@pytest.mark.parametrize("k", [0, -1, "n", "n+1"])
def test_bad_k(setup, ref, k):
    model, loss_fn, batch = setup
    n = ref.n_params(model)
    k = {"n": n, "n+1": n + 1}.get(k, k)
    with pytest.raises(ValueError, match=f"k must satisfy 1 <= k < number of trainable parameters \\({n}\\)"):
        call("top_eigenvalues", model, loss_fn, batch, k=k)


def test_k_largest_allowed(ref):
    """k = n − 1 is allowed (and exact after n products) on a 4-parameter quadratic."""
    A = torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64))
    model = ref.Quadratic(torch.ones(4, dtype=torch.float64))
    batch = (torch.zeros(1, 1, dtype=torch.float64), torch.zeros(1, 4, dtype=torch.float64))
    out = sm.top_eigenvalues(model, ref.quadratic_loss(A), batch, k=3, tol=1e-12)
    assert out.values == pytest.approx((4.0, 3.0, 2.0), rel=1e-12)
    with pytest.raises(ValueError, match="k must satisfy"):
        sm.top_eigenvalues(model, ref.quadratic_loss(A), batch, k=4)


@pytest.mark.parametrize("k", [1.0, True, "2", None])
def test_k_not_an_int(setup, k):
    with pytest.raises(TypeError, match="k must be an int"):
        call("top_eigenvalues", *setup, k=k)


@pytest.mark.parametrize("tol", [0.0, -1e-3, float("nan")])
def test_bad_tol(setup, tol):
    with pytest.raises(ValueError, match="tol must be positive"):
        call("top_eigenvalues", *setup, tol=tol)


@pytest.mark.parametrize("max_iter", [0, 1, 2.5, True])
def test_bad_max_iter(setup, max_iter):
    with pytest.raises(ValueError, match="max_iter"):
        call("top_eigenvalues", *setup, k=2, max_iter=max_iter)


@pytest.mark.parametrize("n_probes", [0, 1, 2.5, True, None])
def test_bad_n_probes(setup, n_probes):
    with pytest.raises(ValueError, match="n_probes must be an int >= 2"):
        call("hessian_trace", *setup, n_probes=n_probes)
