"""The training loop, with measurements as hooks on a schedule. `train_run` and `smoothness-lab ics` both run it.

Each step t runs the point hooks at w_t (evaluation, checkpoint), the before hooks on the batch, forward and
backward, the gradient hooks with the gradient known, the optimizer and scheduler steps and the step record; the
point hooks run once more at the final weights. A non-finite loss ends the loop with `Diverged`.

Details: docs/explanation/modules.md#loop
"""
from __future__ import annotations

import contextlib
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import smoothness

FLUSH_EVERY = 50
WHEN = ("point", "before", "gradient")


class Diverged(Exception):
    """The loss stopped being finite at ``step``; ``reason`` says where it was seen."""

    def __init__(self, step: int, reason: str):
        super().__init__(reason)
        self.step, self.reason = step, reason


class StopTraining(Exception):
    """Raised by a point hook to end the run at this point (e.g. a target training loss was reached): the run is
    finished there, as if ``total`` had been this step."""

    def __init__(self, step: int):
        super().__init__(f"stopped at step {step}")
        self.step = step


@dataclass
class StepState:
    """What a hook sees. ``batch`` is None at points; ``loss`` is set for gradient hooks (``.grad`` holds ∇L)."""

    step: int
    model: nn.Module
    optimizer: torch.optim.Optimizer
    batch: Optional[tuple] = None
    loss: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class Hook:
    """``fn(state)`` returns the records it made (a dict, a list of dicts or None). It is timed under ``name``
    unless ``timed`` is False (a hook that times its parts itself); ``what`` names it in a divergence reason."""

    name: str
    every: int
    when: str
    fn: Callable[[StepState], object]
    timed: bool = True
    what: str = ""

    def __post_init__(self):
        if self.when not in WHEN:
            raise ValueError(f"hook {self.name!r}: when must be one of {WHEN}, got {self.when!r}")

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0


class Timer:
    """Seconds per phase (``with timer("probe"): ...``), synchronising CUDA so that asynchronous work is counted."""

    def __init__(self, device: torch.device, seconds: Optional[Dict[str, float]] = None):
        self.device = torch.device(device)
        self.seconds = dict(seconds or {})

    @contextmanager
    def __call__(self, phase: str):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


@dataclass
class StepRecords:
    """Step losses kept on the device until written (a .tolist() per step would synchronise every step): ``add``
    after each step, ``flush`` writes them (one host transfer), raising `Diverged` at the first non-finite loss.
    `run_steps` and `experiments.tracker.Tracker` both buffer their step records here."""

    emit: Callable[[dict], None]
    epoch_of: Callable[[int], int]
    on_flush: Optional[Callable[[int], None]] = None
    pending: List = field(default_factory=list)

    def add(self, step: int, loss: torch.Tensor, accuracy: torch.Tensor, extra: dict) -> None:
        self.pending.append((step, loss.detach(), accuracy, extra))

    @property
    def full(self) -> bool:
        """``FLUSH_EVERY`` steps are waiting: time to write them."""
        return len(self.pending) >= FLUSH_EVERY

    def flush(self) -> None:
        if not self.pending:
            return
        values = torch.stack([torch.stack([loss, acc]) for _, loss, acc, _ in self.pending]).tolist()
        pending, self.pending = self.pending, []
        for (step, _, _, extra), (loss, acc) in zip(pending, values):
            if not math.isfinite(loss):
                raise Diverged(step, "non-finite training loss")
            self.emit({"kind": "step", "step": step, "epoch": self.epoch_of(step), "bn_mode": "batch",
                       "loss": loss, "accuracy": acc, **extra})
        if self.on_flush is not None:
            self.on_flush(pending[-1][0] + 1)


def records_of(out) -> Iterable[dict]:
    """The records a hook returned: a dict, a list of dicts or None."""
    if out is None:
        return ()
    return (out,) if isinstance(out, dict) else out


def run_hooks(hooks: Sequence[Hook], when: str, state: StepState, due: Callable[[Hook], bool], *, timer: Timer,
              steps: StepRecords, emit: Callable[[dict], None]) -> List[str]:
    """Run the hooks of kind ``when`` for which ``due(hook)`` holds, in order, at ``state``: the buffered step
    records are written first (divergence at an earlier step is found before a hook runs on its weights), then each
    hook's records; a hook's ``smoothness.NonFiniteLossError`` becomes `Diverged`. Returns the names of the hooks
    that ran."""
    ran = []
    for hook in hooks:
        if hook.when == when and due(hook):
            steps.flush()
            try:
                with timer(hook.name) if hook.timed else contextlib.nullcontext():
                    out = hook.fn(state)
            except smoothness.NonFiniteLossError:
                raise Diverged(state.step, f"non-finite loss at {hook.what or hook.name}") from None
            for r in records_of(out):
                steps.flush()
                emit(r)
            ran.append(hook.name)
    return ran


def run_steps(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, batches: Callable[[int], tuple],
              *, start: int, total: int, hooks: Sequence[Hook], emit: Callable[[dict], None],
              epoch_of: Callable[[int], int], timer: Timer, loss_fn: Callable = F.cross_entropy,
              skip_first_point: bool = False, on_flush: Optional[Callable[[int], None]] = None,
              extra_records: Optional[Callable[[int], dict]] = None) -> None:
    """Steps ``start`` … ``total − 1`` with ``hooks`` on their schedule (module docstring); raises `Diverged`.

    ``batches(t)`` gives step t's (inputs, targets); ``epoch_of(t)`` the epoch a step record belongs to;
    ``extra_records(t)`` extra fields of step t's record (e.g. the scheduled learning rate), if any.
    """
    steps = StepRecords(emit, epoch_of, on_flush)

    def run(when: str, state: StepState) -> None:
        run_hooks(hooks, when, state, lambda hook: hook.due(state.step) or (when == "point" and state.step == total),
                  timer=timer, steps=steps, emit=emit)

    extra = extra_records or (lambda t: {})
    for t in range(start, total):
        if not (skip_first_point and t == start):
            run("point", StepState(t, model, optimizer))
        xb, yb = batches(t)
        run("before", StepState(t, model, optimizer, (xb, yb)))
        with timer("train"):
            model.train()
            out = model(xb)
            loss = loss_fn(out, yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        run("gradient", StepState(t, model, optimizer, (xb, yb), loss.detach()))
        with timer("train"):
            fields = extra(t)  # before the step: the scheduler is about to move the learning rate on
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            steps.add(t, loss, (out.argmax(1) == yb).float().mean(), fields)
        if steps.full:
            steps.flush()
    steps.flush()
    if not (skip_first_point and start == total):
        run("point", StepState(total, model, optimizer))
