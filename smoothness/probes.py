"""Santurkar et al. (2018, Fig. 4) line probes: the loss and gradient along the step actually taken.

One routine, :func:`line_probe`, underlies the three measures of the paper: the loss landscape (range of
``losses``), gradient predictiveness (``grad_diff_norms``) and the "effective" β-smoothness (``effective_beta``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence, Tuple

from torch import nn

from ._objective import diff_norm, make_objective, norm


@dataclass(frozen=True)
class LineProbe:
    """Loss and gradient at the points w + s·d, one entry per step size s."""

    step_sizes: Tuple[float, ...]
    base_loss: float
    losses: Tuple[float, ...]
    grad_diff_norms: Tuple[float, ...]   # ‖∇L(w + s·d) − ∇L(w)‖₂ over all trainable parameters
    distances: Tuple[float, ...]         # ‖s·d‖₂
    grad_norm: float                     # ‖∇L(w)‖₂
    direction_norm: float                # ‖d‖₂
    bn_mode: str
    n_passes: int                        # forward+backward passes used

    @property
    def loss_range(self) -> Tuple[float, float]:
        return (min(self.losses), max(self.losses))

    @property
    def grad_diff_range(self) -> Tuple[float, float]:
        return (min(self.grad_diff_norms), max(self.grad_diff_norms))

    @property
    def effective_beta(self) -> float:
        """max over s of ‖∇L(w + s·d) − ∇L(w)‖ / ‖s·d‖: the gradient-Lipschitz constant seen along d."""
        return max(g / r for g, r in zip(self.grad_diff_norms, self.distances))


def check_step_sizes(step_sizes) -> Tuple[float, ...]:
    try:
        values = tuple(float(s) for s in step_sizes)
    except TypeError:
        raise TypeError("step_sizes must be a sequence of positive numbers") from None
    if not values:
        raise ValueError("step_sizes is empty: give at least one positive step size")
    bad = [s for s in values if not (s > 0 and math.isfinite(s))]
    if bad:
        raise ValueError(f"step_sizes must all be positive and finite; got {bad}")
    return values


def line_probe(model: nn.Module, loss_fn: Callable, data, step_sizes: Sequence[float], *,
               direction: Optional[Mapping] = None, bn_mode: str = "batch") -> LineProbe:
    """Walk from w along d (default d = −∇L(w; B)) and record loss and gradient change at each w + s·d.

    Costs len(step_sizes) + 1 forward+backward passes on ``data`` (one batch or an iterable of them); the model is
    left exactly as it was.
    """
    steps = check_step_sizes(step_sizes)
    objective = make_objective(model, loss_fn, data, bn_mode)
    d = None if direction is None else objective.check_direction(direction)
    base_loss, base_grad = objective.loss_and_grad(check_finite=True)
    if d is None:
        d = {n: -g for n, g in base_grad.items()}
        if not any(bool((g != 0).any()) for g in d.values()):
            raise ValueError("the gradient at w is exactly zero, so the default direction d = -grad is zero; "
                             "pass an explicit direction")
    d_norm = norm(d)
    losses, diffs = [], []
    for s in steps:
        loss, grad = objective.loss_and_grad(d, s)
        losses.append(float(loss))
        diffs.append(diff_norm(grad, base_grad))
    return LineProbe(step_sizes=steps, base_loss=float(base_loss), losses=tuple(losses),
                     grad_diff_norms=tuple(diffs), distances=tuple(s * d_norm for s in steps),
                     grad_norm=norm(base_grad), direction_norm=d_norm, bn_mode=bn_mode,
                     n_passes=len(steps) + 1)
