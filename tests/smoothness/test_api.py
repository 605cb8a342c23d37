"""The estimators' shared contract: ``data`` is one batch or an iterable of batches (equal results), curvature
estimators take a CurvatureOperator in place of (model, loss_fn, data) (equal results), probe counts are
``n_probes``, generators default to one seeded with ESTIMATOR_SEED, results are frozen dataclasses."""
import dataclasses
import inspect
import math

import numpy as np
import pytest
import torch
from torch import nn

import smoothness as sm

DT = torch.float64
SIZES = (5, 4, 3)


def plain_mlp(seed=0):
    """No BatchNorm: the loss is a mean of per-sample losses, so chunks and the concatenated batch agree."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3)).to(DT)


@pytest.fixture(scope="module")
def setup():
    model = plain_mlp()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(sum(SIZES), 6, generator=g, dtype=DT), torch.randint(0, 3, (sum(SIZES),), generator=g)
    chunks, i = [], 0
    for n in SIZES:
        chunks.append((x[i:i + n], y[i:i + n]))
        i += n
    return model, nn.CrossEntropyLoss(), (x, y), chunks


def direction(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=g, dtype=DT) for n, p in model.named_parameters()}


def ones(model):
    return {n: torch.ones_like(p) for n, p in model.named_parameters()}


# every public estimator that takes data, as f(model, loss_fn, data)
DATA_CALLS = {
    "loss_and_gradient": lambda m, f, d: sm.loss_and_gradient(m, f, d),
    "line_probe": lambda m, f, d: sm.line_probe(m, f, d, [0.01, 0.1]),
    "local_lipschitz": lambda m, f, d: sm.local_lipschitz(m, f, d, direction(m)),
    "hvp": lambda m, f, d: sm.hvp(m, f, d, direction(m)),
    "top_eigenvalues": lambda m, f, d: sm.top_eigenvalues(m, f, d, k=2, tol=1e-10),
    "hessian_trace": lambda m, f, d: sm.hessian_trace(m, f, d, n_probes=4),
    "directional_curvature": lambda m, f, d: sm.directional_curvature(m, f, d, direction(m)),
    "internal_covariate_shift": lambda m, f, d: sm.internal_covariate_shift(m, f, d, lr=0.1),
    "loss_surface": lambda m, f, d: sm.loss_surface(m, f, d, [direction(m)], [np.linspace(-0.5, 0.5, 3)]),
    "interpolation": lambda m, f, d: sm.interpolation(m, f, d, {n: p.detach() for n, p in m.named_parameters()},
                                                      direction(m), [0.0, 0.5, 1.0]),
    "spectral_density": lambda m, f, d: sm.spectral_density(m, f, d, n_probes=2, n_steps=6),
    "gradient_concentration": lambda m, f, d: sm.gradient_concentration(m, f, d, 2, tol=1e-10),
    "preconditioned_top_eigenvalues": lambda m, f, d: sm.preconditioned_top_eigenvalues(m, f, d, ones(m), tol=1e-10),
    "worst_case_sharpness": lambda m, f, d: sm.worst_case_sharpness(m, f, d, rho=0.05, n_steps=3),
    "average_case_sharpness": lambda m, f, d: sm.average_case_sharpness(m, f, d, rho=0.05, n_samples=3),
    "epsilon_sharpness": lambda m, f, d: sm.epsilon_sharpness(m, f, d, n_steps=3),
    "pacbayes_flatness": lambda m, f, d: sm.pacbayes_flatness(m, f, d, n_samples=2, n_bisections=3),
    "pacbayes_mag_flatness": lambda m, f, d: sm.pacbayes_mag_flatness(m, f, d, n_samples=2, n_bisections=3),
    "relative_flatness": lambda m, f, d: sm.relative_flatness(m, f, d),
    "curvature_operator": lambda m, f, d: sm.curvature_operator(m, f, d, kind="ggn").matvec(direction(m)),
    # per-example units: a chunk of examples or the whole batch gives the same units
    # (n_passes says how it walked the data: one pass over one batch, two over chunks)
    "gradient_noise": lambda m, f, d: dataclasses.replace(sm.gradient_noise(m, f, d), n_passes=0),
    "gradient_histogram": lambda m, f, d: sm.gradient_histogram(m, f, d),
    "observe_line": lambda m, f, d: sm.observe_line(m, f, d, direction(m)),
    "step_quality": lambda m, f, d: sm.step_quality(m, f, d, {n: 0.1 * v for n, v in direction(m).items()}),
    "tic": lambda m, f, d: sm.tic(m, f, d),
}


def public_functions():
    return {name: getattr(sm, name) for name in sm.__all__ if inspect.isfunction(getattr(sm, name))}


def test_every_estimator_taking_data_names_it_data_third():
    takes_data = {name for name, f in public_functions().items() if "data" in inspect.signature(f).parameters}
    assert takes_data == set(DATA_CALLS), sorted(takes_data ^ set(DATA_CALLS))
    for name in takes_data:
        params = list(inspect.signature(getattr(sm, name)).parameters)
        assert params[:3] == ["model", "loss_fn", "data"], (name, params)
    for name, f in public_functions().items():
        assert not {"batch", "batch_or_batches"} & set(inspect.signature(f).parameters), name


def numbers(result):
    """The numbers in a result, flattened (dataclass fields, tuples, dicts, tensors, arrays); strings dropped."""
    if dataclasses.is_dataclass(result):
        return numbers([getattr(result, f.name) for f in dataclasses.fields(result)])
    if isinstance(result, dict):
        return numbers([result[k] for k in sorted(result)])
    if isinstance(result, (tuple, list)):
        return [x for item in result for x in numbers(item)]
    if isinstance(result, (torch.Tensor, np.ndarray)):
        return [float(x) for x in np.asarray(result.detach() if isinstance(result, torch.Tensor) else result,
                                             dtype=np.float64).ravel()]
    if isinstance(result, (bool, int, float)) and not isinstance(result, str):
        return [float(result)]
    return []


@pytest.mark.parametrize("name", sorted(DATA_CALLS))
def test_one_batch_and_an_iterable_of_batches_give_the_same_result(setup, name):
    model, loss_fn, batch, chunks = setup
    one, many = DATA_CALLS[name](model, loss_fn, batch), DATA_CALLS[name](model, loss_fn, chunks)
    assert type(one) is type(many)
    a, b = numbers(one), numbers(many)
    assert len(a) == len(b) and a, (one, many)
    np.testing.assert_allclose(b, a, rtol=1e-8, atol=1e-10)
    # a DataLoader-like re-iterable (a tuple of chunks) is an iterable of batches too
    np.testing.assert_allclose(numbers(DATA_CALLS[name](model, loss_fn, tuple(chunks))), a, rtol=1e-8, atol=1e-10)


# every curvature estimator, as f(source, model, block, **kw) with source an operator or (model, loss_fn, data) and
# block the parameter block (None: all), which keys the direction and the preconditioner
def _on(block, tensors):
    return {n: t for n, t in tensors.items() if block is None or n in block}


CURVATURE_CALLS = {
    "top_eigenvalues": lambda src, m, block, **kw: sm.top_eigenvalues(*src, k=2, tol=1e-8, **kw),
    "hessian_trace": lambda src, m, block, **kw: sm.hessian_trace(*src, n_probes=5, **kw),
    "spectral_density": lambda src, m, block, **kw: sm.spectral_density(*src, n_probes=2, n_steps=8, **kw),
    "gradient_concentration": lambda src, m, block, **kw: sm.gradient_concentration(*src, k=2, **kw),
    "preconditioned_top_eigenvalues": lambda src, m, block, **kw: sm.preconditioned_top_eigenvalues(
        *src, preconditioner=_on(block, {n: p.detach().abs() + 0.5 for n, p in m.named_parameters()}), **kw),
    "directional_curvature": lambda src, m, block, **kw: sm.directional_curvature(
        *src, direction=_on(block, direction(m)), **kw),
}
OPERATOR_CASES = [("hessian", None, "batch"), ("ggn", None, "batch"), ("hessian", ["4.weight", "2.bias"], "batch"),
                  ("empirical-fisher", None, "running")]


@pytest.mark.parametrize("kind,params,bn_mode", OPERATOR_CASES)
@pytest.mark.parametrize("name", sorted(CURVATURE_CALLS))
def test_operator_in_place_of_model_loss_and_data(setup, name, kind, params, bn_mode):
    model, loss_fn, batch, chunks = setup
    for data in (batch, chunks):
        direct = CURVATURE_CALLS[name]((model, loss_fn, data), model, params, kind=kind, params=params,
                                       bn_mode=bn_mode)
        with sm.curvature_operator(model, loss_fn, data, kind=kind, params=params, bn_mode=bn_mode) as op:
            via = CURVATURE_CALLS[name]((op,), model, params)
            again = CURVATURE_CALLS[name]((op,), model, params)
        assert via == direct and again == direct   # n_hvp counts each estimate's own products
        assert numbers(via) == numbers(direct)


def test_relative_flatness_from_an_operator(setup):
    model, loss_fn, batch, _ = setup
    direct = sm.relative_flatness(model, loss_fn, batch, layer="4.weight", n_probes=6)
    op = sm.curvature_operator(model, loss_fn, batch, params=["2.weight", "4.weight"])
    assert sm.relative_flatness(op, layer="4.weight", n_probes=6) == direct
    with pytest.raises(ValueError, match="not a trainable parameter of the model in the operator's block"):
        sm.relative_flatness(op, layer="0.weight")
    with pytest.raises(ValueError, match="defined with the Hessian"):
        sm.relative_flatness(sm.curvature_operator(model, loss_fn, batch, kind="ggn"))


def test_operator_arguments_that_conflict_are_refused(setup):
    model, loss_fn, batch, _ = setup
    op = sm.curvature_operator(model, loss_fn, batch, kind="ggn", bn_mode="running")
    sm.top_eigenvalues(op, kind="ggn", bn_mode="running")   # the operator's own values are fine
    with pytest.raises(ValueError, match="kind='hessian' differs from the operator's kind 'ggn'"):
        sm.top_eigenvalues(op, kind="hessian")
    with pytest.raises(ValueError, match="bn_mode='batch' differs from the operator's bn_mode 'running'"):
        sm.hessian_trace(op, bn_mode="batch")
    with pytest.raises(ValueError, match="differs from the operator's block"):
        sm.spectral_density(op, params=["4.weight"])
    with pytest.raises(TypeError, match="CurvatureOperator alone or \\(model, loss_fn, data\\), not both"):
        sm.top_eigenvalues(op, loss_fn, batch)
    with pytest.raises(TypeError, match="loss_fn and data are missing"):
        sm.top_eigenvalues(model)
    op.close()
    with pytest.raises(RuntimeError, match="closed"):
        sm.top_eigenvalues(op)
    # an operator whose weights changed is refused by every estimator, not only by matvec
    op = sm.curvature_operator(model, loss_fn, batch)
    model[0].weight.data.mul_(2)
    try:
        with pytest.raises(RuntimeError, match="changed in place"):
            sm.hessian_trace(op, n_probes=2)
    finally:
        model[0].weight.data.div_(2)


def test_n_samples_is_a_deprecated_alias_of_n_probes(setup):
    model, loss_fn, batch, _ = setup
    with pytest.warns(FutureWarning, match="n_samples= is deprecated, use n_probes="):
        old = sm.hessian_trace(model, loss_fn, batch, n_samples=4)
    assert old == sm.hessian_trace(model, loss_fn, batch, n_probes=4)
    with pytest.warns(FutureWarning, match="relative_flatness: n_samples= is deprecated"):
        old = sm.relative_flatness(model, loss_fn, batch, n_samples=3)
    assert old == sm.relative_flatness(model, loss_fn, batch, n_probes=3) and old.n_probes == 3


SEEDED = {   # estimators with a generator, as f(model, loss_fn, batch, **kw)
    "top_eigenvalues": lambda m, f, b, **kw: sm.top_eigenvalues(m, f, b, max_iter=3, **kw),
    "hessian_trace": lambda m, f, b, **kw: sm.hessian_trace(m, f, b, n_probes=3, **kw),
    "spectral_density": lambda m, f, b, **kw: sm.spectral_density(m, f, b, n_probes=1, n_steps=3, **kw),
    "gradient_concentration": lambda m, f, b, **kw: sm.gradient_concentration(m, f, b, 2, max_iter=4, **kw),
    "preconditioned_top_eigenvalues": lambda m, f, b, **kw: sm.preconditioned_top_eigenvalues(
        m, f, b, ones(m), max_iter=3, **kw),
    "worst_case_sharpness": lambda m, f, b, **kw: sm.worst_case_sharpness(m, f, b, rho=0.05, n_steps=2, **kw),
    "average_case_sharpness": lambda m, f, b, **kw: sm.average_case_sharpness(m, f, b, rho=0.05, n_samples=3, **kw),
    "epsilon_sharpness": lambda m, f, b, **kw: sm.epsilon_sharpness(m, f, b, n_steps=2, **kw),
    "pacbayes_flatness": lambda m, f, b, **kw: sm.pacbayes_flatness(m, f, b, n_samples=2, n_bisections=2, **kw),
    "pacbayes_mag_flatness": lambda m, f, b, **kw: sm.pacbayes_mag_flatness(m, f, b, n_samples=2, n_bisections=2,
                                                                             **kw),
    "relative_flatness": lambda m, f, b, **kw: sm.relative_flatness(m, f, b, n_probes=3, **kw),
    "random_direction": lambda m, f, b, **kw: sm.random_direction(m, **kw),
}


def test_every_generator_is_optional_and_defaults_to_the_estimator_seed(setup):
    model, loss_fn, batch, _ = setup
    with_generator = {name for name, f in public_functions().items() if "generator" in inspect.signature(f).parameters}
    assert with_generator == set(SEEDED), sorted(with_generator ^ set(SEEDED))
    for name in with_generator:
        assert inspect.signature(getattr(sm, name)).parameters["generator"].default is None, name
    for name, call in SEEDED.items():
        default = call(model, loss_fn, batch)
        seeded = call(model, loss_fn, batch, generator=torch.Generator().manual_seed(sm.ESTIMATOR_SEED))
        assert numbers(default) == numbers(seeded), name
        other = call(model, loss_fn, batch, generator=torch.Generator().manual_seed(sm.ESTIMATOR_SEED + 1))
        if name not in ("worst_case_sharpness", "epsilon_sharpness"):   # these draw only at a stationary point
            assert numbers(other) != numbers(default), name
        with pytest.raises(TypeError, match="generator must be a torch.Generator"):
            call(model, loss_fn, batch, generator=0)


def test_bn_mode_defaults_to_batch_everywhere():
    for name, f in public_functions().items():
        parameters = inspect.signature(f).parameters
        if "bn_mode" in parameters:
            assert parameters["bn_mode"].default == "batch", name


def test_results_are_frozen_dataclasses(setup):
    model, loss_fn, batch, _ = setup
    d = direction(model)
    curv = sm.directional_curvature(model, loss_fn, batch, d)
    hd = sm.hvp(model, loss_fn, batch, d)
    expected = sum(float((d[n] * hd[n]).sum()) for n in d) / sum(float((t * t).sum()) for t in d.values())
    assert curv == sm.DirectionalCurvature(value=pytest.approx(expected, rel=1e-12), n_hvp=1, bn_mode="batch",
                                           batch_size=sum(SIZES), kind="hessian", params=None)
    lip = sm.local_lipschitz(model, loss_fn, batch, d, bn_mode="running")
    assert (lip.n_passes, lip.bn_mode, lip.batch_size) == (2, "running", sum(SIZES)) and math.isfinite(lip.value)
    for result in (curv, lip):
        with pytest.raises(dataclasses.FrozenInstanceError):
            result.value = 0.0
    for name in sm.__all__:
        obj = getattr(sm, name)
        if inspect.isclass(obj) and dataclasses.is_dataclass(obj):
            assert obj.__dataclass_params__.frozen, name


def test_params_may_be_the_models_own_parameters_and_a_foreign_tensor_is_one_short_line(setup):
    """``params=list(model.parameters())`` used to print every tensor in its error; the parameters now stand for
    their names, and a tensor that is not one of them is named by its shape only."""
    model, loss_fn, batch, _ = setup
    by_tensor = sm.top_eigenvalues(model, loss_fn, batch, params=[model[0].weight, model[0].bias], tol=1e-10)
    by_name = sm.top_eigenvalues(model, loss_fn, batch, params=["0.weight", "0.bias"], tol=1e-10)
    assert by_tensor.values == by_name.values
    with pytest.raises(ValueError) as err:
        sm.top_eigenvalues(model, loss_fn, batch, params=[torch.zeros(10, 6, dtype=DT)])
    assert "shape (10, 6)" in str(err.value) and "tensor(" not in str(err.value) and len(str(err.value)) < 300
