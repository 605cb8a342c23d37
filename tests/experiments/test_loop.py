"""experiments.loop.run_steps: hooks run when and where the schedule says, records come out in the order they
describe, divergence is reported at the first non-finite step, and the loop's step is torch's step."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import smoothness
from experiments.loop import FLUSH_EVERY, Diverged, Hook, Timer, run_steps


def _setup(lr=0.1, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 4, generator=g), torch.randint(0, 3, (40,), generator=g)
    batches = lambda t: (x[(4 * t) % 40:(4 * t) % 40 + 4], y[(4 * t) % 40:(4 * t) % 40 + 4])  # noqa: E731
    return model, torch.optim.SGD(model.parameters(), lr=lr), batches


def _log_hook(name, every, when, log):
    def fn(state):
        snapshot = [p.detach().clone() for p in state.model.parameters()]
        grads = [None if p.grad is None else p.grad.clone() for p in state.model.parameters()]
        log.append((name, state.step, snapshot, grads, state.batch is not None, state.loss is not None))
        return {"kind": name, "step": state.step}
    return Hook(name, every, when, fn)


def test_hooks_run_on_schedule_in_order_and_see_the_right_weights():
    model, opt, batches = _setup()
    log, records = [], []
    hooks = [_log_hook("point", 4, "point", log), _log_hook("before", 3, "before", log),
             _log_hook("gradient", 2, "gradient", log)]
    reference = copy.deepcopy(model)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    weights, gradients = [[p.detach().clone() for p in reference.parameters()]], []
    for t in range(10):  # the plain loop the hooks' weights and gradients are checked against
        xb, yb = batches(t)
        ref_opt.zero_grad()
        F.cross_entropy(reference(xb), yb).backward()
        gradients.append([p.grad.clone() for p in reference.parameters()])
        ref_opt.step()
        weights.append([p.detach().clone() for p in reference.parameters()])
    run_steps(model, opt, None, batches, start=0, total=10, hooks=hooks, emit=records.append,
              epoch_of=lambda t: t // 5, timer=Timer("cpu"))
    calls = [(name, step) for name, step, *_ in log]
    assert calls == [("point", 0), ("before", 0), ("gradient", 0), ("gradient", 2), ("before", 3),
                     ("point", 4), ("gradient", 4), ("before", 6), ("gradient", 6), ("point", 8),
                     ("gradient", 8), ("before", 9), ("point", 10)]  # the final point always runs
    for name, step, snapshot, grads, has_batch, has_loss in log:
        assert all(torch.equal(a, b) for a, b in zip(snapshot, weights[step])), (name, step)  # w_t, not w_t+1
        assert has_batch == (name != "point") and has_loss == (name == "gradient")
        if name == "gradient":  # .grad holds this step's gradient, the step not yet taken
            assert all(torch.equal(a, b) for a, b in zip(grads, gradients[step])), step
    # the loop's own steps are torch's: final weights equal the plain loop's
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), weights[-1]))
    # records in the order of the steps they describe: a step record before any record of a later step
    order = [(r["step"], 0 if r["kind"] == "point" else 1 if r["kind"] == "before" else
              2 if r["kind"] == "gradient" else 3) for r in records]
    assert order == sorted(order)
    steps = [r for r in records if r["kind"] == "step"]
    assert [r["step"] for r in steps] == list(range(10)) and [r["epoch"] for r in steps] == [t // 5 for t in range(10)]


def test_resumed_loop_skips_the_point_it_starts_from_and_adds_record_fields():
    model, opt, batches = _setup()
    log, records = [], []
    run_steps(model, opt, None, batches, start=4, total=6, hooks=[_log_hook("point", 2, "point", log)],
              emit=records.append, epoch_of=lambda t: 0, timer=Timer("cpu"), skip_first_point=True,
              extra_records=lambda t: {"lr": 0.1 * t})
    assert [(n, s) for n, s, *_ in log] == [("point", 6)]
    assert [(r["step"], r["lr"]) for r in records if r["kind"] == "step"] == [(4, pytest.approx(0.4)),
                                                                                (5, pytest.approx(0.5))]


def test_step_records_are_flushed_in_blocks_and_progress_reported():
    model, opt, batches = _setup()
    emitted, progress = [], []
    run_steps(model, opt, None, batches, start=0, total=2 * FLUSH_EVERY + 3, hooks=[],
              emit=lambda r: emitted.append((r["step"], len(progress))), epoch_of=lambda t: 0, timer=Timer("cpu"),
              on_flush=progress.append)
    assert progress == [FLUSH_EVERY, 2 * FLUSH_EVERY, 2 * FLUSH_EVERY + 3]
    assert [s for s, _ in emitted] == list(range(2 * FLUSH_EVERY + 3))


def test_divergence_is_reported_at_the_first_non_finite_step():
    model, opt, batches = _setup()
    records = []

    def poison(state):  # the weights become NaN in the step taken after step 7's gradient
        if state.step == 7:
            with torch.no_grad():
                next(state.model.parameters()).grad.fill_(float("nan"))

    with pytest.raises(Diverged) as err:
        run_steps(model, opt, None, batches, start=0, total=30, hooks=[Hook("poison", 1, "gradient", poison)],
                  emit=records.append, epoch_of=lambda t: 0, timer=Timer("cpu"))
    assert err.value.step == 8 and err.value.reason == "non-finite training loss"
    assert [r["step"] for r in records] == list(range(8))


def test_a_hook_that_meets_a_non_finite_loss_names_itself():
    model, opt, batches = _setup()

    def measure(state):
        raise smoothness.NonFiniteLossError("nan")

    with pytest.raises(Diverged) as err:
        run_steps(model, opt, None, batches, start=0, total=5,
                  hooks=[Hook("probe", 2, "before", measure, what="a line probe")],
                  emit=lambda r: None, epoch_of=lambda t: 0, timer=Timer("cpu"))
    assert (err.value.step, err.value.reason) == (0, "non-finite loss at a line probe")


def test_timer_books_each_hook_under_its_name():
    model, opt, batches = _setup()
    timer = Timer("cpu")
    run_steps(model, opt, None, batches, start=0, total=3,
              hooks=[Hook("probe", 1, "before", lambda s: None), Hook("own", 1, "point", lambda s: None, timed=False)],
              emit=lambda r: None, epoch_of=lambda t: 0, timer=timer)
    assert set(timer.seconds) == {"train", "probe"} and all(v > 0 for v in timer.seconds.values())


def test_bad_when_is_refused():
    with pytest.raises(ValueError, match="when must be one of"):
        Hook("x", 1, "after", lambda s: None)
