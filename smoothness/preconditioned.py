"""Preconditioned sharpness λ_max(P⁻¹H): the curvature an adaptive optimizer's step actually sees.

An optimizer whose step is −η·P⁻¹·(momentum of the gradient), with P diagonal and positive (Adam, RMSProp), is on a
quadratic a gradient method on the loss in the coordinates u = P^{1/2}w, whose Hessian is P^{-1/2} H P^{-1/2}. That
matrix is similar to P⁻¹H (same eigenvalues) and symmetric, so Lanczos applies to it unchanged. Cohen et al. (2022,
"Adaptive Gradient Methods at the Edge of Stability") track its top eigenvalue, which equilibrates at the
optimizer's stability threshold (38/η for Adam with β₁ = 0.9); which P an optimizer uses is the caller's business
(experiments.optim builds Adam's).
"""
from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence

import torch

from ._args import generator_or_default
from .curvature import EigenResult
from .lanczos import lanczos_top
from .operator import DEFAULT_BN_MODE, DEFAULT_KIND, Curvature


def _check_preconditioner(objective, preconditioner: Mapping, names) -> dict:
    p = objective.check_direction(preconditioner, "preconditioner", names=names)
    bad = [n for n, t in p.items() if not bool((t > 0).all())]
    if bad:
        raise ValueError(f"the preconditioner must be positive everywhere (a diagonal P > 0); entries <= 0 in "
                         f"{bad}. Adam's P = (1 − β₁ᵗ)(√v̂ + ε) is positive once ε > 0")
    return p


def preconditioned_top_eigenvalues(model, loss_fn: Optional[Callable] = None, data=None,
                                   preconditioner: Optional[Mapping] = None, k: int = 1, *, tol: float = 1e-3,
                                   max_iter: Optional[int] = None, bn_mode: str = DEFAULT_BN_MODE,
                                   generator: Optional[torch.Generator] = None, kind: str = DEFAULT_KIND,
                                   params: Optional[Sequence[str]] = None, group=None) -> EigenResult:
    """The k largest eigenvalues of P⁻¹M for the diagonal preconditioner ``P`` (a dict of positive tensors keyed
    like ``dict(model.named_parameters())``, or like the block ``params``), by Lanczos on P^{-1/2} M P^{-1/2}; M the
    Hessian ∇²_w L(w; B) by default (``kind``, ``params``, ``group`` or a ``CurvatureOperator``: see
    ``smoothness.operator``).

    Same contract as ``top_eigenvalues``: converged means every value's residual is at most ``tol`` relative (a
    true bound: the value is within it of an eigenvalue of P⁻¹M); deterministic start (generator seeded with
    ``ESTIMATOR_SEED`` by default); one product per Lanczos vector. With P = 1 it is ``top_eigenvalues``.
    """
    source = Curvature(model, loss_fn, data, kind=kind, params=params, group=group, bn_mode=bn_mode)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < source.n:
        raise ValueError(f"k must be an int with 1 <= k < number of trainable parameters ({source.n}); got {k!r}")
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol}")
    p = _check_preconditioner(source.objective, preconditioner, source.params)
    op = source.operator()
    scale = op.flatten({n: t.rsqrt() for n, t in p.items()})

    def matmat(rows: torch.Tensor) -> torch.Tensor:
        return torch.stack([scale * op.matvec(scale * v) for v in rows])

    out = lanczos_top(matmat, op.n, k, tol=tol, max_matvec=max_iter, dtype=op.dtype, device=op.device,
                      generator=generator_or_default(generator))
    return EigenResult(values=tuple(float(v) for v in out.values), n_hvp=op.n_hvp, converged=out.converged,
                       error_bounds=tuple(float(b) for b in out.residuals), bn_mode=source.bn_mode,
                       batch_size=op.n_samples, kind=source.kind, params=source.params,
                       product=f"{op.product}, preconditioned")
