"""Lanczos with full reorthogonalisation for the extreme eigenvalues of a symmetric operator.

Why not ``scipy.sparse.linalg.eigsh``? ARPACK builds a basis of ``ncv >= max(2k+1, 20)`` vectors before it first
tests convergence and then restarts implicitly, so for one eigenvalue to 1e-3 it spends 20-40 Hessian-vector
products where this loop stops after the product that makes the estimate good enough (usually 8-15; see
benchmarks/bench_smoothness.py, which times both). The small tridiagonal problem is still solved by scipy
(``eigh_tridiagonal``). Vectors stay on the operator's device; only the tridiagonal matrix lives on the host.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal


# Enough for the extreme eigenvalues of any network Hessian we have seen; the basis grows as needed, so a model
# with millions of parameters holds only the vectors it used.
DEFAULT_MAX_ITER = 300


@dataclass(frozen=True)
class LanczosOutput:
    values: np.ndarray          # Ritz values, descending, length k
    vectors: torch.Tensor       # (n, k) Ritz vectors
    n_matvec: int
    converged: bool
    error_bounds: np.ndarray    # estimated absolute error of each value


def lanczos_top(matvec: Callable[[torch.Tensor], torch.Tensor], n: int, k: int, *, tol: float,
                max_iter: Optional[int] = None, dtype=torch.float32, device="cpu",
                generator: Optional[torch.Generator] = None, start: Optional[torch.Tensor] = None) -> LanczosOutput:
    """The k algebraically largest eigenvalues of the symmetric n×n operator ``matvec``.

    Stops when every wanted Ritz value θ has an estimated error at most ``tol·|θ|``. The estimate is the standard
    one for Hermitian Lanczos: min(r, r²/gap) with r = |β_j·s_j| the residual norm ‖Hy − θy‖ (a rigorous bound)
    and gap the distance to the nearest other Ritz value (used only once a Ritz value beyond the k wanted exists). After n products the Krylov space is the whole space and values are exact.
    """
    max_iter = min(n, DEFAULT_MAX_ITER) if max_iter is None else min(max_iter, n)
    if start is None:
        start = torch.randn(n, generator=generator, dtype=torch.float64).to(dtype=dtype, device=device)
    q = start / torch.linalg.vector_norm(start)
    basis = torch.empty((min(max_iter, 32), n), dtype=dtype, device=device)
    alphas, betas = [], []
    values = np.zeros(k)
    bounds = np.full(k, np.inf)
    converged = False
    m = 0
    s = None
    for m in range(1, max_iter + 1):
        if m > basis.shape[0]:
            basis = torch.cat([basis, torch.empty_like(basis)])[:max_iter]
        basis[m - 1] = q
        w = matvec(q)
        alpha = float(torch.dot(w, q))
        w = w - alpha * q - (betas[-1] * basis[m - 2] if m > 1 else 0.0)
        # full reorthogonalisation, twice ("twice is enough", Parlett)
        for _ in range(2):
            w = w - basis[:m].T @ (basis[:m] @ w)
        beta = float(torch.linalg.vector_norm(w))
        alphas.append(alpha)
        theta, s = eigh_tridiagonal(np.array(alphas), np.array(betas)) if m > 1 else (np.array([alpha]), np.ones((1, 1)))
        order = np.argsort(theta)[::-1]
        if m >= k:
            top = order[:k]
            resid = np.abs(beta * s[-1, top])
            if m > k:
                # the quadratic bound needs a gap estimate: only once there is a Ritz value beyond the wanted ones
                gaps = np.array([np.min(np.abs(np.delete(theta, i) - theta[i])) for i in top])
                bounds = np.minimum(resid, resid ** 2 / np.maximum(gaps, 1e-300))
            else:
                bounds = resid
            values = theta[top]
            scale = np.maximum(np.abs(values), np.finfo(float).tiny)
            if np.all(bounds <= tol * scale) or m == n:
                converged = True
                break
        if m == max_iter:
            break
        if beta <= 1e-10 * max(1.0, abs(alpha)):
            # invariant subspace found: continue from a fresh direction orthogonal to the basis (T splits)
            w = torch.randn(n, generator=generator, dtype=torch.float64).to(dtype=dtype, device=device)
            for _ in range(2):
                w = w - basis[:m].T @ (basis[:m] @ w)
            beta_next = 0.0
            q = w / torch.linalg.vector_norm(w)
        else:
            beta_next = beta
            q = w / beta
        betas.append(beta_next)
    theta_order = np.argsort(theta)[::-1][:k]
    values = theta[theta_order]
    y = torch.as_tensor(s[:, theta_order], dtype=dtype, device=device)
    vectors = basis[:m].T @ y
    return LanczosOutput(values=values, vectors=vectors, n_matvec=m, converged=converged, error_bounds=bounds)
