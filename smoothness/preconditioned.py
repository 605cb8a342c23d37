"""Preconditioned sharpness λ_max(P⁻¹H): the curvature an adaptive optimizer's step actually sees.

An optimizer whose step is −η·P⁻¹·(momentum of the gradient), with P diagonal and positive (Adam, RMSProp), is on a
quadratic a gradient method on the loss in the coordinates u = P^{1/2}w, whose Hessian is P^{-1/2} H P^{-1/2}. That
matrix is similar to P⁻¹H (same eigenvalues) and symmetric, so Lanczos applies to it unchanged. Cohen et al. (2022,
"Adaptive Gradient Methods at the Edge of Stability") track its top eigenvalue, which equilibrates at the
optimizer's stability threshold (38/η for Adam with β₁ = 0.9); which P an optimizer uses is the caller's business
(experiments.optim builds Adam's).
"""
from __future__ import annotations

from typing import Callable, Mapping, Optional

import torch
from torch import nn

from ._objective import Objective
from .curvature import EigenResult
from .hvp import HessianOperator
from .lanczos import lanczos_top


def _check_preconditioner(objective: Objective, preconditioner: Mapping) -> dict:
    p = objective.check_direction(preconditioner, "preconditioner")
    bad = [n for n, t in p.items() if not bool((t > 0).all())]
    if bad:
        raise ValueError(f"the preconditioner must be positive everywhere (a diagonal P > 0); entries <= 0 in "
                         f"{bad}. Adam's P = (1 − β₁ᵗ)(√v̂ + ε) is positive once ε > 0")
    return p


def preconditioned_top_eigenvalues(model: nn.Module, loss_fn: Callable, batch, preconditioner: Mapping, k: int = 1,
                                   *, tol: float = 1e-3, max_iter: Optional[int] = None, bn_mode: str = "batch",
                                   generator: Optional[torch.Generator] = None) -> EigenResult:
    """The k largest eigenvalues of P⁻¹∇²_w L(w; B) for the diagonal preconditioner ``P`` (a dict of positive
    tensors keyed like ``dict(model.named_parameters())``), by Lanczos on P^{-1/2} H P^{-1/2}.

    Same contract as ``top_eigenvalues``: converged means every value's estimated error is at most ``tol``
    relative; deterministic start (generator seeded with 0); one extra backward pass per product; the model is left
    exactly as it was. With P = 1 it is ``top_eigenvalues``.
    """
    objective = Objective(model, loss_fn, batch, bn_mode)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < objective.n_params:
        raise ValueError(f"k must be an int with 1 <= k < number of trainable parameters ({objective.n_params}); "
                         f"got {k!r}")
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol}")
    p = _check_preconditioner(objective, preconditioner)
    op = HessianOperator(objective)
    scale = op.flatten({n: t.rsqrt() for n, t in p.items()})

    def matvec(v: torch.Tensor) -> torch.Tensor:
        return scale * op.matvec(scale * v)

    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    out = lanczos_top(matvec, op.n, k, tol=tol, max_iter=max_iter, dtype=op.dtype, device=op.device, generator=gen)
    return EigenResult(values=tuple(float(v) for v in out.values), n_hvp=op.n_hvp, converged=out.converged,
                       error_bounds=tuple(float(b) for b in out.error_bounds), bn_mode=bn_mode,
                       batch_size=int(objective.inputs.shape[0]))
