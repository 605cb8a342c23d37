"""Tiny float64 models and independent reference computations for the `smoothness` tests.

No ``__init__.py`` here on purpose: a package named after this folder would shadow the real ``smoothness`` package.
Helpers are therefore handed to the tests through the ``ref`` fixture rather than imported from this module.
"""
from __future__ import annotations

import contextlib
import copy
import types

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

DT = torch.float64
DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------
class Quadratic(nn.Module):
    """Holds w; forward returns w once per sample, so the output depends on the batch shape only."""

    def __init__(self, w0: torch.Tensor):
        super().__init__()
        self.w = nn.Parameter(w0.clone())

    def forward(self, x):
        return self.w.unsqueeze(0).expand(x.shape[0], -1)


def quadratic_loss(A: torch.Tensor):
    """loss(outputs, targets) = mean_b ½ (o_b − t_b)ᵀ A (o_b − t_b); with targets = w* per row this is
    L(w) = ½ (w − w*)ᵀ A (w − w*) exactly, whose Hessian is A."""

    def loss_fn(outputs, targets):
        r = outputs - targets
        return 0.5 * torch.einsum("bi,ij,bj->b", r, A, r).mean()

    return loss_fn


class MLP(nn.Module):
    def __init__(self, dropout: float = 0.0, freeze: bool = False):
        super().__init__()
        layers = [nn.Linear(6, 10), nn.BatchNorm1d(10), nn.Tanh()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        layers += [nn.Linear(10, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)]
        self.net = nn.Sequential(*layers)
        if freeze:
            self.net[0].bias.requires_grad_(False)

    def forward(self, x):
        return self.net(x)


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Tanh(),
        )
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


def n_params(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def randomize_bn(model: nn.Module, seed: int = 0, steps: int = 5):
    """Give BatchNorm non-trivial affine parameters and running statistics (a few train-mode forwards on shifted,
    scaled inputs under no_grad), so that eval-mode BN is not the identity. Restores the training flags."""
    g = torch.Generator().manual_seed(seed)
    flags = [(m, m.training) for m in model.modules()]
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g, dtype=DT))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g, dtype=DT))
        model.train()
        shape = model.input_shape
        for _ in range(steps):
            x = 1.5 + 2.0 * torch.randn((16, *shape), generator=g, dtype=DT)
            model(x)
    for m, f in flags:
        m.training = f
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            assert not torch.allclose(m.running_mean, torch.zeros_like(m.running_mean))
            assert not torch.allclose(m.running_var, torch.ones_like(m.running_var))
    return model


def make_model(kind: str, seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "mlp":
        model = MLP(**kw).to(DT)
        model.input_shape = (6,)
    elif kind == "conv":
        model = ConvNet(**kw).to(DT)
        model.input_shape = (2, 6, 6)
    else:
        raise KeyError(kind)
    assert n_params(model) <= 1000
    return randomize_bn(model, seed)


def make_batch(model: nn.Module, n: int = 12, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *model.input_shape), generator=g, dtype=DT)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


# ---------------------------------------------------------------------------------------------------------------
# Independent references (no code from `smoothness`)
# ---------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def mode(model: nn.Module, bn_mode: str):
    """train() for 'batch' (dropout off), eval() for 'running'; every module's flag restored afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        if bn_mode == "batch":
            model.train()
            for m in model.modules():
                if isinstance(m, DROPOUT):
                    m.eval()
        else:
            model.eval()
        yield model
    finally:
        for m, f in flags:
            m.training = f


def trainable_names(model):
    return [n for n, p in model.named_parameters() if p.requires_grad]


def flat_params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad]).clone()


def unflatten(model, flat):
    out, i = {}, 0
    for n, p in model.named_parameters():
        if p.requires_grad:
            out[n] = flat[i:i + p.numel()].reshape(p.shape)
            i += p.numel()
    assert i == flat.numel()
    return out


def flatten_dict(model, d):
    return torch.cat([d[n].reshape(-1) for n in trainable_names(model)])


def loss_of_flat(model, loss_fn, batch, bn_mode):
    x, y = batch
    buffers = dict(model.named_buffers())

    def f(flat):
        tensors = {**{n: b.clone() for n, b in buffers.items()}, **unflatten(model, flat)}
        with mode(model, bn_mode):
            out = functional_call(model, tensors, (x,))
        return loss_fn(out, y)

    return f


def dense_hessian(model, loss_fn, batch, bn_mode):
    f = loss_of_flat(model, loss_fn, batch, bn_mode)
    H = torch.autograd.functional.hessian(f, flat_params(model))
    return 0.5 * (H + H.T)


def naive_loss_grad(model, loss_fn, batch, bn_mode, shift=None, s=0.0):
    """Deep-copy the model, move it to w + s·shift, and compute loss and gradient the ordinary way."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.grad = None
            if shift is not None and p.requires_grad:
                p.add_(s * shift[n])
    x, y = batch
    with mode(m, bn_mode):
        loss = loss_fn(m(x), y)
    loss.backward()
    grads = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
             for n, p in m.named_parameters() if p.requires_grad}
    return float(loss.detach()), grads


def l2(d):
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in d.values())))


def random_direction(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=g, dtype=p.dtype)
            for n, p in model.named_parameters() if p.requires_grad}


def snapshot(model):
    """Everything an estimator must leave untouched."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "state_keys": list(model.state_dict().keys()),
        "ptrs": {n: p.data_ptr() for n, p in model.named_parameters()},
        "training": [(n, m.training) for n, m in model.named_modules()],
        "requires_grad": [(n, p.requires_grad) for n, p in model.named_parameters()],
        "grad": {n: (None if p.grad is None else p.grad.detach().clone()) for n, p in model.named_parameters()},
    }


def assert_same_snapshot(before, model):
    after = snapshot(model)
    assert after["state_keys"] == before["state_keys"]
    for k, v in before["state"].items():
        w = after["state"][k]
        assert v.dtype == w.dtype and v.shape == w.shape, k
        assert torch.equal(v, w), f"state_dict[{k!r}] changed"
    assert after["ptrs"] == before["ptrs"], "parameters were replaced"
    assert after["training"] == before["training"], "train/eval flags changed"
    assert after["requires_grad"] == before["requires_grad"], "requires_grad flags changed"
    for n, g in before["grad"].items():
        h = after["grad"][n]
        if g is None:
            assert h is None, f"{n}.grad was None and is now set"
        else:
            assert h is not None and torch.equal(g, h), f"{n}.grad changed"


def rel_err(a, b):
    a = torch.as_tensor(np.asarray(a, dtype=np.float64))
    b = torch.as_tensor(np.asarray(b, dtype=np.float64))
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


@pytest.fixture(scope="session")
def ref():
    return types.SimpleNamespace(
        DT=DT, Quadratic=Quadratic, quadratic_loss=quadratic_loss, MLP=MLP, ConvNet=ConvNet,
        make_model=make_model, make_batch=make_batch, randomize_bn=randomize_bn, n_params=n_params, mode=mode,
        flat_params=flat_params, unflatten=unflatten, flatten_dict=flatten_dict, loss_of_flat=loss_of_flat,
        dense_hessian=dense_hessian, naive_loss_grad=naive_loss_grad, l2=l2, random_direction=random_direction,
        snapshot=snapshot, assert_same_snapshot=assert_same_snapshot, rel_err=rel_err,
        trainable_names=trainable_names,
    )


@pytest.fixture
def ce():
    return nn.CrossEntropyLoss()
