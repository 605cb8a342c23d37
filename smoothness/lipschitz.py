"""Local gradient-Lipschitz constant along one given step (seed homework 003's "local smoothness")."""
from __future__ import annotations

from typing import Callable, Mapping

from torch import nn

from ._objective import Objective, diff_norm, norm


def local_lipschitz(model: nn.Module, loss_fn: Callable, batch, step: Mapping, *, bn_mode: str = "batch") -> float:
    """‖∇L(w + u) − ∇L(w)‖₂ / ‖u‖₂ with u = ``step``; norms are the true ℓ2 norm over all trainable parameters.

    The seed notebook summed per-tensor norms and took square roots; this is the quantity its formula defines.
    Two forward+backward passes on ``batch``; the model is left exactly as it was.
    """
    objective = Objective(model, loss_fn, batch, bn_mode)
    u = objective.check_direction(step, "step")
    _, g0 = objective.loss_and_grad(check_finite=True)
    _, g1 = objective.loss_and_grad(u)
    return diff_norm(g1, g0) / norm(u)
