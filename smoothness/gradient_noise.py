"""Gradient noise over units (METHODS.md §12; Cockpit's instruments, Schneider et al. 2021).

With u_1 … u_m the per-unit gradients (``unit="example"``: per-example; ``"batch"``: one per minibatch), ū their
mean and V = 1/(m−1) Σ‖u_i − ū‖²:

- norm test (Byrd et al. 2012, eq. 3.9)           θ_norm  = sqrt(V / (m‖ū‖²))
- inner-product test (Bollapragada et al. 2018)   θ_inner = sqrt(Var_i(u_iᵀū) / (m‖ū‖⁴))
- orthogonality test (ibid., eq. 3.3)             ν_ortho = sqrt(1/(m−1) Σ‖u_i − (u_iᵀū/‖ū‖²)ū‖² / (m‖ū‖²))
                                                          = sqrt((V − Var_i(u_iᵀū)/‖ū‖²) / (m‖ū‖²))
- mean GSNR (Liu et al. 2020)                     mean_j ū_j² / (σ_j² + ε), σ_j² the biased (1/m) variance
- simple noise scale (McCandlish et al. 2018)     B_simple = b·V / (‖ū‖² − V/m), b = 1 (examples) or B
                                                  (minibatches); inf when ‖ū‖² − V/m ≤ 0 (noise drowns the signal)

Sample variances divide by m − 1. Per-parameter sums are merged chunk by chunk (Chan et al.'s pairwise update of
mean and centred sum of squares), so memory is one chunk's k × n gradients plus O(n + m).

Cost: data as one batch: one per-example pass (vmap of grad), ū taken from it. Data as several chunks: the
projections u_iᵀū need ū first, so a first pass takes ū from ordinary batched gradients (one forward and backward per
chunk, 0.6-0.7x a per-example pass on the study's ConvNet) and the per-example pass follows; the per-example mean must equal it
(else a module couples examples or the loss is not a mean). ``unit="batch"``: one forward and backward per
minibatch, the m gradients held (m × n numbers) since recomputing them would double the cost. Per-example gradients
from layer hooks (BackPACK's way: unfold + einsum for convolutions) measured 1.6x slower than vmap on CPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ._objective import check_bn_mode, norm
from ._units import Units
from .step_quality import LineObservation

#: Cockpit's GradHist1d default: 100 bins over [−2, 2]
DEFAULT_EDGES = tuple(float(e) for e in np.linspace(-2.0, 2.0, 101))
# the per-example mean must equal the batched gradient to this relative accuracy (far above rounding)
_MEAN_RTOL = 1e-4


@dataclass(frozen=True)
class GradientHistogram:
    """Counts of the entries u_ij of all per-unit gradients over fixed bin edges, bins [e_k, e_k+1); entries below
    e_0 are counted in ``below``, entries at or above e_K in ``above``."""

    edges: np.ndarray
    counts: np.ndarray
    below: int
    above: int
    unit: str
    n_units: int

    @property
    def clipped_counts(self) -> np.ndarray:
        """Cockpit's GradHist1d convention: outliers clipped into the outer bins."""
        counts = self.counts.copy()
        counts[0] += self.below
        counts[-1] += self.above
        return counts


@dataclass(frozen=True)
class GradientNoise:
    """The gradient-noise instruments of METHODS.md §12 for one set of units (see the module docstring)."""

    norm_test: float
    inner_product_test: float
    orthogonality_test: float
    gsnr: float
    noise_scale: float          # B_simple; inf when noise_drowns_signal
    noise_drowns_signal: bool   # ‖ū‖² − V/m ≤ 0: the true gradient's norm is not resolved, more units are needed
    gradient_norm: float        # ‖ū‖
    variance: float             # V, the trace of the sample covariance of the units
    n_units: int
    batch_size: int             # b: 1 for examples, B for minibatch units
    n_params: int
    unit: str
    bn_mode: str
    eps: float
    n_passes: int               # passes over the data (1, or 2 when ū needs a batched pass first)
    loss: float                 # the mean of the per-unit losses
    histogram: Optional[GradientHistogram] = None
    lines: Dict[str, LineObservation] = field(default_factory=dict)   # one per entry of ``directions``


