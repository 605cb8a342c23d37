"""Curvature of L(w; B): top eigenvalues (λ_max), trace, and curvature along a direction.

Each function takes ``(model, loss_fn, data)`` (``data`` one ``(inputs, targets)`` batch or an iterable of them, see
``smoothness._objective.ChunkedObjective``) or a ``CurvatureOperator`` in their place (``smoothness.operator``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ._args import generator_or_default, renamed
from ._objective import dot
from .lanczos import lanczos_top
from .operator import DEFAULT_BN_MODE, DEFAULT_KIND, Curvature


WHICH = ("largest", "smallest")


@dataclass(frozen=True)
class EigenResult:
    """The k largest (or, with ``which="smallest"``, the k smallest) Hessian eigenvalues and what they cost.

    ``error_bounds[i]`` is the residual norm ‖H y_i − θ_i y_i‖ of the Ritz pair (θ_i = ``values[i]``, y_i). It is a
    rigorous bound on the distance from ``values[i]`` to the nearest eigenvalue of H; that eigenvalue is the i-th
    largest unless the Krylov space missed an eigenvalue altogether (see ``smoothness.lanczos``), and
    ``values[i]`` never exceeds the i-th largest eigenvalue (Cauchy interlacing; for ``which="smallest"``, read
    smallest, and never falls below it). The true error is usually far smaller (of order bound²/gap). ``converged``
    means every bound is at most ``tol·|value|``.

    ``vectors`` holds the k Ritz vectors as the rows of a (k, n) tensor, each flattened over the trainable
    parameters in ``named_parameters()`` order (dtype and device of the parameters; k·n numbers). They make warm
    starts possible
    (``top_eigenvalues(..., start=previous)``); ``vector_dicts(model)`` gives them keyed like the parameters. They
    are left out of ``repr`` and of ``==``, which compare the numbers only.
    """

    values: Tuple[float, ...]        # length k: descending (largest), or ascending from the most negative (smallest)
    n_hvp: int
    converged: bool
    error_bounds: Tuple[float, ...]  # residual norms: distance to the nearest eigenvalue of H is at most this
    bn_mode: str
    batch_size: int                  # small Hessian batches give high-variance eigenvalues: keep it with the number
    vectors: Optional[torch.Tensor] = field(default=None, repr=False, compare=False)
    kind: str = "hessian"                      # which curvature matrix: "hessian", "ggn" or "empirical-fisher"
    params: Optional[Tuple[str, ...]] = None   # the parameter block (None: all trainable parameters)
    which: str = "largest"                     # "largest" or "smallest": which end of the spectrum
    product: str = field(default="", compare=False)   # how products were computed (metadata: not compared)

    def vector_dicts(self, model: nn.Module) -> List[Dict[str, torch.Tensor]]:
        """The Ritz vectors as dicts keyed like ``dict(model.named_parameters())`` (trainable parameters only, or the
        block ``params``)."""
        if self.vectors is None:
            raise ValueError("this EigenResult holds no vectors")
        params = {n: p for n, p in model.named_parameters() if p.requires_grad
                  and (self.params is None or n in self.params)}
        numel = sum(p.numel() for p in params.values())
        if self.vectors.shape[1] != numel:
            raise ValueError(f"the vectors have {self.vectors.shape[1]} entries but the model has {numel} trainable "
                             f"parameters: they belong to another model")
        out = []
        for row in self.vectors:
            parts = torch.split(row, [p.numel() for p in params.values()])
            out.append({n: t.reshape(p.shape) for (n, p), t in zip(params.items(), parts)})
        return out


Start = Union["EigenResult", torch.Tensor, Mapping[str, torch.Tensor], Sequence]


@dataclass(frozen=True)
class TraceResult:
    mean: float
    stderr: float
    n_hvp: int
    bn_mode: str
    batch_size: int
    kind: str = "hessian"
    params: Optional[Tuple[str, ...]] = None
    product: str = field(default="", compare=False)   # how products were computed (metadata: not compared)


@dataclass(frozen=True)
class DirectionalCurvature:
    value: float                     # dᵀMd / dᵀd
    n_hvp: int
    bn_mode: str
    batch_size: int
    kind: str = "hessian"
    params: Optional[Tuple[str, ...]] = None
    product: str = field(default="", compare=False)   # how products were computed (metadata: not compared)


def top_eigenvalues(model, loss_fn: Optional[Callable] = None, data=None, k: int = 1, *, tol: float = 1e-3,
                    max_iter: Optional[int] = None, bn_mode: str = DEFAULT_BN_MODE,
                    generator: Optional[torch.Generator] = None, start: Optional[Start] = None,
                    block_size: Optional[int] = None, kind: str = DEFAULT_KIND,
                    params: Optional[Sequence[str]] = None, group=None, which: str = "largest") -> EigenResult:
    """The k largest eigenvalues of ∇²_w L(w; B) by block Lanczos with full reorthogonalisation.

    ``which="smallest"``: the k smallest (algebraically: the most negative first, ascending), as the k largest of
    −H by the same Lanczos; the residual bounds are those of −H's Ritz pairs, i.e. of H's (same vectors, negated
    values), and ``tol`` is relative to |value| as for the largest. Network Hessians' negative eigenvalues are
    small next to λ_max, and Lanczos's convergence at either end scales with the gap relative to the whole
    spectrum's width, so the smallest ones take more products at the same ``tol`` than the top one.

    ``kind`` ("hessian", "ggn", "empirical-fisher"), ``params`` (a parameter block) and ``group`` (data split across
    torch.distributed ranks) choose the matrix: see ``smoothness.operator``. The default is the whole Hessian, with
    ``bn_mode="batch"``; given a ``CurvatureOperator`` instead of (model, loss_fn, data), the operator's.

    Converged means every value's residual norm (``error_bounds``) is at most ``tol`` relative: each value is then
    within ``tol`` of an eigenvalue of H (see :class:`EigenResult` for what that does and does not prove).
    ``max_iter`` caps the number of Hessian-vector products (default min(n, 300)).

    ``block_size`` (default k) random start vectors: the block finds eigenvalues repeated up to ``block_size``
    times. One vector more than wanted (k + 1) guards a little better against a start that under-represents a top
    eigenvector, but costs more products with no gain in accuracy (benchmarks/results/eigensolvers.md), so the
    default is k: for k = 1 that is plain Lanczos.

    ``start`` warm-starts the block: a previous :class:`EigenResult` (its Ritz vectors), a flat tensor of n
    entries or an (m, n) tensor of rows, a dict keyed like ``dict(model.named_parameters())``, or a list of flat
    tensors or such dicts. Missing rows up to ``block_size`` are random (so a warm start still carries a random
    guard vector); more rows than ``block_size`` enlarge the block (benchmarks/results/sharpness_warm.md; a warm
    top-1 from one old vector can certify a value that is no longer the top).

    Deterministic by default (random start rows come from a generator seeded with ``ESTIMATOR_SEED`` unless
    ``generator`` is given). One forward pass and one backward pass with a retained graph, then one extra backward
    pass per product.
    """
    source = Curvature(model, loss_fn, data, kind=kind, params=params, group=group, bn_mode=bn_mode)
    names, n = source.params, source.n
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if k < 1 or k >= n:
        raise ValueError(f"k must satisfy 1 <= k < number of trainable parameters ({n}"
                         f"{' in the block' if names else ''}); got {k}")
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol}")
    if which not in WHICH:
        raise ValueError(f"which must be 'largest' (the top eigenvalues) or 'smallest' (the most negative "
                         f"ones), got {which!r}")
    if max_iter is not None and (isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < k):
        raise ValueError(f"max_iter must be an int >= k ({k}) or None; got {max_iter!r}")
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int)
                                   or not 1 <= block_size <= n):
        raise ValueError(f"block_size must be an int in [1, number of trainable parameters "
                         f"({n})] or None (k); got {block_size!r}")
    block = min(k, n) if block_size is None else block_size
    op = source.operator()
    rows = None if start is None else _start_rows(start, source.objective, op)
    gen = generator_or_default(generator)
    sign = 1.0 if which == "largest" else -1.0   # the smallest eigenvalues of H are the largest of −H
    out = lanczos_top(lambda v: sign * torch.stack([op.matvec(r) for r in v]), op.n, k, tol=tol,
                      block_size=block, max_matvec=max_iter, dtype=op.dtype, device=op.device, generator=gen,
                      start=rows)
    return EigenResult(values=tuple(sign * float(v) for v in out.values), n_hvp=op.n_hvp, converged=out.converged,
                       error_bounds=tuple(float(b) for b in out.residuals), bn_mode=source.bn_mode,
                       batch_size=op.n_samples, vectors=out.vectors, kind=source.kind, params=names, which=which,
                       product=op.product)


def _start_rows(start, objective, op) -> torch.Tensor:
    """``start`` as an (m, n) tensor of rows on the parameters' device and dtype, with a clear error if it cannot
    be one."""
    n = op.n
    what = "start"
    if isinstance(start, EigenResult):
        if start.vectors is None:
            raise ValueError("start: this EigenResult holds no vectors (it was built by hand or loaded from a "
                             "record); pass the result top_eigenvalues returned, or vectors")
        items, what = list(start.vectors), "start (an EigenResult)"
    elif isinstance(start, torch.Tensor):
        if start.ndim not in (1, 2):
            raise ValueError(f"start must be a flat tensor of {n} entries or an (m, {n}) tensor of rows; got shape "
                             f"{tuple(start.shape)}")
        items = [start] if start.ndim == 1 else list(start)
    elif isinstance(start, Mapping):
        items = [start]
    elif isinstance(start, (list, tuple)):
        items = list(start)
    else:
        raise TypeError(f"start must be an EigenResult, a tensor, a dict keyed like named_parameters() or a list of "
                        f"those; got {type(start).__name__}")
    if not items:
        raise ValueError("start is empty: give at least one vector, or None for a random start")
    rows = []
    for i, item in enumerate(items):
        if isinstance(item, Mapping):
            rows.append(op.flatten(objective.check_direction(item, f"start[{i}]", names=op.names)))
            continue
        if not isinstance(item, torch.Tensor):
            raise TypeError(f"start[{i}] must be a tensor or a dict keyed like named_parameters(); got "
                            f"{type(item).__name__}")
        if item.ndim != 1 or item.numel() != n:
            raise ValueError(f"{what}: vector {i} has shape {tuple(item.shape)}, but the model has {n} trainable "
                             f"parameters: give flat vectors of {n} entries (in named_parameters() order)")
        row = item.detach().to(dtype=op.dtype, device=op.device)
        if not torch.isfinite(row).all():
            raise ValueError(f"{what}: vector {i} holds non-finite values")
        if not torch.any(row != 0):
            raise ValueError(f"{what}: vector {i} is all zeros")
        rows.append(row)
    return torch.stack(rows)


def hessian_trace(model, loss_fn: Optional[Callable] = None, data=None, *, n_probes: int = 100,
                  bn_mode: str = DEFAULT_BN_MODE, generator: Optional[torch.Generator] = None,
                  kind: str = DEFAULT_KIND, params: Optional[Sequence[str]] = None, group=None,
                  n_samples: Optional[int] = None) -> TraceResult:
    """Hutchinson's estimate of tr M = E[vᵀMv] over ``n_probes`` Rademacher probes v, with its standard error; M the
    Hessian ∇²L(w; B) by default (``kind``, ``params``, ``group`` or a ``CurvatureOperator``: see
    ``smoothness.operator``). ``n_samples`` is the deprecated name of ``n_probes``."""
    n_probes = renamed("n_probes", n_probes, "n_samples", n_samples, "hessian_trace")
    if isinstance(n_probes, bool) or not isinstance(n_probes, int) or n_probes < 2:
        raise ValueError(f"n_probes must be an int >= 2 (the standard error needs two probes); got {n_probes}")
    source = Curvature(model, loss_fn, data, kind=kind, params=params, group=group, bn_mode=bn_mode)
    gen = generator_or_default(generator)
    op = source.operator()
    samples = []
    for _ in range(n_probes):
        v = (torch.randint(0, 2, (op.n,), generator=gen) * 2 - 1).to(dtype=op.dtype, device=op.device)
        samples.append(float(torch.dot(v, op.matvec(v))))
    t = torch.tensor(samples, dtype=torch.float64)
    return TraceResult(mean=float(t.mean()), stderr=float(t.std(unbiased=True) / math.sqrt(n_probes)),
                       n_hvp=op.n_hvp, bn_mode=source.bn_mode, batch_size=op.n_samples, kind=source.kind,
                       params=source.params, product=op.product)


def directional_curvature(model, loss_fn: Optional[Callable] = None, data=None, direction: Optional[Mapping] = None,
                          *, bn_mode: str = DEFAULT_BN_MODE, kind: str = DEFAULT_KIND,
                          params: Optional[Sequence[str]] = None, group=None) -> DirectionalCurvature:
    """dᵀMd / dᵀd: the exact curvature of L along d (compare with the effective β of a line probe along d), M the
    Hessian by default (``kind``, ``params``, ``group`` or a ``CurvatureOperator``: see ``smoothness.operator``;
    ``direction`` keyed by the block's parameters). One product."""
    source = Curvature(model, loss_fn, data, kind=kind, params=params, group=group, bn_mode=bn_mode)
    d = source.objective.check_direction(direction, names=source.params)
    op = source.operator()
    hd = op.matvec_dict(d)
    return DirectionalCurvature(value=dot(d, hd) / dot(d, d), n_hvp=op.n_hvp, bn_mode=source.bn_mode,
                                batch_size=op.n_samples, kind=source.kind, params=source.params,
                                product=op.product)
