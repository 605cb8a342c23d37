"""Block Lanczos with full reorthogonalisation for the algebraically largest eigenvalues of a symmetric operator; it
stops when every wanted Ritz pair's residual ‖Hy − θy‖ is at most tol·|θ| (a rigorous bound on the distance to an
eigenvalue). Details: docs/smoothness.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

# Enough for the extreme eigenvalues of any network Hessian we have seen; the basis grows as needed, so a model
# with millions of parameters holds only the vectors it used.
DEFAULT_MAX_MATVEC = 300


@dataclass(frozen=True)
class LanczosOutput:
    values: np.ndarray          # Ritz values, descending, length k
    vectors: torch.Tensor       # (k, n) Ritz vectors (rows, orthonormal)
    n_matvec: int
    converged: bool
    residuals: np.ndarray       # ‖H y_i − θ_i y_i‖ of each value: the distance to some eigenvalue of H is at most this


def _orthogonalise(w: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Rows of w minus their projection on the rows of basis, twice ("twice is enough", Parlett)."""
    if basis.shape[0] == 0:
        return w
    for _ in range(2):
        w = w - (w @ basis.T) @ basis
    return w


def _random_rows(count: int, n: int, generator, dtype, device) -> torch.Tensor:
    # drawn in float64 on the host so that the start does not depend on the device or dtype
    return torch.randn(count, n, generator=generator, dtype=torch.float64).to(dtype=dtype, device=device)


def _orthonormal_block(w: torch.Tensor, basis: torch.Tensor, width: int, generator, rank_tol: float):
    """An orthonormal block V (width × n), orthogonal to ``basis``, and S (width × rows of w) with w = Sᵀ·V up to
    the directions of w whose size is below ``rank_tol``; those rows of S are zero and V is filled there with fresh
    random directions (the Krylov space has become invariant, or w was rank deficient).

    The factorisation is rank revealing: a thin QR of wᵀ on the device, then an SVD of the small R on the host.
    """
    n, rows = w.shape[1], w.shape[0]
    q, r = torch.linalg.qr(w.T)                              # wᵀ = q r,  q: n × rows
    u, sig, zt = np.linalg.svd(r.detach().cpu().double().numpy())
    keep = int(np.sum(sig > rank_tol)) if rows else 0
    keep = min(keep, width)
    v = (q @ torch.as_tensor(u[:, :keep], dtype=w.dtype, device=w.device)).T  # keep × n
    s = np.zeros((width, rows))
    s[:keep] = sig[:keep, None] * zt[:keep]
    # the new rows must be orthogonal to the basis to working precision; a kept direction that is not (it was mostly
    # rounding noise) is treated as deficient
    v = _orthogonalise(v, basis)
    norms = torch.linalg.vector_norm(v, dim=1)
    good = (norms > 0.5).cpu().numpy()
    mask = torch.as_tensor(good, device=v.device)
    v = v[mask] / norms[mask, None]
    s_out = np.zeros((width, rows))
    s_out[:int(good.sum())] = s[:keep][good]
    s = s_out
    out = [v]
    missing = width - v.shape[0]
    if missing:
        fill = _random_rows(missing, n, generator, w.dtype, w.device)
        fill = _orthogonalise(fill, torch.cat([basis, v]))
        fill, _ = torch.linalg.qr(fill.T)
        fill = _orthogonalise(fill.T, torch.cat([basis, v]))
        fill = fill / torch.linalg.vector_norm(fill, dim=1, keepdim=True)
        out.append(fill)
    return torch.cat(out), s


