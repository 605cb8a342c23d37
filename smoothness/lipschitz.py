"""Local gradient-Lipschitz constant along one given step: ‖∇L(w + u) − ∇L(w)‖₂ / ‖u‖₂."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

from torch import nn

from ._objective import diff_norm, make_objective, norm


@dataclass(frozen=True)
class LocalLipschitz:
    value: float                     # ‖∇L(w + u) − ∇L(w)‖₂ / ‖u‖₂
    n_passes: int                    # forward+backward passes (2)
    bn_mode: str
    batch_size: int


def local_lipschitz(model: nn.Module, loss_fn: Callable, data, step: Mapping, *,
                    bn_mode: str = "batch") -> LocalLipschitz:
    """‖∇L(w + u) − ∇L(w)‖₂ / ‖u‖₂ with u = ``step``; norms are the true ℓ2 norm over all trainable parameters
    (not a sum of per-tensor norms). Two forward+backward passes on ``data`` (one batch or an iterable of them); the
    model is left exactly as it was."""
    objective = make_objective(model, loss_fn, data, bn_mode)
    u = objective.check_direction(step, "step")
    _, g0 = objective.loss_and_grad(check_finite=True)
    _, g1 = objective.loss_and_grad(u)
    return LocalLipschitz(value=diff_norm(g1, g0) / norm(u), n_passes=2, bn_mode=bn_mode,
                          batch_size=objective.n_samples)
