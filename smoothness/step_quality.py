"""Step quality α (Cockpit's Alpha, Schneider et al. 2021; METHODS.md §12).

Along the step s taken from w (length t = ‖s‖, direction ŝ = s/t), four observations of f(τ) = L(w + τŝ) at
τ = 0 and τ = t: the mean losses f(0), f(t) and the mean directional derivatives f′(0), f′(t) = ŝᵀū, each with
its sample variance over units (per-unit losses ℓ_i and slopes ŝᵀu_i; m − 1). A quadratic
f(τ) = c + bτ + aτ² is fitted to them by least squares weighted by the inverse variances (Cockpit's
``_fit_quadratic``; a zero variance is replaced by 1e-10 as there). With ᾱ = −b/a, twice the fitted minimiser,

    α = 2t/ᾱ − 1,   and α = −1 when a ≤ 0 (the fit is not convex: still going downhill).

α = 0 steps to the minimum along the line, α = 1 to the other side at equal height; on an exact quadratic
α = t/t* − 1. Both ends are evaluated on the same data (Cockpit takes the end on the next minibatch).

Cost: one forward pass with forward-mode tangents (``torch.func.jvp``) per chunk at each end; per-unit slopes need
no per-example backward pass.
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
class StepQuality:
    alpha: float
    concave: bool                             # a ≤ 0: α reported as −1
    coefficients: Tuple[float, float, float]  # (c, b, a) of the fit f(τ) = c + bτ + aτ²
    step_length: float                        # t = ‖s‖
    losses: Tuple[float, float]               # f(0), f(t)
    slopes: Tuple[float, float]               # f′(0), f′(t) along ŝ = s/t
    loss_variances: Tuple[float, float]       # per-unit sample variances (m − 1) of ℓ_i at 0 and t
    slope_variances: Tuple[float, float]      # ... of ŝᵀu_i at 0 and t
    n_units: int
    unit: str
    bn_mode: str


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


def step_quality(model: nn.Module, loss_fn: Callable, data, step: Mapping[str, torch.Tensor], *,
                 unit: str = "example", params: Optional[Sequence[str]] = None,
                 bn_mode: str = "batch") -> StepQuality:
    """α of the step ``step`` (a dict of parameter changes keyed like ``named_parameters``, restricted to ``params``
    when given) from w = the model's current parameters, on ``data`` (as for :func:`gradient_noise`)."""
    check_bn_mode(bn_mode)
    units = Units(model, loss_fn, data, unit, params, bn_mode)
    s = units.objectives[0].check_direction(step, what="step", names=units.names)
    t = norm(s)
    direction = {n: v / t for n, v in s.items()}
    observations = [units.line(direction), units.line(direction, shift=s)]
    losses = tuple(float(l.double().mean()) for l, _ in observations)
    slopes = tuple(float(d.double().mean()) for _, d in observations)
    loss_vars = tuple(float(l.double().var(correction=1)) for l, _ in observations)
    slope_vars = tuple(float(d.double().var(correction=1)) for _, d in observations)
    for value in (*losses, *slopes):
        if not math.isfinite(value):
            raise ValueError(f"the loss or its slope along the step is not finite ({value}); the step leaves the "
                             f"region where the model is defined")
    coef = fit_quadratic(t, losses, slopes, loss_vars, slope_vars)
    return StepQuality(alpha=alpha_of(coef, t), concave=not coef[2] > 0,
                       coefficients=tuple(float(c) for c in coef), step_length=t, losses=losses, slopes=slopes,
                       loss_variances=loss_vars, slope_variances=slope_vars, n_units=units.n_units, unit=unit,
                       bn_mode=bn_mode)
