"""Every public estimator leaves the model exactly as it found it, and dropout never makes a number random."""
import copy

import pytest
import torch
from torch import nn

import smoothness as sm

ESTIMATORS = ["line_probe", "local_lipschitz", "hvp", "top_eigenvalues", "hessian_trace", "directional_curvature",
              "internal_covariate_shift", "loss_and_gradient", "worst_case_sharpness", "average_case_sharpness",
              "epsilon_sharpness", "pacbayes_flatness", "pacbayes_mag_flatness", "relative_flatness"]


def run(name, model, loss_fn, batch, bn_mode, direction):
    if name == "line_probe":
        return sm.line_probe(model, loss_fn, batch, [0.05, 0.2], bn_mode=bn_mode)
    if name == "local_lipschitz":
        return sm.local_lipschitz(model, loss_fn, batch, direction, bn_mode=bn_mode)
    if name == "hvp":
        return sm.hvp(model, loss_fn, batch, direction, bn_mode=bn_mode)
    if name == "top_eigenvalues":
        return sm.top_eigenvalues(model, loss_fn, batch, k=2, bn_mode=bn_mode)
    if name == "hessian_trace":
        return sm.hessian_trace(model, loss_fn, batch, n_probes=4, bn_mode=bn_mode)
    if name == "directional_curvature":
        return sm.directional_curvature(model, loss_fn, batch, direction, bn_mode=bn_mode)
    if name == "internal_covariate_shift":
        return sm.internal_covariate_shift(model, loss_fn, batch, lr=0.1, bn_mode=bn_mode)
    if name == "loss_and_gradient":
        return sm.loss_and_gradient(model, loss_fn, batch, bn_mode=bn_mode)
    if name == "worst_case_sharpness":
        return sm.worst_case_sharpness(model, loss_fn, batch, rho=0.05, n_steps=3, bn_mode=bn_mode)
    if name == "average_case_sharpness":
        return sm.average_case_sharpness(model, loss_fn, batch, rho=0.05, n_samples=3, bn_mode=bn_mode,
                                         generator=torch.Generator().manual_seed(0))
    if name == "epsilon_sharpness":
        return sm.epsilon_sharpness(model, loss_fn, batch, n_steps=3, bn_mode=bn_mode)
    if name in ("pacbayes_flatness", "pacbayes_mag_flatness"):
        return getattr(sm, name)(model, loss_fn, batch, n_samples=2, n_bisections=3, bn_mode=bn_mode,
                                 generator=torch.Generator().manual_seed(0))
    if name == "relative_flatness":
        return sm.relative_flatness(model, loss_fn, batch, bn_mode=bn_mode)
    raise KeyError(name)


def assert_same_result(a, b):
    if isinstance(a, tuple) and len(a) == 2 and isinstance(a[1], dict):  # loss_and_gradient
        assert a[0] == b[0]
        a, b = a[1], b[1]
    if isinstance(a, dict):
        assert list(a) == list(b)
        for n in a:
            assert torch.equal(a[n], b[n]), n
    else:
        assert a == b


def set_start_mode(model, start):
    if start == "train":
        model.train()
    elif start == "eval":
        model.eval()
    else:  # fine-tuning style: BatchNorm frozen in eval, everything else training
        model.train()
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    return model


@pytest.fixture
def messy(ref):
    """A BN + Dropout MLP with a frozen parameter and some .grad fields already set (others None)."""
    model = ref.make_model("mlp", dropout=0.5, freeze=True)
    assert any(isinstance(m, nn.Dropout) for m in model.modules())
    assert not model.net[0].bias.requires_grad
    g = torch.Generator().manual_seed(9)
    model.net[0].weight.grad = torch.randn(model.net[0].weight.shape, generator=g, dtype=torch.float64)
    model.net[1].weight.grad = torch.randn(model.net[1].weight.shape, generator=g, dtype=torch.float64)
    model.net[0].bias.grad = torch.randn(model.net[0].bias.shape, generator=g, dtype=torch.float64)  # frozen, set
    assert model.net[-1].weight.grad is None
    return model, nn.CrossEntropyLoss(), ref.make_batch(model, n=10)


@pytest.mark.parametrize("start", ["train", "eval", "mixed"])
@pytest.mark.parametrize("bn_mode", sm.BN_MODES)
@pytest.mark.parametrize("name", ESTIMATORS)
def test_model_untouched(ref, messy, name, bn_mode, start):
    model, loss_fn, batch = messy
    set_start_mode(model, start)
    direction = ref.random_direction(model)
    before = ref.snapshot(model)
    params_before = dict(model.named_parameters())
    run(name, model, loss_fn, batch, bn_mode, direction)
    ref.assert_same_snapshot(before, model)
    after = dict(model.named_parameters())
    assert all(after[n] is p for n, p in params_before.items()), "parameter objects were replaced"
    # the model still trains normally afterwards: a train-mode forward moves the running stats as usual
    if start == "train":
        with torch.no_grad():
            model(batch[0])
        assert int(model.net[1].num_batches_tracked) == int(before["state"]["net.1.num_batches_tracked"]) + 1


@pytest.mark.parametrize("bn_mode", sm.BN_MODES)
def test_model_untouched_when_forward_raises(ref, messy, bn_mode):
    model, loss_fn, batch = messy
    model.train()
    before = ref.snapshot(model)

    class Boom(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    model.net.append(Boom())
    with pytest.raises(RuntimeError, match="boom"):
        sm.line_probe(model, loss_fn, batch, [0.1], bn_mode=bn_mode)
    del model.net[-1]
    ref.assert_same_snapshot(before, model)


def test_model_untouched_when_loss_not_finite(ref, messy):
    model, loss_fn, batch = messy
    model.train()
    with torch.no_grad():
        model.net[-1].bias[0] = float("nan")
    before = ref.snapshot(model)
    for name in ESTIMATORS:
        with pytest.raises(sm.NonFiniteLossError, match="not finite"):
            run(name, model, loss_fn, batch, "batch", ref.random_direction(model))
    # snapshot compares with torch.equal, which is False for nan: compare the nan-free parts and the nan mask
    after = ref.snapshot(model)
    assert after["training"] == before["training"]
    for k, v in before["state"].items():
        assert torch.equal(torch.isnan(v), torch.isnan(after["state"][k]))
        assert torch.equal(torch.nan_to_num(v), torch.nan_to_num(after["state"][k])), k


@pytest.mark.parametrize("bn_mode", sm.BN_MODES)
@pytest.mark.parametrize("name", ESTIMATORS)
def test_dropout_is_deterministic(ref, name, bn_mode):
    """Dropout(p=0.5) is off inside estimators: repeated calls agree, and agree with the net without dropout."""
    model = ref.make_model("mlp", dropout=0.5).train()
    loss_fn = nn.CrossEntropyLoss()
    batch = ref.make_batch(model, n=10)
    direction = ref.random_direction(model)
    torch.manual_seed(123)
    first = run(name, model, loss_fn, batch, bn_mode, direction)
    torch.manual_seed(456)  # a different global RNG state must not matter either
    second = run(name, model, loss_fn, batch, bn_mode, direction)
    assert_same_result(first, second)
    no_dropout = copy.deepcopy(model)
    idx = [i for i, m in enumerate(no_dropout.net) if isinstance(m, nn.Dropout)]
    assert len(idx) == 1
    no_dropout.net[idx[0]] = nn.Identity()
    assert_same_result(first, run(name, no_dropout, loss_fn, batch, bn_mode, direction))
