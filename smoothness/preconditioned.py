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

from ._objective import make_objective, sample_count
from .curvature import EigenResult
from .hvp import hessian_operator
from .lanczos import lanczos_top


def _check_preconditioner(objective, preconditioner: Mapping) -> dict:
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

    Same contract as ``top_eigenvalues``: converged means every value's residual is at most ``tol`` relative (a
    true bound: the value is within it of an eigenvalue of P⁻¹H); deterministic start (generator seeded with 0); one
    extra backward pass per product; ``batch`` may be an iterable of batches; the model is left exactly as it was.
    With P = 1 it is ``top_eigenvalues``.
    """
    objective = make_objective(model, loss_fn, batch, bn_mode)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < objective.n_params:
        raise ValueError(f"k must be an int with 1 <= k < number of trainable parameters ({objective.n_params}); "
                         f"got {k!r}")
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol}")
    p = _check_preconditioner(objective, preconditioner)
    op = hessian_operator(objective)
    scale = op.flatten({n: t.rsqrt() for n, t in p.items()})

    def matmat(rows: torch.Tensor) -> torch.Tensor:
        return torch.stack([scale * op.matvec(scale * v) for v in rows])

    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    out = lanczos_top(matmat, op.n, k, tol=tol, max_matvec=max_iter, dtype=op.dtype, device=op.device,
                      generator=gen)
    return EigenResult(values=tuple(float(v) for v in out.values), n_hvp=op.n_hvp, converged=out.converged,
                       error_bounds=tuple(float(b) for b in out.residuals), bn_mode=bn_mode,
                       batch_size=sample_count(objective), product=f"{op.product}, preconditioned")
