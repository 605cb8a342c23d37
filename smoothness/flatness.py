"""Flatness measures from the generalisation literature: Jiang et al.'s (2020) PAC-Bayes σ, the largest σ with
E_u L(w + u) − L(w) ≤ target (u ~ N(0, σ²I), or σ²w² + ε² magnitude-aware), reported as 1/σ²; and Petzka et al.'s
(2021) relative flatness κ = Σ_{s,s'} ⟨w_s, w_s'⟩ Tr(H_{s,s'}) of one layer. Details: docs/smoothness.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from ._args import check_count, check_positive, generator_or_default, renamed
from ._objective import make_objective
from ._perturb import base_loss, blown_up, gaussian, loss_at, mean_and_stderr
from .operator import DEFAULT_BN_MODE, DEFAULT_KIND, Curvature

SIGMA_START = 1e-2
MAX_DECADES = 20


@dataclass(frozen=True)
class PacBayesFlatness:
    sigma: float                   # largest σ found with mean increase ≤ target
    measure: float                 # 1/σ², Jiang et al.'s number
    increase: float                # the Monte Carlo mean increase at sigma
    base_loss: float
    target: float
    magnitude_aware: bool
    eps: Optional[float]           # the floor ε of the magnitude-aware noise; None for plain
    n_samples: int                 # common random draws, reused at every σ
    n_bisections: int
    n_passes: int                  # forward passes
    bn_mode: str
    batch_size: int
    n_non_finite: int = 0          # noisy evaluations whose loss was NaN or ±inf (counted as +inf: σ too large)


@dataclass(frozen=True)
class RelativeFlatness:
    value: float                   # κ = Σ_{s,s'} ⟨w_s, w_s'⟩ Tr(H_{s,s'})
    stderr: float                  # 0 for the exact computation
    layer: str                     # parameter name of W
    method: str                    # "exact" or "hutchinson"
    n_probes: Optional[int]        # Hutchinson probes; None for exact
    n_hvp: int
    bn_mode: str
    batch_size: int
    product: str = field(default="", compare=False)   # how products were computed (metadata: not compared)


def _pacbayes(model, loss_fn, data, target, n_samples, n_bisections, generator, bn_mode, eps) -> PacBayesFlatness:
    target = check_positive("target", target)
    check_count("n_samples", n_samples, 1)
    check_count("n_bisections", n_bisections, 1)
    generator = generator_or_default(generator)
    objective = make_objective(model, loss_fn, data, bn_mode)
    f0 = base_loss(objective)
    draws = [gaussian(objective, generator) for _ in range(n_samples)]
    passes, non_finite = [1], [0]

    def increase(sigma: float) -> float:
        if eps is None:
            shifts = ({n: sigma * z[n] for n in z} for z in draws)
        else:
            std = {n: torch.sqrt(sigma ** 2 * w ** 2 + eps ** 2) for n, w in objective.base.items()}
            shifts = ({n: std[n] * z[n] for n in z} for z in draws)
        passes[0] += n_samples
        losses = [blown_up(loss_at(objective, s)) for s in shifts]
        non_finite[0] += sum(x == math.inf for x in losses)
        return sum(losses) / n_samples - f0

    def ok(value: float) -> bool:
        return value <= target

    sigma, f = SIGMA_START, increase(SIGMA_START)
    lo = hi = None
    for _ in range(MAX_DECADES):
        if ok(f):
            lo, f_lo = sigma, f
            if hi is not None:
                break
            sigma *= 10
        else:
            hi = sigma
            if lo is not None:
                break
            sigma /= 10
        f = increase(sigma)
    else:
        floor = "" if eps is None else f" (with eps = {eps:g} the noise never goes below eps·z; lower eps)"
        raise ValueError(f"no σ in [{SIGMA_START / 10 ** MAX_DECADES:g}, {SIGMA_START * 10 ** MAX_DECADES:g}] "
                         f"brackets a "
                         f"loss increase of target = {target:g}: the increase was {f:g} at σ = {sigma:g}{floor}")
    for _ in range(n_bisections):
        mid = math.sqrt(lo * hi)
        f = increase(mid)
        if ok(f):
            lo, f_lo = mid, f
        else:
            hi = mid
    return PacBayesFlatness(sigma=lo, measure=1 / lo ** 2, increase=f_lo, base_loss=f0, target=target,
                            magnitude_aware=eps is not None, eps=eps, n_samples=n_samples, n_bisections=n_bisections,
                            n_passes=passes[0], bn_mode=bn_mode, batch_size=objective.n_samples,
                            n_non_finite=non_finite[0])


def pacbayes_flatness(model: nn.Module, loss_fn: Callable, data, *, generator: Optional[torch.Generator] = None,
                      target: float = 0.1, n_samples: int = 16, n_bisections: int = 12,
                      bn_mode: str = "batch") -> PacBayesFlatness:
    """Jiang et al.'s "pacbayes.flatness": the largest σ with E_{u~N(0,σ²I)} L(w + u) − L(w) ≤ ``target`` (a loss
    increase, not their accuracy deviation), and 1/σ². Costs n_samples forward passes per σ tried (about
    n_bisections + 3 values of σ). ``n_samples``: Monte Carlo draws of u (not probes: see ``hessian_trace``), from
    ``generator`` (default: seeded with ``ESTIMATOR_SEED``)."""
    return _pacbayes(model, loss_fn, data, target, n_samples, n_bisections, generator, bn_mode, None)


def pacbayes_mag_flatness(model: nn.Module, loss_fn: Callable, data, *,
                          generator: Optional[torch.Generator] = None, target: float = 0.1, eps: float = 1e-3,
                          n_samples: int = 16, n_bisections: int = 12,
                          bn_mode: str = "batch") -> PacBayesFlatness:
    """Jiang et al.'s "pacbayes.mag.flatness": as :func:`pacbayes_flatness` with uᵢ ~ N(0, σ²wᵢ² + ε²), σ relative
    to each weight's magnitude; ``eps`` keeps zero weights perturbed (it must be small enough that the ε-noise alone
    stays below ``target``)."""
    eps = check_positive("eps", eps)
    return _pacbayes(model, loss_fn, data, target, n_samples, n_bisections, generator, bn_mode, eps)


def last_linear_weight(model: nn.Module) -> str:
    names = [f"{name}.weight" if name else "weight" for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ValueError("the model has no nn.Linear layer, so there is no default layer for relative flatness: "
                         "pass layer= the name of the weight matrix (as in model.named_parameters())")
    return names[-1]


def relative_flatness(model, loss_fn: Optional[Callable] = None, data=None, *, layer: Optional[str] = None,
                      n_probes: Optional[int] = None, generator: Optional[torch.Generator] = None,
                      bn_mode: str = DEFAULT_BN_MODE, n_samples: Optional[int] = None) -> RelativeFlatness:
    """Petzka et al.'s κ for the weight matrix ``layer`` (default: the last nn.Linear's weight), exactly (numel(W)
    Hessian-vector products) or, with ``n_probes``, by Hutchinson over Rademacher probes from ``generator``
    (default seeded with ``ESTIMATOR_SEED``). A Hessian ``CurvatureOperator`` whose block holds ``layer`` may stand
    in for (model, loss_fn, data). ``n_samples`` is the deprecated name of ``n_probes``."""
    n_probes = renamed("n_probes", n_probes, "n_samples", n_samples, "relative_flatness")
    source = Curvature(model, loss_fn, data, kind=DEFAULT_KIND, params=None, group=None, bn_mode=bn_mode)
    if source.kind != "hessian":
        raise ValueError(f"relative flatness is defined with the Hessian; this operator is kind={source.kind!r}: "
                         f"build one with kind='hessian'")
    objective = source.objective
    names = source.params or objective.names
    name = last_linear_weight(objective.model) if layer is None else layer
    if name not in names:
        raise ValueError(f"layer {name!r} is not a trainable parameter of the model"
                         f"{' in the operator' + chr(39) + 's block' if source.params else ''}; choose one of "
                         f"{[n for n in names if objective.base[n].ndim >= 2]}")
    W = objective.base[name]
    if W.ndim < 2:
        raise ValueError(f"layer {name!r} has shape {tuple(W.shape)}: relative flatness needs a weight matrix")
    rows = W.reshape(W.shape[0], -1)
    gram = rows @ rows.T
    if n_probes is not None:
        check_count("n_probes", n_probes, 2)
    op = source.operator(products=rows.numel() if n_probes is None else n_probes)
    zero = {n: torch.zeros_like(objective.base[n]) for n in names}

    def block(v: torch.Tensor) -> torch.Tensor:
        return op.matvec_dict({**zero, name: v.reshape(W.shape)})[name].reshape(rows.shape)

    if n_probes is None:
        value = 0.0
        for i in range(rows.numel()):
            s, j = divmod(i, rows.shape[1])
            e = torch.zeros_like(rows)
            e[s, j] = 1
            value += float(gram[s] @ block(e)[:, j])
        stderr, method = 0.0, "exact"
    else:
        gen = generator_or_default(generator)
        samples = []
        for _ in range(n_probes):
            z = (torch.randint(0, 2, rows.shape, generator=gen, device=gen.device) * 2 - 1).to(rows)
            samples.append(float(((gram @ z) * block(z)).sum()))
        (value, stderr), method = mean_and_stderr(samples), "hutchinson"
    return RelativeFlatness(value=value, stderr=stderr, layer=name, method=method, n_probes=n_probes,
                            n_hvp=op.n_hvp, bn_mode=source.bn_mode, batch_size=op.n_samples, product=op.product)
