"""experiments.optim: the factory maps every option to the textbook update, schedules follow their closed forms,
the look-ahead step is the real step to the bit and changes nothing, and the stability thresholds hold on torch's
own optimizers."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from experiments.optim import (OPTIMIZERS, build_optimizer, build_schedule, lookahead, lr_at,
                               stability_threshold)

# every optimizer option the toolkit exposes, each on its own and combined
SETTINGS = [
    ("sgd", {}),
    ("sgd", {"momentum": 0.9}),
    ("sgd", {"momentum": 0.9, "nesterov": True}),
    ("sgd", {"momentum": 0.5, "weight_decay": 0.1}),
    ("adam", {}),
    ("adam", {"weight_decay": 0.1, "betas": (0.8, 0.99), "eps": 1e-6}),
    ("adamw", {"weight_decay": 0.1}),
]
IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in o.items()) or 'plain'}" for n, o in SETTINGS]


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def _grads(net, step):
    """A loss that changes with the step, so the optimizer state sees different gradients each time."""
    g = torch.Generator().manual_seed(100 + step)
    x, y = torch.randn(16, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g)
    net.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(net(x), y).backward()


def _textbook(name, opts, lrs, net, steps):
    """The update rules as written in the papers / torch docs, on plain tensors."""
    w = [p.detach().clone() for p in net.parameters()]
    mu, nesterov, wd = opts.get("momentum", 0.0), opts.get("nesterov", False), opts.get("weight_decay", 0.0)
    (b1, b2), eps = opts.get("betas", (0.9, 0.999)), opts.get("eps", 1e-8)
    buf = [None] * len(w)
    m = [torch.zeros_like(t) for t in w]
    v = [torch.zeros_like(t) for t in w]
    shadow = copy.deepcopy(net)
    for t in range(steps):
        with torch.no_grad():
            for p, wi in zip(shadow.parameters(), w):
                p.copy_(wi)
        _grads(shadow, t)
        eta = lrs[t]
        for i, p in enumerate(shadow.parameters()):
            g = p.grad.clone()
            if name == "sgd":
                g = g + wd * w[i]
                buf[i] = g if buf[i] is None else mu * buf[i] + g
                d = (g + mu * buf[i]) if nesterov else (buf[i] if mu else g)
                w[i] = w[i] - eta * d
            else:
                if name == "adamw":
                    w[i] = w[i] * (1 - eta * wd)
                else:
                    g = g + wd * w[i]
                m[i] = b1 * m[i] + (1 - b1) * g
                v[i] = b2 * v[i] + (1 - b2) * g * g
                mhat, vhat = m[i] / (1 - b1 ** (t + 1)), v[i] / (1 - b2 ** (t + 1))
                w[i] = w[i] - eta * mhat / (vhat.sqrt() + eps)
    return w


@pytest.mark.parametrize("schedule", ["constant", "cosine", "step"])
@pytest.mark.parametrize("name, opts", SETTINGS, ids=IDS)
def test_factory_and_schedule_follow_the_textbook_rules(name, opts, schedule):
    steps, lr = 12, 0.05
    kw = dict(total_steps=steps, warmup_steps=3, decay_every=4, decay_factor=0.5)
    lrs = [lr_at(t, lr, schedule, **kw) for t in range(steps)]
    net = _net()
    expected = _textbook(name, opts, lrs, net, steps)
    opt = build_optimizer(net.parameters(), name, lr=lr, **opts)
    sched = build_schedule(opt, schedule, **kw)
    for t in range(steps):
        assert opt.param_groups[0]["lr"] == pytest.approx(lrs[t], rel=1e-12)
        _grads(net, t)
        opt.step()
        sched.step()
    for p, e in zip(net.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("schedule, opts", [
    ("constant", {}), ("constant", {"warmup_steps": 5}), ("cosine", {}), ("cosine", {"warmup_steps": 50}),
    ("step", {"decay_every": 30, "decay_factor": 0.3}), ("step", {"decay_every": 7, "warmup_steps": 10}),
])
def test_torch_schedulers_equal_the_closed_form_over_a_long_run(schedule, opts):
    total, lr = 400, 0.7
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    sched = build_schedule(opt, schedule, total_steps=total, **opts)
    assert (sched is None) == (schedule == "constant" and opts.get("warmup_steps", 0) < 2)
    seen = []
    for _ in range(total):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        if sched is not None:
            sched.step()
    expected = [lr_at(t, lr, schedule, total_steps=total, **opts) for t in range(total)]
    assert seen == pytest.approx(expected, rel=1e-9, abs=1e-15)
    warm = opts.get("warmup_steps", 0)
    if warm:
        assert seen[0] == pytest.approx(lr / warm) and seen[warm - 1] == pytest.approx(lr)
    if schedule == "cosine":
        assert seen[warm] == pytest.approx(lr) and 0 < seen[-1] < 1e-3 * lr


def test_scheduler_state_round_trips_mid_warmup_and_mid_cosine():
    """Resume: a fresh optimizer + scheduler loading the saved states continue the same lr sequence."""
    def make():
        p = nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([p], lr=1.0)
        return opt, build_schedule(opt, "cosine", total_steps=60, warmup_steps=10)

    for stop in (4, 10, 33):
        opt, sched = make()
        lrs = []
        for _ in range(60):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        opt, sched = make()
        for _ in range(stop):
            opt.step()
            sched.step()
        saved = copy.deepcopy((opt.state_dict(), sched.state_dict()))
        opt, sched = make()
        opt.load_state_dict(saved[0])
        sched.load_state_dict(saved[1])
        rest = []
        for _ in range(60 - stop):
            rest.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        assert rest == lrs[stop:]


@pytest.mark.parametrize("name, opts", SETTINGS, ids=IDS)
def test_lookahead_is_the_real_step_and_changes_nothing(name, opts):
    net = _net()
    opt = build_optimizer(net.parameters(), name, lr=0.05, **opts)
    sched = build_schedule(opt, "cosine", total_steps=6, warmup_steps=2)
    named = dict(net.named_parameters())
    for t in range(6):
        _grads(net, t)
        before = {n: p.detach().clone() for n, p in named.items()}
        grads = {n: p.grad.clone() for n, p in named.items()}
        state = copy.deepcopy(opt.state_dict())
        ahead = lookahead(opt, named)
        # nothing moved: parameters, gradients and optimizer state (step counts included) are as they were
        for n, p in named.items():
            assert torch.equal(p, before[n]) and torch.equal(p.grad, grads[n])
        assert _same_state(opt.state_dict(), state)
        assert ahead.lr == opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        for n, p in named.items():  # the real step, bit for bit
            assert torch.equal(ahead.update[n], p.detach() - before[n]), n
        assert (ahead.preconditioner is not None) == name.startswith("adam")


def _same_state(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same_state(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_adam_step_is_minus_lr_times_preconditioner_inverse_times_momentum(name):
    """The preconditioner's exact form: Δw = −η P⁻¹ m_t (− ηλw for AdamW), m_t the uncorrected moving average."""
    net = _net()
    wd = 0.2
    opt = build_optimizer(net.parameters(), name, lr=0.03, weight_decay=wd if name == "adamw" else 0.0)
    named = dict(net.named_parameters())
    for t in range(5):
        _grads(net, t)
        ahead = lookahead(opt, named)
        w = {n: p.detach().clone() for n, p in named.items()}
        opt.step()
        for n, p in named.items():
            m = opt.state[p]["exp_avg"]
            decay = -0.03 * wd * w[n] if name == "adamw" else 0.0
            torch.testing.assert_close(ahead.update[n], -0.03 * m / ahead.preconditioner[n] + decay,
                                       rtol=1e-10, atol=1e-14)
            v, b2 = opt.state[p]["exp_avg_sq"], 0.999
            torch.testing.assert_close(ahead.preconditioner[n],
                                       (1 - 0.9 ** (t + 1)) * ((v / (1 - b2 ** (t + 1))).sqrt() + 1e-8))


