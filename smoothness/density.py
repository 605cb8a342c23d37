"""The eigenvalue density of a curvature matrix by stochastic Lanczos quadrature (SLQ; Ghorbani, Krishnan & Xiao 2019):
per Rademacher probe v, m Lanczos steps give Gauss quadrature nodes θ_j (Ritz values) and weights τ_j = S_{1j}² of
v's spectral measure; the estimate averages them over probes. Details (reorthogonalisation, breakdown, σ, log
scales): docs/smoothness.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal

from ._args import generator_or_default
from .operator import DEFAULT_BN_MODE, DEFAULT_KIND, Curvature

# β below this multiple of the machine epsilon times the largest |α|, β seen means the Krylov space is invariant
_BREAKDOWN = 50.0


@dataclass(frozen=True)
class DensityResult:
    """Per probe p: Gauss quadrature nodes (ascending) and weights (summing to 1) of the Hessian's spectral measure."""

    nodes: Tuple[Tuple[float, ...], ...]
    weights: Tuple[Tuple[float, ...], ...]
    n_params: int                    # n: the density is that of the n eigenvalues of an n×n Hessian
    n_steps: int                     # Lanczos steps asked for (a probe stops earlier on breakdown)
    n_hvp: int
    bn_mode: str
    batch_size: int                  # samples the loss averages over (all chunks together)
    kind: str = "hessian"                      # which curvature matrix: "hessian", "ggn" or "empirical-fisher"
    params: Optional[Tuple[str, ...]] = None   # the parameter block (None: all trainable parameters)
    product: str = field(default="", compare=False)   # how products were computed (metadata: not compared)

    def __post_init__(self):
        if len(self.nodes) != len(self.weights) or not self.nodes:
            raise ValueError(f"nodes and weights must hold the same number (>= 1) of probes; got {len(self.nodes)} "
                             f"and {len(self.weights)}")
        for p, (x, w) in enumerate(zip(self.nodes, self.weights)):
            if len(x) != len(w) or not x:
                raise ValueError(f"probe {p}: {len(x)} nodes but {len(w)} weights; each probe needs one weight per "
                                 f"node")

    @property
    def n_probes(self) -> int:
        return len(self.nodes)

    def measure(self) -> Tuple[np.ndarray, np.ndarray]:
        """The estimated spectral measure: all probes' nodes and their weights divided by the number of probes
        (sums to 1), sorted by node. Feed it to ``scipy.stats.wasserstein_distance(nodes, x, weights, ...)``."""
        nodes = np.concatenate([np.asarray(x, dtype=np.float64) for x in self.nodes])
        weights = np.concatenate([np.asarray(w, dtype=np.float64) for w in self.weights]) / self.n_probes
        order = np.argsort(nodes, kind="stable")
        return nodes[order], weights[order]

    def moment(self, k: int) -> float:
        """Estimate of (1/n)·tr(H^k); exact in expectation over probes for k <= 2·n_steps − 1."""
        nodes, weights = self.measure()
        return float(np.sum(weights * nodes ** k))

    def density(self, grid, sigma: float) -> np.ndarray:
        """The Gaussian-smoothed density φ(t) = Σ τ N(t; θ, σ²) / n_probes on ``grid``; it integrates to 1, so the
        outliers' share of the n eigenvalues shows as area (see the module docstring on σ and log scales)."""
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma <= 0:
            raise ValueError(f"sigma must be a positive finite number (the Gaussian's standard deviation, in "
                             f"eigenvalue units), got {sigma!r}")
        t = np.asarray(grid, dtype=np.float64)
        if t.ndim != 1 or t.size == 0 or not np.all(np.isfinite(t)):
            raise ValueError(f"grid must be a non-empty 1-D array of finite eigenvalues, got shape {t.shape}")
        nodes, weights = self.measure()
        out = np.empty_like(t)
        step = max(1, 4_000_000 // max(1, nodes.size))  # bounds the (grid × nodes) matrix at 32 MB
        for i in range(0, t.size, step):
            z = (t[i:i + step, None] - nodes[None, :]) / sigma
            out[i:i + step] = np.exp(-0.5 * z * z) @ weights
        return out / (sigma * math.sqrt(2 * math.pi))


def lanczos_quadrature(matvec: Callable[[torch.Tensor], torch.Tensor], start: torch.Tensor,
                       n_steps: int) -> Tuple[np.ndarray, np.ndarray]:
    """Gauss quadrature of the spectral measure of ``start``: m <= n_steps Lanczos steps with full
    reorthogonalisation, then nodes = eigenvalues of T (ascending) and weights = squared first components."""
    n = start.numel()
    m = min(n_steps, n)
    q = start / torch.linalg.vector_norm(start)
    basis = torch.empty((m, n), dtype=start.dtype, device=start.device)
    alphas, betas = [], []
    scale = 0.0
    eps = torch.finfo(start.dtype).eps
    for j in range(m):
        basis[j] = q
        w = matvec(q)
        alpha = float(torch.dot(w, q))
        w = w - alpha * q
        if j > 0:
            w = w - betas[-1] * basis[j - 1]
        for _ in range(2):
            w = w - basis[:j + 1].T @ (basis[:j + 1] @ w)
        beta = float(torch.linalg.vector_norm(w))
        alphas.append(alpha)
        scale = max(scale, abs(alpha), beta)
        if j == m - 1 or beta <= _BREAKDOWN * eps * scale:
            break
        betas.append(beta)
        q = w / beta
    if len(alphas) == 1:
        return np.array(alphas), np.ones(1)
    theta, s = eigh_tridiagonal(np.array(alphas), np.array(betas))
    weights = s[0] ** 2
    return theta, weights / weights.sum()


def spectral_density(model, loss_fn: Optional[Callable] = None, data=None, *, n_probes: int = 4, n_steps: int = 80,
                     bn_mode: str = DEFAULT_BN_MODE, generator: Optional[torch.Generator] = None,
                     kind: str = DEFAULT_KIND, params: Optional[Sequence[str]] = None,
                     group=None) -> DensityResult:
    """The eigenvalue density of ∇²_w L(w; B) by stochastic Lanczos quadrature (see the module docstring).

    ``kind``, ``params`` and ``group`` (or a ``CurvatureOperator`` in place of (model, loss_fn, data)) choose another
    curvature matrix, a parameter block (``n_params`` is then the block's size) and data split over
    torch.distributed ranks; see ``smoothness.operator``.

    ``n_probes`` Rademacher probes, ``n_steps`` Lanczos steps each (capped at the number of parameters): at most
    n_probes × n_steps products. Deterministic by default (probes from a generator seeded with ``ESTIMATOR_SEED``
    unless ``generator`` is given); the model is left exactly as it was.
    """
    for name, value in (("n_probes", n_probes), ("n_steps", n_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    source = Curvature(model, loss_fn, data, kind=kind, params=params, group=group, bn_mode=bn_mode)
    op = source.operator(products=n_probes * min(n_steps, source.n))
    gen = generator_or_default(generator)
    nodes, weights = [], []
    for _ in range(n_probes):
        v = (torch.randint(0, 2, (op.n,), generator=gen) * 2 - 1).to(dtype=op.dtype, device=op.device)
        theta, tau = lanczos_quadrature(op.matvec, v, n_steps)
        nodes.append(tuple(float(x) for x in theta))
        weights.append(tuple(float(x) for x in tau))
    return DensityResult(nodes=tuple(nodes), weights=tuple(weights), n_params=op.n, n_steps=n_steps,
                         n_hvp=op.n_hvp, bn_mode=source.bn_mode, batch_size=op.n_samples, kind=source.kind,
                         params=source.params, product=op.product)