class Moments:
    """Running sums over units: per-parameter mean and centred sum of squares (merged pairwise), the projections
    u_iᵀr on a reference r (ū, or ū from a first pass), per-unit losses and slopes along given unit directions,
    and optional histogram counts."""

    def __init__(self, reference: Optional[torch.Tensor], edges: Optional[torch.Tensor],
                 directions: Optional[Mapping[str, torch.Tensor]] = None):
        self.reference, self.edges = reference, edges
        self.directions = dict(directions or {})
        self.count, self.mean, self.m2 = 0, None, None
        self.projections, self.losses = [], []
        self.slopes = {name: [] for name in self.directions}
        if edges is not None:
            self.counts = torch.zeros(len(edges) - 1, dtype=torch.int64)
            self.below = self.above = 0
            widths = edges[1:] - edges[:-1]
            self.uniform = bool(torch.allclose(widths, widths[0], rtol=1e-9, atol=0))

    def add(self, losses: torch.Tensor, rows: torch.Tensor) -> None:
        k = rows.shape[0]
        ones = rows.new_ones(k)   # column sums as matrix-vector products: 8x faster than var_mean over dim 0
        mean = (ones @ rows) / k
        squares = rows - mean
        squares.mul_(squares)
        m2, mean = (ones @ squares).double(), mean.double()
        if self.count == 0:
            self.mean, self.m2 = mean, m2
        else:
            delta, total = mean - self.mean, self.count + k
            self.mean = self.mean + delta * (k / total)
            self.m2 = self.m2 + m2 + delta ** 2 * (self.count * k / total)
        self.count += k
        reference = self.mean.to(rows.dtype) if self.reference is None else self.reference
        vectors = [reference] + [d.to(rows.dtype) for d in self.directions.values()]
        products = (rows @ torch.stack(vectors, dim=1)).double()   # one pass over the rows for all projections
        self.projections.append(products[:, 0])
        self.losses.append(losses.double())
        for i, name in enumerate(self.directions, start=1):
            self.slopes[name].append(products[:, i])
        if self.edges is not None:
            self._count(rows)

    def _count(self, rows: torch.Tensor) -> None:
        """Bins [e_k, e_k+1); a value below e_0 counts in ``below``, one at or above e_K in ``above``. Uniform edges:
        clamp into one extra bin at each end and ``torch.histc`` (arithmetic binning, as Cockpit's: a value within
        rounding of an inner edge may land in the neighbouring bin); other edges by binary search."""
        values = rows.reshape(-1)
        edges = self.edges.to(values.dtype)
        n_bins = len(edges) - 1
        if self.uniform:
            low, high = float(edges[0]), float(edges[-1])
            width = (high - low) / n_bins
            clamped = values.clamp(low - width / 2, high + width / 2)
            counts = torch.histc(clamped, bins=n_bins + 2, min=low - width, max=high + width).long()
        else:
            counts = torch.bincount(torch.bucketize(values, edges, right=True), minlength=n_bins + 2)
        counts = counts.cpu()
        self.below += int(counts[0])
        self.above += int(counts[n_bins + 1])
        self.counts += counts[1:n_bins + 1]


def check_edges(edges) -> torch.Tensor:
    try:
        values = torch.as_tensor(np.asarray(edges, dtype=np.float64))
    except (TypeError, ValueError):
        raise TypeError("edges must be a sequence of increasing numbers (the bin edges)") from None
    if values.ndim != 1 or values.numel() < 2 or not bool(torch.isfinite(values).all()) or not bool(
            (values[1:] > values[:-1]).all()):
        raise ValueError(f"edges must be at least two finite, strictly increasing numbers, got {edges!r}")
    return values


def collect(units: Units, edges=None, directions=None) -> tuple[Moments, int]:
    """All the sums over the units of ``units``, and the number of passes over the data it took. ``directions``:
    name -> flat unit vector."""
    reference, passes = None, 1
    if units.unit == "example" and len(units.objectives) > 1:
        reference, passes = units.mean_gradient(), 2
    device = units.base[units.names[0]].device
    moments = Moments(reference, None if edges is None else check_edges(edges).to(device), directions)
    for losses, rows in units.gradients():
        moments.add(losses, rows)
    if reference is not None:
        gap = float(torch.linalg.vector_norm(moments.mean - reference.double()))
        size = float(torch.linalg.vector_norm(reference.double()))
        if gap > _MEAN_RTOL * max(size, 1e-30):
            raise ValueError(f"the per-example gradients do not average to the batched gradient (relative gap "
                             f"{gap / max(size, 1e-30):.3g}): either a module couples the examples of a batch (use "
                             f"unit='batch' or bn_mode='running') or loss_fn is not the mean of per-example losses")
    return moments, passes