def test_lookahead_of_parameters_without_gradient_is_zero():
    net = _net()
    opt = build_optimizer(net.parameters(), "adam", lr=0.1)
    named = dict(net.named_parameters())
    _grads(net, 0)
    net[2].bias.grad = None
    ahead = lookahead(opt, named)
    assert torch.equal(ahead.update["2.bias"], torch.zeros(3, dtype=torch.float64))
    assert torch.equal(ahead.preconditioner["2.bias"], torch.ones(3, dtype=torch.float64))
    assert torch.any(ahead.update["0.weight"] != 0)


def _growth(name, curvature, lr, steps=3000, warm=0, **opts):
    """max_t |w_t| / |w_0| for torch's optimizer on f(w) = curvature·|w|²/2 (w in R²) from a tiny start (so that
    Adam's √v̂ stays far below its ε). ``warm`` zero-gradient steps first: they only advance Adam's step count, so
    that its bias corrections are ≈ 1 when the quadratic starts."""
    w0 = 1e-15
    w = nn.Parameter(torch.tensor([w0, -2 * w0], dtype=torch.float64))
    opt = build_optimizer([w], name, lr=lr, **opts)
    for _ in range(warm):
        w.grad = torch.zeros_like(w)
        opt.step()
    largest = 0.0
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * curvature * (w ** 2).sum()).backward()
        opt.step()
        largest = max(largest, float(w.detach().norm()))
    return largest / float(torch.tensor([w0, -2 * w0]).norm())