def lanczos_top(matmat: Callable[[torch.Tensor], torch.Tensor], n: int, k: int, *, tol: float,
                block_size: Optional[int] = None, max_matvec: Optional[int] = None, dtype=torch.float32,
                device="cpu", generator: Optional[torch.Generator] = None,
                start: Optional[torch.Tensor] = None) -> LanczosOutput:
    """The k algebraically largest eigenvalues of the symmetric n×n operator given by ``matmat`` (rows in, rows
    out: ``matmat(V)[i] = H·V[i]``), by block Lanczos with block size ``block_size`` (default k).

    Stops when every wanted Ritz value θ_i has residual ‖Hy_i − θ_i y_i‖ ≤ ``tol``·|θ_i| (see the module
    docstring), when the basis spans the whole space (values exact), or after ``max_matvec`` products (default
    min(n, 300)), whichever comes first. ``start``: an (m × n) block of start rows (m ≤ block size is padded with
    random rows from ``generator``; m > block size enlarges the block to m).
    """
    block = k if block_size is None else block_size
    if start is not None:
        start = start.to(dtype=dtype, device=device).reshape(-1, n)
        block = max(block, start.shape[0])
    block = min(block, n)
    max_matvec = min(n, DEFAULT_MAX_MATVEC) if max_matvec is None else min(max_matvec, n)
    max_matvec = max(max_matvec, k)
    eps = float(torch.finfo(dtype).eps)

    empty = torch.empty((0, n), dtype=dtype, device=device)
    first = _random_rows(block, n, generator, dtype, device)
    if start is not None:
        first = torch.cat([start, first[start.shape[0]:]])
    # a start block with (nearly) dependent rows is completed with random directions
    size = float(torch.max(torch.linalg.vector_norm(first, dim=1)))
    v, _ = _orthonormal_block(first, empty, block, generator, rank_tol=np.sqrt(eps) * size)

    basis = empty                                   # rows q_1 … q_m, orthonormal
    t = np.zeros((0, 0))                            # Q H Qᵀ, built from the projections
    n_matvec = 0
    scale = 0.0                                     # running estimate of ‖H‖ for the rank test
    values, resid, s_top = np.zeros(k), np.full(k, np.inf), None
    converged = False
    s_mat, prev = None, None
    while True:
        width = min(v.shape[0], max_matvec - n_matvec, n - basis.shape[0])
        # rows of the next block left out (product budget or dimension exhausted): their coupling to the previous
        # block stays part of every residual
        dropped = None if s_mat is None or width == v.shape[0] else (s_mat[width:], prev)
        v = v[:width]
        w = matmat(v)
        n_matvec += width
        m0 = basis.shape[0]
        basis = torch.cat([basis, v])
        m = basis.shape[0]
        coeff = (w @ basis.T)                       # width × m: projections of H v on every basis row
        w = w - coeff @ basis
        corr = w @ basis.T                          # second pass (its coefficients are rounding-level)
        w = w - corr @ basis
        coeff = (coeff + corr).detach().cpu().double().numpy()
        t_new = np.zeros((m, m))
        t_new[:m0, :m0] = t
        t_new[:, m0:] = coeff.T
        t_new[m0:, :] = coeff
        t = 0.5 * (t_new + t_new.T)
        theta, s = np.linalg.eigh(t)
        order = np.argsort(theta)[::-1]
        theta, s = theta[order], s[:, order]
        scale = max(scale, float(np.max(np.abs(theta))))
        exhausted = m >= n
        if not exhausted:
            next_width = min(block, n - m)
            v, s_mat = _orthonormal_block(w, basis, next_width, generator, rank_tol=10 * eps * scale)
            # residual of Ritz pair j: H Qᵀ s_j − θ_j Qᵀ s_j = wᵀ s_j,last = Vᵀ S s_j,last
            r_all = np.linalg.norm(s_mat @ s[m0:, :], axis=0)
        else:
            s_mat, r_all = None, np.zeros(m)
        if dropped is not None:
            r_all = np.hypot(r_all, np.linalg.norm(dropped[0] @ s[dropped[1], :], axis=0))
        prev = slice(m0, m)
        if m >= k:
            values, resid, s_top = theta[:k], r_all[:k], s[:, :k]
            if exhausted or np.all(resid <= tol * np.abs(values)):
                converged = True
                break
        if exhausted or n_matvec >= max_matvec:
            break
    vectors = torch.as_tensor(s_top.T, dtype=dtype, device=device) @ basis
    return LanczosOutput(values=np.asarray(values, dtype=float), vectors=vectors, n_matvec=n_matvec,
                         converged=converged, residuals=np.asarray(resid, dtype=float))
