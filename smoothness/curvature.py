"""Curvature of L(w; B): top Hessian eigenvalues (sharpness), trace, and curvature along a direction.

Every function takes ``batch`` as one ``(inputs, targets)`` pair or as an iterable of pairs (a list or a
DataLoader): then L is the sample-weighted mean of the chunks' mean losses, each chunk is processed on its own (in
``batch`` BN mode with its own batch statistics) and memory stays that of one chunk; ``batch_size`` in the results
is the total number of samples. See ``smoothness._objective.ChunkedObjective``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Tuple

import torch
from torch import nn

from ._objective import dot, make_objective, sample_count
from .hvp import hessian_operator
from .lanczos import lanczos_top


@dataclass(frozen=True)
class EigenResult:
    values: Tuple[float, ...]        # descending, length k
    n_hvp: int
    converged: bool
    error_bounds: Tuple[float, ...]  # estimated absolute error of each value
    bn_mode: str
    batch_size: int                  # small Hessian batches give high-variance eigenvalues: keep it with the number


@dataclass(frozen=True)
class TraceResult:
    mean: float
    stderr: float
    n_hvp: int
    bn_mode: str
    batch_size: int


def top_eigenvalues(model: nn.Module, loss_fn: Callable, batch, k: int = 1, *, tol: float = 1e-3,
                    max_iter: Optional[int] = None, bn_mode: str = "batch",
                    generator: Optional[torch.Generator] = None) -> EigenResult:
    """The k largest eigenvalues of ∇²_w L(w; B) by Lanczos with full reorthogonalisation.

    Converged means every value's estimated error is at most ``tol`` relative. Deterministic by default (the start
    vector comes from a generator seeded with 0 unless ``generator`` is given). One forward pass and one backward
    pass with a retained graph, then one extra backward pass per Hessian-vector product.
    """
    objective = make_objective(model, loss_fn, batch, bn_mode)
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if k < 1 or k >= objective.n_params:
        raise ValueError(f"k must satisfy 1 <= k < number of trainable parameters ({objective.n_params}); got {k}")
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol}")
    if max_iter is not None and (isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < k):
        raise ValueError(f"max_iter must be an int >= k ({k}) or None; got {max_iter!r}")
    op = hessian_operator(objective)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    out = lanczos_top(op.matvec, op.n, k, tol=tol, max_iter=max_iter, dtype=op.dtype, device=op.device,
                      generator=gen)
    return EigenResult(values=tuple(float(v) for v in out.values), n_hvp=op.n_hvp, converged=out.converged,
                       error_bounds=tuple(float(b) for b in out.error_bounds), bn_mode=bn_mode,
                       batch_size=sample_count(objective))


def hessian_trace(model: nn.Module, loss_fn: Callable, batch, *, n_samples: int = 100, bn_mode: str = "batch",
                  generator: Optional[torch.Generator] = None) -> TraceResult:
    """Hutchinson's estimate of tr ∇²L(w; B) = E[vᵀHv] over Rademacher v, with its standard error."""
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 2:
        raise ValueError(f"n_samples must be an int >= 2 (the standard error needs two samples); got {n_samples}")
    objective = make_objective(model, loss_fn, batch, bn_mode)
    op = hessian_operator(objective)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    samples = []
    for _ in range(n_samples):
        v = (torch.randint(0, 2, (op.n,), generator=gen) * 2 - 1).to(dtype=op.dtype, device=op.device)
        samples.append(float(torch.dot(v, op.matvec(v))))
    t = torch.tensor(samples, dtype=torch.float64)
    return TraceResult(mean=float(t.mean()), stderr=float(t.std(unbiased=True) / math.sqrt(n_samples)),
                       n_hvp=op.n_hvp, bn_mode=bn_mode, batch_size=sample_count(objective))


def directional_curvature(model: nn.Module, loss_fn: Callable, batch, direction: Mapping, *,
                          bn_mode: str = "batch") -> float:
    """dᵀHd / dᵀd: the exact curvature of L along d (compare with the effective β of a line probe along d)."""
    objective = make_objective(model, loss_fn, batch, bn_mode)
    d = objective.check_direction(direction)
    hd = hessian_operator(objective).matvec_dict(d)
    return dot(d, hd) / dot(d, d)