def gradient_noise(model: nn.Module, loss_fn: Callable, data, *, unit: str = "example",
                   params: Optional[Sequence[str]] = None, bn_mode: str = "batch", eps: float = 1e-5,
                   edges: Optional[Sequence[float]] = None,
                   directions: Optional[Mapping[str, Mapping[str, torch.Tensor]]] = None) -> GradientNoise:
    """Norm, inner-product and orthogonality tests, mean GSNR and simple noise scale of the per-unit gradients.

    ``data``: one batch (inputs, targets) or an iterable of chunks (``unit="example"``), or an iterable of at least
    two minibatches of equal size (``unit="batch"``); an iterable is walked once and its chunks held. ``params``: names of a block of parameters (default all
    trainable ones). In the same pass: ``edges``, count the gradient entries over these bin edges (``histogram``);
    ``directions`` (name -> dict keyed like the parameters), the mean loss and slope along each direction with their
    per-unit variances (``lines``, for :func:`~smoothness.step_quality.step_quality_from`).
    """
    check_bn_mode(bn_mode)
    if not (isinstance(eps, (int, float)) and eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    units = Units(model, loss_fn, data, unit, params, bn_mode)
    flat = {}
    for name, direction in (directions or {}).items():
        d = units.objectives[0].check_direction(direction, what=f"directions[{name!r}]", names=units.names)
        flat[name] = units.flatten(d) / norm(d)
    moments, passes = collect(units, edges, flat)
    m = moments.count
    ubar, m2 = moments.mean, moments.m2
    g2 = float(ubar @ ubar)
    variance = float(m2.sum()) / (m - 1)
    proj = torch.cat(moments.projections)
    var_proj = float(proj.var(correction=1))
    gsnr = float((ubar ** 2 / (m2 / m + eps)).mean())
    signal = g2 - variance / m
    b = units.batch_size
    if g2 > 0:
        norm_test = math.sqrt(variance / (m * g2))
        inner = math.sqrt(var_proj / (m * g2 ** 2))
        ortho = math.sqrt(max(variance - var_proj / g2, 0.0) / (m * g2))
    else:
        norm_test = inner = ortho = math.inf
    histogram = None
    if edges is not None:
        histogram = GradientHistogram(edges=moments.edges.cpu().numpy().copy(), counts=moments.counts.numpy(),
                                      below=moments.below, above=moments.above, unit=unit, n_units=m)
    return GradientNoise(norm_test=norm_test, inner_product_test=inner, orthogonality_test=ortho, gsnr=gsnr,
                         noise_scale=b * variance / signal if signal > 0 else math.inf,
                         noise_drowns_signal=not signal > 0, gradient_norm=math.sqrt(g2), variance=variance,
                         n_units=m, batch_size=b, n_params=units.n_params, unit=unit,
                         bn_mode=bn_mode, eps=float(eps), n_passes=passes, histogram=histogram,
                         loss=float(torch.cat(moments.losses).mean()),
                         lines={name: LineObservation.of(torch.cat(moments.losses), torch.cat(slopes), unit, bn_mode)
                                for name, slopes in moments.slopes.items()})


def gradient_histogram(model: nn.Module, loss_fn: Callable, data, *, edges: Sequence[float] = DEFAULT_EDGES,
                       unit: str = "example", params: Optional[Sequence[str]] = None,
                       bn_mode: str = "batch") -> GradientHistogram:
    """1-D histogram of the entries of all per-unit gradients over fixed ``edges`` (Cockpit's GradHist1d; to get it
    with the noise instruments in one pass use ``gradient_noise(..., edges=...)``)."""
    check_bn_mode(bn_mode)
    units = Units(model, loss_fn, data, unit, params, bn_mode)
    moments = Moments(torch.zeros(units.n_params, dtype=units.base[units.names[0]].dtype,
                                  device=units.base[units.names[0]].device),
                      check_edges(edges).to(units.base[units.names[0]].device))
    for losses, rows in units.gradients():
        moments.add(losses, rows)
    return GradientHistogram(edges=moments.edges.cpu().numpy().copy(), counts=moments.counts.numpy(),
                             below=moments.below, above=moments.above, unit=unit, n_units=moments.count)
