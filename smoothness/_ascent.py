"""Projected gradient ascent of L(w + T_w ν) − L(w) over the ball ‖ν‖_p ≤ ρ (APGD, Croce & Hein 2020): the one
routine behind worst-case sharpness and Keskar's ε-sharpness. Returns a lower bound on the maximum (every iterate is
feasible); a NaN or ±inf loss counts as +inf and stops the ascent. Details: docs/smoothness.md.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Tuple

import torch

from ._perturb import blown_up, flatten, unflatten

MOMENTUM = 0.75     # α in APGD
SUCCESS_RATE = 0.75  # ρ in APGD: fraction of increasing steps below which η is halved


class Ascent(NamedTuple):
    base_loss: float
    best_loss: float
    increases: Tuple[float, ...]   # L(w + δ_k) − L(w) at every iterate k = 1 … n_steps
    n_passes: int                  # forward+backward passes (n_steps + 1)
    start: str                     # "gradient" or "random" (∇L(w) was zero on the ball's support)
    final_step: float              # η at the end (η₀ = 2ρ, halved at checkpoints)
    n_non_finite: int              # 1 when an iterate's loss was NaN or ±inf (the ascent stops there), else 0


def checkpoints(n_steps: int) -> set:
    """APGD's checkpoints w_j = ⌈p_j·N⌉ with p₀ = 0, p₁ = 0.22, p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06)."""
    p = [0.0, 0.22]
    while p[-1] < 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    return {math.ceil(q * n_steps) for q in p[1:] if q <= 1} - {0}


def projected_ascent(objective, scale, rho: float, p: float, n_steps: int, generator: torch.Generator) -> Ascent:
    """Maximise L(w + T ⊙ ν) over ‖ν‖_p ≤ ρ (``scale`` = T, a dict keyed like the parameters), see the module."""
    t = flatten(objective, scale)
    support = t != 0

    def project(x):
        if p == 2:
            n = float(torch.linalg.vector_norm(x))
            return x * (rho / n) if n > rho else x
        return x.clamp(-rho, rho)

    def direction(g):
        if p == 2:
            n = torch.linalg.vector_norm(g)
            return g / n if n > 0 else g
        return torch.sign(g)

    def evaluate(x):
        loss, grad = objective.loss_and_grad(unflatten(objective, t * x))
        return blown_up(float(loss)), t * flatten(objective, grad)

    loss0, grad0 = objective.loss_and_grad(check_finite=True)
    f0, g0 = float(loss0), t * flatten(objective, grad0)
    x = x_prev = torch.zeros_like(t)
    fx, gx = f0, g0
    best_f, best_x, best_g = f0, x, g0
    eta, start = 2 * rho, "gradient"
    ticks = checkpoints(n_steps)
    n_up, last_tick, eta_at_tick, best_at_tick = 0, 0, eta, best_f
    increases = []
    for k in range(n_steps):
        if k == 0:
            if bool((g0[support] != 0).any()):
                x_new = project(x + eta * direction(g0))
            else:
                start = "random"
                r = torch.randn(t.shape, generator=generator, dtype=t.dtype, device=generator.device).to(t.device)
                r = torch.where(support, r, torch.zeros_like(r))
                x_new = (rho * r / torch.linalg.vector_norm(r)) if p == 2 else rho * torch.sign(r)
        else:
            z = project(x + eta * direction(gx))
            x_new = project(x + MOMENTUM * (z - x) + (1 - MOMENTUM) * (x - x_prev))
        f_new, g_new = evaluate(x_new)
        increases.append(f_new - f0)
        if f_new == math.inf:   # the loss blew up inside the ball: the maximum is unbounded, nothing left to find
            return Ascent(base_loss=f0, best_loss=math.inf, increases=tuple(increases), n_passes=k + 2, start=start,
                          final_step=eta, n_non_finite=1)
        n_up += f_new > fx
        x_prev, x, fx, gx = x, x_new, f_new, g_new
        if f_new > best_f:
            best_f, best_x, best_g = f_new, x_new, g_new
        if k + 1 in ticks:
            stalled = eta == eta_at_tick and best_f == best_at_tick
            eta_at_tick, best_at_tick = eta, best_f
            if n_up < SUCCESS_RATE * (k + 1 - last_tick) or stalled:
                eta /= 2
                x = x_prev = best_x
                fx, gx = best_f, best_g
            n_up, last_tick = 0, k + 1
    return Ascent(base_loss=f0, best_loss=best_f, increases=tuple(increases), n_passes=n_steps + 1, start=start,
                  final_step=eta, n_non_finite=0)
