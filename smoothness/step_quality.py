"""Step quality α (Cockpit's Alpha, Schneider et al. 2021; METHODS.md §12).

Along the step s taken from w (length t = ‖s‖, direction ŝ = s/t), four observations of f(τ) = L(w + τŝ) at
τ = 0 and τ = t: the mean losses f(0), f(t) and the mean directional derivatives f′(0), f′(t) = ŝᵀū, each with
its sample variance over units (per-unit losses ℓ_i and slopes ŝᵀu_i; m − 1). A quadratic
f(τ) = c + bτ + aτ² is fitted to them by least squares weighted by the inverse variances (Cockpit's
``_fit_quadratic``; a zero variance is replaced by 1e-10 as there). With ᾱ = −b/a, twice the fitted minimiser,

    α = 2t/ᾱ − 1,   and α = −1 when a ≤ 0 (the fit is not convex: still going downhill).

α = 0 steps to the minimum along the line, α = 1 to the other side at equal height; on an exact quadratic
α = t/t* − 1. :func:`step_quality` evaluates both ends on the same data. Cockpit takes the end point on the next
minibatch, which costs no extra pass during training: :func:`step_quality_from` fits α to any two
:class:`LineObservation` s, e.g. ``gradient_noise(..., directions={"step": s}).lines["step"]`` at w on batch k
(start) and ``observe_line`` (or ``gradient_noise``'s lines) at w + s on batch k + 1 (end).

Cost: one forward pass with forward-mode tangents (dual tensors) per chunk at each end; per-unit slopes need no
per-example backward pass.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ._objective import check_bn_mode, norm
from ._units import Units

#: what Cockpit puts in place of a zero variance
ZERO_VARIANCE = 1e-10


@dataclass(frozen=True)
class LineObservation:
    """The mean loss and mean slope ŝᵀu_i along a unit direction ŝ at one point, with their per-unit sample
    variances (m − 1)."""

    loss: float
    loss_variance: float
    slope: float
    slope_variance: float
    n_units: int
    unit: str
    bn_mode: str

    @classmethod
    def of(cls, losses: torch.Tensor, slopes: torch.Tensor, unit: str, bn_mode: str) -> "LineObservation":
        losses, slopes = losses.double(), slopes.double()
        obs = cls(loss=float(losses.mean()), loss_variance=float(losses.var(correction=1)),
                  slope=float(slopes.mean()), slope_variance=float(slopes.var(correction=1)),
                  n_units=int(losses.numel()), unit=unit, bn_mode=bn_mode)
        if not (math.isfinite(obs.loss) and math.isfinite(obs.slope)):
            raise ValueError(f"the loss ({obs.loss}) or its slope ({obs.slope}) along the step is not finite; the "
                             f"step leaves the region where the model is defined")
        return obs


@dataclass(frozen=True)
class StepQuality:
    alpha: float
    concave: bool                             # a ≤ 0: α reported as −1
    coefficients: Tuple[float, float, float]  # (c, b, a) of the fit f(τ) = c + bτ + aτ²
    step_length: float                        # t = ‖s‖
    start: LineObservation                    # f(0), f′(0) along ŝ = s/t, and their per-unit variances
    end: LineObservation                      # f(t), f′(t)
    n_units: int
    unit: str
    bn_mode: str

    @property
    def losses(self) -> Tuple[float, float]:
        return self.start.loss, self.end.loss

    @property
    def slopes(self) -> Tuple[float, float]:
        return self.start.slope, self.end.slope

    @property
    def loss_variances(self) -> Tuple[float, float]:
        return self.start.loss_variance, self.end.loss_variance

    @property
    def slope_variances(self) -> Tuple[float, float]:
        return self.start.slope_variance, self.end.slope_variance


def fit_quadratic(t: float, losses, slopes, loss_variances, slope_variances) -> np.ndarray:
    """(c, b, a) of f(τ) = c + bτ + aτ², least squares on f(0), f(t), f′(0), f′(t) weighted by 1/variance."""
    phi = np.array([[1.0, 0.0, 0.0], [1.0, t, t * t], [0.0, 1.0, 0.0], [0.0, 1.0, 2.0 * t]])
    values = np.array([*losses, *slopes], dtype=np.float64)
    variances = np.array([v if v != 0 else ZERO_VARIANCE for v in (*loss_variances, *slope_variances)])
    weights = 1.0 / np.sqrt(variances)
    coef, *_ = np.linalg.lstsq(phi * weights[:, None], values * weights, rcond=None)
    return coef


def alpha_of(coef: np.ndarray, t: float) -> float:
    """α = 2t/ᾱ − 1 with ᾱ = −b/a; −1 when a ≤ 0."""
    _, b, a = coef
    if not a > 0:
        return -1.0
    return float(2.0 * t / (-b / a) - 1.0)


def step_quality_from(start: LineObservation, end: LineObservation, step_length: float) -> StepQuality:
    """α from two observations along the same step direction, ``step_length`` apart (see the module docstring)."""
    t = float(step_length)
    if not (t > 0 and math.isfinite(t)):
        raise ValueError(f"step_length must be positive and finite, got {step_length!r}")
    coef = fit_quadratic(t, (start.loss, end.loss), (start.slope, end.slope),
                         (start.loss_variance, end.loss_variance), (start.slope_variance, end.slope_variance))
    return StepQuality(alpha=alpha_of(coef, t), concave=not coef[2] > 0, coefficients=tuple(float(c) for c in coef),
                       step_length=t, start=start, end=end, n_units=start.n_units, unit=start.unit,
                       bn_mode=start.bn_mode)


def _prepare(model, loss_fn, data, direction, unit, params, bn_mode, what):
    check_bn_mode(bn_mode)
    units = Units(model, loss_fn, data, unit, params, bn_mode)
    d = units.objectives[0].check_direction(direction, what=what, names=units.names)
    return units, d, norm(d)


def observe_line(model: nn.Module, loss_fn: Callable, data, direction: Mapping[str, torch.Tensor], *,
                 unit: str = "example", params: Optional[Sequence[str]] = None,
                 bn_mode: str = "batch") -> LineObservation:
    """Loss and slope along direction/‖direction‖ at the model's w, per unit, by one forward-mode pass."""
    units, d, length = _prepare(model, loss_fn, data, direction, unit, params, bn_mode, "direction")
    losses, slopes = units.line({n: v / length for n, v in d.items()})
    return LineObservation.of(losses, slopes, unit, bn_mode)


def step_quality(model: nn.Module, loss_fn: Callable, data, step: Mapping[str, torch.Tensor], *,
                 unit: str = "example", params: Optional[Sequence[str]] = None,
                 bn_mode: str = "batch") -> StepQuality:
    """α of the step ``step`` (a dict of parameter changes keyed like ``named_parameters``, restricted to ``params``
    when given) from w = the model's current parameters, both ends on ``data`` (as for :func:`gradient_noise`)."""
    units, s, t = _prepare(model, loss_fn, data, step, unit, params, bn_mode, "step")
    direction = {n: v / t for n, v in s.items()}
    start, end = (LineObservation.of(*units.line(direction, shift=shift), unit, bn_mode) for shift in (None, s))
    return step_quality_from(start, end, t)
