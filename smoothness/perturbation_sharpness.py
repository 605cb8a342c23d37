"""Sharpness as the loss increase under a bounded weight perturbation δ = T_w ν (T_w = |w| + η adaptive, or I):
worst case max_{‖ν‖_p ≤ ρ} L(w + δ) − L(w) and average case E_{ν ~ N(0, ρ²I)} L(w + δ) − L(w) (Andriushchenko et al.
2023), and Keskar et al.'s (2017) ε-sharpness. A NaN or ±inf perturbed loss counts as +inf in every measure here
and in ``smoothness.flatness`` (``value`` inf, ``n_non_finite`` > 0). Details: docs/smoothness.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
from torch import nn

from ._ascent import projected_ascent
from ._args import check_count, check_positive, generator_or_default
from ._objective import make_objective
from ._perturb import base_loss, blown_up, gaussian, loss_at, mean_and_stderr, weight_scale

NORMS = (2, math.inf)


@dataclass(frozen=True)
class WorstCaseSharpness:
    value: float                     # max found of L(w + δ) − L(w) (≥ 0: δ = 0 is feasible; a lower bound)
    base_loss: float
    increases: Tuple[float, ...]     # L(w + δ_k) − L(w) at each ascent iterate, to judge convergence
    rho: float
    adaptive: bool
    norm: float                      # 2 or inf
    eta: float                       # T_w = |w| + eta when adaptive
    n_steps: int
    n_passes: int                    # forward+backward passes
    start: str                       # "gradient", or "random" when ∇L(w) was 0
    bn_mode: str
    batch_size: int
    n_non_finite: int = 0            # perturbed evaluations whose loss was NaN or ±inf (value is then inf)


@dataclass(frozen=True)
class AverageCaseSharpness:
    value: float                     # mean over samples of L(w + δ) − L(w)
    stderr: float                    # standard error of that mean
    base_loss: float
    rho: float
    adaptive: bool
    eta: float
    n_samples: int
    n_passes: int                    # forward passes (one backward more, at w, for the determinism check)
    bn_mode: str
    batch_size: int
    n_non_finite: int = 0            # perturbed evaluations whose loss was NaN or ±inf (value is then inf)


@dataclass(frozen=True)
class EpsilonSharpness:
    value: float                     # 100·(max L − L(w)) / (1 + L(w)), Keskar et al.'s percentage
    max_loss: float
    base_loss: float
    epsilon: float
    n_steps: int
    n_passes: int
    bn_mode: str
    batch_size: int
    n_non_finite: int = 0            # perturbed evaluations whose loss was NaN or ±inf (value is then inf)


def _check_norm(norm) -> float:
    if isinstance(norm, bool) or norm not in NORMS:
        raise ValueError(f"norm must be 2 or float('inf'), got {norm!r}")
    return float(norm)


def worst_case_sharpness(model: nn.Module, loss_fn: Callable, data, *, rho: float, adaptive: bool = True,
                         norm: float = 2, eta: float = 0.0, n_steps: int = 20, bn_mode: str = "batch",
                         generator: Optional[torch.Generator] = None) -> WorstCaseSharpness:
    """max over ‖T_w⁻¹δ‖_norm ≤ rho of L(w + δ) − L(w) by ``n_steps`` steps of APGD-style projected ascent.

    Costs n_steps + 1 forward+backward passes. ``generator`` (default seeded with ``ESTIMATOR_SEED``) is used only
    when ∇L(w) is 0
    on the ball's support, for a random first point (recorded as ``start="random"``).
    """
    rho = check_positive("rho", rho)
    p = _check_norm(norm)
    eta = check_positive("eta", eta, allow_zero=True)
    check_count("n_steps", n_steps, 1)
    objective = make_objective(model, loss_fn, data, bn_mode)
    out = projected_ascent(objective, weight_scale(objective, adaptive, eta), rho, p, n_steps,
                           generator_or_default(generator))
    return WorstCaseSharpness(value=out.best_loss - out.base_loss, base_loss=out.base_loss, increases=out.increases,
                              rho=rho, adaptive=bool(adaptive), norm=p, eta=eta, n_steps=n_steps,
                              n_passes=out.n_passes, start=out.start, bn_mode=bn_mode,
                              batch_size=objective.n_samples, n_non_finite=out.n_non_finite)


def epsilon_sharpness(model: nn.Module, loss_fn: Callable, data, *, epsilon: float = 1e-3, n_steps: int = 20,
                      bn_mode: str = "batch", generator: Optional[torch.Generator] = None) -> EpsilonSharpness:
    """Keskar et al. (2017): 100·(max over |δᵢ| ≤ ε(|wᵢ| + 1) of L(w + δ) − L(w)) / (1 + L(w)), in percent.

    The box is the ℓ∞ ball of :func:`worst_case_sharpness` with T_w = |w| + 1; Keskar et al. report ε = 1e-3 and
    5e-4. Costs n_steps + 1 forward+backward passes.
    """
    epsilon = check_positive("epsilon", epsilon)
    check_count("n_steps", n_steps, 1)
    objective = make_objective(model, loss_fn, data, bn_mode)
    out = projected_ascent(objective, weight_scale(objective, True, 1.0), epsilon, math.inf, n_steps,
                           generator_or_default(generator))
    return EpsilonSharpness(value=100 * (out.best_loss - out.base_loss) / (1 + out.base_loss),
                            max_loss=out.best_loss, base_loss=out.base_loss, epsilon=epsilon, n_steps=n_steps,
                            n_passes=out.n_passes, bn_mode=bn_mode, batch_size=objective.n_samples,
                            n_non_finite=out.n_non_finite)


def average_case_sharpness(model: nn.Module, loss_fn: Callable, data, *, rho: float, n_samples: int = 100,
                           generator: Optional[torch.Generator] = None, adaptive: bool = True, eta: float = 0.0,
                           bn_mode: str = "batch") -> AverageCaseSharpness:
    """E_{δ ~ N(0, ρ² T_w²)} L(w + δ) − L(w) over ``n_samples`` Monte Carlo draws from ``generator`` (default
    seeded with ``ESTIMATOR_SEED``; δ = ρ·T_w ⊙ z, z drawn parameter by parameter in ``named_parameters`` order),
    with its standard error. One forward pass per draw (per chunk), plus one forward+backward pass at w."""
    rho = check_positive("rho", rho)
    eta = check_positive("eta", eta, allow_zero=True)
    check_count("n_samples", n_samples, 2)
    generator = generator_or_default(generator)
    objective = make_objective(model, loss_fn, data, bn_mode)
    scale = weight_scale(objective, adaptive, eta)
    f0 = base_loss(objective)
    samples = []
    for _ in range(n_samples):
        z = gaussian(objective, generator)
        samples.append(blown_up(loss_at(objective, {n: rho * scale[n] * z[n] for n in objective.names})) - f0)
    n_non_finite = sum(x == math.inf for x in samples)
    value, stderr = (math.inf, math.nan) if n_non_finite else mean_and_stderr(samples)
    return AverageCaseSharpness(value=value, stderr=stderr, base_loss=f0, rho=rho, adaptive=bool(adaptive), eta=eta,
                                n_samples=n_samples, n_passes=n_samples + 1, bn_mode=bn_mode,
                                batch_size=objective.n_samples, n_non_finite=n_non_finite)
