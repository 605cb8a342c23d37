"""line_probe and local_lipschitz: Santurkar's probes and the seed's local smoothness, beyond the closed forms."""
import dataclasses
import math

import numpy as np
import pytest
import torch
from torch import nn

import smoothness as sm


@pytest.fixture
def mlp(ref):
    model = ref.make_model("mlp", freeze=True)
    return model, nn.CrossEntropyLoss(), ref.make_batch(model, n=10)


def test_default_direction_is_minus_gradient(ref, mlp):
    model, loss_fn, batch = mlp
    _, g = ref.naive_loss_grad(model, loss_fn, batch, "batch")
    steps = [0.1, 0.2]
    default = sm.line_probe(model, loss_fn, batch, steps)
    explicit = sm.line_probe(model, loss_fn, batch, steps, direction={n: -t for n, t in g.items()})
    assert default.losses == pytest.approx(explicit.losses, rel=1e-13)
    assert default.grad_diff_norms == pytest.approx(explicit.grad_diff_norms, rel=1e-12)
    assert default.direction_norm == pytest.approx(default.grad_norm, rel=1e-13)
    # a small step along -g decreases the loss
    assert sm.line_probe(model, loss_fn, batch, [1e-3]).losses[0] < default.base_loss


def test_direction_keys_exclude_frozen_parameters(ref, mlp):
    model, loss_fn, batch = mlp
    d = ref.random_direction(model)
    assert "net.0.bias" not in d
    out = sm.line_probe(model, loss_fn, batch, [0.1], direction=d)
    assert math.isfinite(out.effective_beta)
    with pytest.raises(ValueError, match="unexpected keys"):
        sm.line_probe(model, loss_fn, batch, [0.1], direction={**d, "net.0.bias": torch.zeros(10, dtype=torch.float64)})


def test_direction_order_and_dtype_do_not_matter(ref, mlp):
    model, loss_fn, batch = mlp
    d = ref.random_direction(model)
    reordered = dict(reversed(list(d.items())))
    a = sm.line_probe(model, loss_fn, batch, [0.1, 0.3], direction=d)
    b = sm.line_probe(model, loss_fn, batch, [0.1, 0.3], direction=reordered)
    assert a == b
    c = sm.line_probe(model, loss_fn, batch, [0.1, 0.3], direction={n: t.float() for n, t in d.items()})
    assert c.losses == pytest.approx(a.losses, rel=1e-6)


def test_step_sizes_accepts_any_sequence(ref, mlp):
    model, loss_fn, batch = mlp
    a = sm.line_probe(model, loss_fn, batch, [0.05, 0.1])
    b = sm.line_probe(model, loss_fn, batch, np.array([0.05, 0.1]))
    c = sm.line_probe(model, loss_fn, batch, (s for s in (0.05, 0.1)))
    assert a == b == c
    assert all(isinstance(s, float) for s in b.step_sizes)


def test_result_is_frozen_and_records_mode(ref, mlp):
    model, loss_fn, batch = mlp
    out = sm.line_probe(model, loss_fn, batch, [0.1], bn_mode="running")
    assert out.bn_mode == "running"
    with pytest.raises(dataclasses.FrozenInstanceError):
        out.bn_mode = "batch"


def test_bn_modes_give_different_probes(ref, mlp):
    model, loss_fn, batch = mlp
    a = sm.line_probe(model, loss_fn, batch, [0.1])
    b = sm.line_probe(model, loss_fn, batch, [0.1], bn_mode="running")
    assert a.base_loss != pytest.approx(b.base_loss, rel=1e-3)


def test_local_lipschitz_uses_true_l2_norm(ref, mlp):
    """‖∇L(w+u) − ∇L(w)‖ / ‖u‖ with ℓ2 norms over all parameters, not the seed's sum of per-tensor norms."""
    model, loss_fn, batch = mlp
    _, g0 = ref.naive_loss_grad(model, loss_fn, batch, "batch")
    u = {n: -0.04 * t for n, t in g0.items()}
    _, g1 = ref.naive_loss_grad(model, loss_fn, batch, "batch", shift=u, s=1.0)
    diff = {n: g1[n] - g0[n] for n in g0}
    expected = ref.l2(diff) / ref.l2(u)
    got = sm.local_lipschitz(model, loss_fn, batch, u).value
    assert got == pytest.approx(expected, rel=1e-10)
    seed_formula = math.sqrt(sum(float(t.norm()) for t in diff.values())) / math.sqrt(
        sum(float(t.norm()) for t in u.values()))
    assert got != pytest.approx(seed_formula, rel=1e-3)
    # equals the line probe at the single step s = 1 along u
    probe = sm.line_probe(model, loss_fn, batch, [1.0], direction=u)
    assert got == pytest.approx(probe.effective_beta, rel=1e-12)


def test_zero_gradient_default_direction_is_refused(ref):
    A = torch.eye(4, dtype=torch.float64)
    w_star = torch.arange(4, dtype=torch.float64)
    model = ref.Quadratic(w_star)  # at the minimum: gradient exactly zero
    batch = (torch.zeros(2, 1, dtype=torch.float64), w_star.expand(2, -1).clone())
    with pytest.raises(ValueError, match="gradient at w is exactly zero"):
        sm.line_probe(model, ref.quadratic_loss(A), batch, [0.1])
    out = sm.line_probe(model, ref.quadratic_loss(A), batch, [0.1], direction={"w": torch.ones(4, dtype=torch.float64)})
    assert out.effective_beta == pytest.approx(1.0, rel=1e-12)


def test_unused_parameter_has_zero_gradient_change(ref):
    class WithUnused(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2).double()
            self.unused = nn.Parameter(torch.ones(5, dtype=torch.float64))

        def forward(self, x):
            return self.lin(x)

    torch.manual_seed(0)
    model = WithUnused()
    batch = (torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,)))
    loss_fn = nn.CrossEntropyLoss()
    d = {"lin.weight": torch.zeros(2, 3, dtype=torch.float64), "lin.bias": torch.zeros(2, dtype=torch.float64),
         "unused": torch.ones(5, dtype=torch.float64)}
    out = sm.line_probe(model, loss_fn, batch, [0.5, 1.0], direction=d)
    assert out.grad_diff_norms == (0.0, 0.0)
    assert out.losses == (out.base_loss, out.base_loss)
    hv = sm.hvp(model, loss_fn, batch, d)
    assert torch.equal(hv["unused"], torch.zeros(5, dtype=torch.float64))
    assert sm.directional_curvature(model, loss_fn, batch, d).value == 0.0
