"""Takeuchi information criterion, cheap diagonal forms (Thomas et al. 2020; METHODS.md §12).

TIC = Tr(H⁻¹C), with C the per-example gradient covariance. With diagonals only:

    tic_diag  = Σ_j C_jj / (G_jj + ε)        tic_trace = Σ_j C_jj / (Σ_j G_jj + ε)

where G_jj is the exact diagonal of the generalised Gauss-Newton matrix G = (1/N) Σᵢ Jᵢᵀ ∇²_z ℓᵢ Jᵢ (METHODS.md
§10; the Hessian's positive part, the Fisher for softmax cross-entropy): for each example ∇²_z ℓᵢ = Σ_k λ_k v_k v_kᵀ
(eigendecomposition, C×C for C outputs), G_jj = (1/N) Σᵢ Σ_k λ_k (Jᵢᵀv_k)_j², one vjp per example and output
(about C per-example gradient passes). ``moment="centred"``: C_jj = 1/(m−1) Σᵢ (u_ij − ū_j)², the covariance;
``"uncentred"``: C_jj = (1/m) Σᵢ u_ij², Cockpit's TICDiag/TICTrace (which use ε = 1e-7). They agree at a stationary
point (ū = 0). Per-example units only (C is the per-example covariance): BatchNorm in batch mode is refused.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import nn
from torch.func import functional_call

from ._objective import check_bn_mode, estimator_mode
from ._rng import fixed_rng
from ._units import Units
from .gradient_noise import collect

MOMENTS = ("centred", "uncentred")


@dataclass(frozen=True)
class TakeuchiResult:
    tic_diag: float     # Σ_j C_jj / (G_jj + ε)
    tic_trace: float    # Σ_j C_jj / (Σ_j G_jj + ε)
    moment: str         # "centred" (covariance, m − 1) or "uncentred" (Cockpit's second moment, 1/m)
    curvature: str      # "ggn-diagonal"
    eps: float
    n_units: int
    bn_mode: str


def ggn_diagonal(units: Units) -> torch.Tensor:
    """The exact GGN diagonal over all examples of ``units``, flattened like the per-unit gradients."""
    total, count = None, 0
    for objective in units.objectives:
        model, loss_fn, fixed = objective.model, objective.loss_fn, units.fixed_tensors(objective)

        def example_diagonal(params, x, y):
            z, vjp_fn = torch.func.vjp(lambda p: functional_call(model, {**fixed, **p}, (x.unsqueeze(0),)), params)
            hz = torch.func.hessian(lambda o: loss_fn(o, y.unsqueeze(0)).reshape(()))(z)
            evals, evecs = torch.linalg.eigh(hz.reshape(z.numel(), z.numel()))
            cols = torch.func.vmap(lambda v: vjp_fn(v.reshape(z.shape))[0])(evecs.T)
            return {n: torch.einsum("k,k...->...", evals, c ** 2) for n, c in cols.items()}

        with fixed_rng(objective._devices), estimator_mode(model, objective.bn_mode):
            diag = torch.func.vmap(example_diagonal, in_dims=(None, 0, 0))(units.base, objective.inputs,
                                                                          objective.targets)
        part = units.flatten(diag, rows=True).double().sum(dim=0)
        total = part if total is None else total + part
        count += int(objective.inputs.shape[0])
    return total / count


def tic(model: nn.Module, loss_fn: Callable, data, *, params: Optional[Sequence[str]] = None,
        bn_mode: str = "batch", moment: str = "centred", eps: float = 1e-7) -> TakeuchiResult:
    """Diagonal TIC of the per-example gradients of ``data`` (one batch or an iterable of chunks)."""
    check_bn_mode(bn_mode)
    if moment not in MOMENTS:
        raise ValueError(f"unknown moment {moment!r}: use 'centred' (the covariance) or 'uncentred' (Cockpit's "
                         f"second moment)")
    if not (isinstance(eps, (int, float)) and eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    units = Units(model, loss_fn, data, "example", params, bn_mode)
    moments, _ = collect(units)
    m = moments.count
    c = moments.m2 / (m - 1) if moment == "centred" else moments.mean ** 2 + moments.m2 / m
    g = ggn_diagonal(units)
    return TakeuchiResult(tic_diag=float((c / (g + eps)).sum()), tic_trace=float(c.sum() / (g.sum() + eps)),
                          moment=moment, curvature="ggn-diagonal", eps=float(eps), n_units=m, bn_mode=bn_mode)