@pytest.mark.parametrize("name, opts", [
    ("sgd", {}), ("sgd", {"momentum": 0.9}), ("sgd", {"momentum": 0.5, "nesterov": True}),
    ("sgd", {"momentum": 0.9, "nesterov": True}),
])
def test_sgd_thresholds_separate_stable_from_unstable(name, opts):
    lr = 0.1
    edge = stability_threshold(name, lr, momentum=opts.get("momentum", 0.0), nesterov=opts.get("nesterov", False))
    assert _growth(name, 0.97 * edge, lr, **opts) < 100
    assert _growth(name, 1.03 * edge, lr, **opts) > 1e20
    if not opts:
        assert edge == 2 / lr


@pytest.mark.parametrize("beta1", [0.9, 0.5])
def test_adam_threshold_on_the_preconditioned_sharpness(beta1):
    """With ε much larger than √v̂, Adam's preconditioner is frozen at P = ε·I (bias corrections ≈ 1 after the
    warm steps), so λ(P⁻¹H) = curvature/ε: torch's Adam is stable just below (2 + 2β₁)/((1 − β₁)η) and blows up
    just above it (until √v̂ reaches ε and the preconditioner grows: the adaptive edge of stability). 2/η, the
    threshold of plain GD, is far inside the stable range."""
    lr, eps = 0.01, 1e3
    edge = stability_threshold("adam", lr, beta1=beta1)
    if beta1 == 0.9:
        assert edge == pytest.approx(38 / lr)
    opts = dict(warm=400, betas=(beta1, 0.999), eps=eps)
    assert _growth("adam", 0.97 * edge * eps, lr, **opts) < 100
    assert _growth("adam", 1.03 * edge * eps, lr, **opts) > 1e6
    assert _growth("adam", 1.03 * 2 / lr * eps, lr, **opts) < 10


@pytest.mark.parametrize("call, message", [
    (lambda p: build_optimizer(p, "rmsprop", lr=0.1), "unknown optimizer 'rmsprop'; choose one of: sgd, adam, adamw"),
    (lambda p: build_optimizer(p, "sgd", lr=0.1, nesterov=True), "Nesterov momentum needs a positive momentum"),
    (lambda p: build_optimizer(p, "adam", lr=0.1, momentum=0.9), "momentum and nesterov are SGD's"),
    (lambda p: build_schedule(build_optimizer(p, lr=0.1), "linear", total_steps=5), "unknown schedule 'linear'"),
    (lambda p: build_schedule(build_optimizer(p, lr=0.1), "step", total_steps=5), "needs decay_every > 0"),
    (lambda p: build_schedule(build_optimizer(p, lr=0.1), "cosine", total_steps=5, warmup_steps=5),
     r"warmup_steps must be in \[0, total_steps=5\)"),
    (lambda p: stability_threshold("lbfgs", 0.1), "unknown optimizer 'lbfgs'"),
])
def test_bad_options_say_what_to_do(call, message):
    with pytest.raises(ValueError, match=message):
        call([nn.Parameter(torch.zeros(2))])


def test_every_optimizer_is_covered():
    assert {n for n, _ in SETTINGS} == set(OPTIMIZERS)
    assert math.isclose(stability_threshold("adamw", 2.0), 19.0)
