"""How much of the gradient lies in the top-k eigenspace of the Hessian (Gur-Ari, Roberts & Dyer 2018; Ghorbani et al.
2019 §4): fraction_k = ‖U_kᵀ g‖² / ‖g‖², U_k the top-k eigenvectors of ∇²L(w), g = ∇L(w), by block Lanczos.
Details (accuracy of U_k and the tolerance): docs/smoothness.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Tuple

import torch

from ._args import generator_or_default
from .lanczos import lanczos_top
from .operator import DEFAULT_BN_MODE, DEFAULT_KIND, Curvature


@dataclass(frozen=True)
class ConcentrationResult:
    fraction: float                  # ‖U_kᵀg‖² / ‖g‖² in [0, 1]; NaN when g = 0
    k: int
    eigenvalues: Tuple[float, ...]   # the top k, descending
    grad_norm: float                 # ‖g‖₂
    loss: float
    converged: bool                  # every top-k eigenvalue reached tol
    n_hvp: int
    bn_mode: str
    batch_size: int
    kind: str = "hessian"                      # U_k are eigenvectors of this matrix ("hessian", "ggn", …)
    params: Optional[Tuple[str, ...]] = None   # block: g and U_k restricted to these parameters (None: all)
    product: str = field(default="", compare=False)   # how products were computed (metadata: not compared)


def gradient_concentration(model, loss_fn: Optional[Callable] = None, data=None, k: int = 1, *, tol: float = 1e-4,
                           max_iter: Optional[int] = None, bn_mode: str = DEFAULT_BN_MODE,
                           generator: Optional[torch.Generator] = None, kind: str = DEFAULT_KIND,
                           params: Optional[Sequence[str]] = None, group=None) -> ConcentrationResult:
    """The fraction of ‖∇L(w; B)‖² in the span of the top-k eigenvectors of ∇²L(w; B), with those k eigenvalues.

    One forward and backward pass for g, then Lanczos for the top k (see ``top_eigenvalues``; for what ``tol``
    means for the fraction, see the module docstring). ``data`` is
    one ``(inputs, targets)`` pair or an iterable of them. The model is left exactly as it was. ``kind``, ``params``
    and ``group`` (or a ``CurvatureOperator`` in place of (model, loss_fn, data)): the eigenvectors of another
    curvature matrix, a parameter block (g restricted to it too), data over torch.distributed ranks; see
    ``smoothness.operator``.
    """
    source = Curvature(model, loss_fn, data, kind=kind, params=params, group=group, bn_mode=bn_mode)
    names, n = source.params, source.n
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if k < 1 or k >= n:
        raise ValueError(f"k must satisfy 1 <= k < number of trainable parameters ({n}"
                         f"{' in the block' if names else ''}); got {k}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol > 0:
        raise ValueError(f"tol must be a positive number, got {tol!r}")
    if max_iter is not None and (isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < k):
        raise ValueError(f"max_iter must be an int >= k ({k}) or None; got {max_iter!r}")
    op = source.operator(products=4 * k + 20)  # typical for the top k at a tight tol
    gen = generator_or_default(generator)
    out = lanczos_top(lambda rows: torch.stack([op.matvec(r) for r in rows]), op.n, k, tol=tol,
                      max_matvec=max_iter, dtype=op.dtype, device=op.device, generator=gen)
    g = op.flatten(op.gradient).double()
    grad_sq = float(g @ g)
    vectors, _ = torch.linalg.qr(out.vectors.double().T)  # (n, k), orthonormal to working precision
    fraction = float(torch.sum((vectors.T @ g) ** 2)) / grad_sq if grad_sq > 0 else math.nan
    return ConcentrationResult(fraction=min(fraction, 1.0) if grad_sq > 0 else fraction, k=k,
                               eigenvalues=tuple(float(v) for v in out.values), grad_norm=math.sqrt(grad_sq),
                               loss=op.loss, converged=bool(out.converged), n_hvp=op.n_hvp,
                               bn_mode=source.bn_mode, batch_size=op.n_samples, kind=source.kind, params=names,
                               product=op.product)
