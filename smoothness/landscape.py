"""Loss surfaces: L(w + αd₁ + βd₂) over a grid with Li et al.'s (2018) filter-normalised random directions, and
L((1 − α)w₀ + αw₁) along a segment (Goodfellow et al. 2015). In ``bn_mode="running"``, ``bn_stats`` keeps the stored
running statistics or recomputes them at every point. Details: docs/smoothness.md.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ._args import generator_or_default
from ._objective import Objective, Params, check_bn_mode, make_objective, trainable_parameters

NORMALIZATIONS = ("filter", "layer", None)
IGNORES = ("biasbn", None)
BN_STATS = ("keep", "recompute")
Progress = Callable[[int, int], None]   # (points done, points in all)


@dataclass(frozen=True, eq=False)   # eq=False: arrays do not compare to a single bool
class Surface:
    """The loss (and accuracy) over a 1-D or 2-D grid of coefficients.

    ``losses[i]`` (1-D) or ``losses[i, j]`` (2-D) is the loss at w + coords[0][i]·d₁ (+ coords[1][j]·d₂); for an
    interpolation, at (1 − α)·start + α·end with α = coords[0][i]. Non-finite losses are kept as they are.
    """

    coords: Tuple[np.ndarray, ...]
    losses: np.ndarray
    accuracies: Optional[np.ndarray]   # fraction of argmax hits; None when outputs are not (N, C) class scores
    bn_mode: str
    bn_stats: str
    n_samples: int                     # samples per evaluation (all chunks together)
    n_passes: int                      # forward passes over those samples, all points together


# -- directions ----------------------------------------------------------------------------------------------------
def random_direction(model: nn.Module, *, generator: Optional[torch.Generator] = None,
                     normalize: Optional[str] = "filter",
                     ignore: Optional[str] = "biasbn") -> Params:
    """A Gaussian direction keyed like ``dict(model.named_parameters())`` (trainable parameters only).

    Every parameter gets its N(0, 1) draw from ``generator`` (default: seeded with ``ESTIMATOR_SEED``; pass one
    generator to draw several different directions) in ``named_parameters`` order (also the ignored ones,
    so the directions of the weights do not depend on ``ignore``), drawn on the generator's device in the
    parameter's dtype, then rescaled:

    ``normalize="filter"``  each filter d_f (slice along dim 0: a conv output channel, a linear row) to ‖w_f‖;
                            a parameter with at most one dimension, when not ignored, counts as one filter;
    ``normalize="layer"``   each parameter tensor to ‖w‖;
    ``normalize=None``      left as drawn.

    ``ignore="biasbn"`` sets d = 0 for every parameter with at most one dimension (biases, BatchNorm scale and shift),
    as Li et al. do; ``ignore=None`` perturbs them too. A filter whose weights are all zero gets d_f = 0.
    """
    generator = generator_or_default(generator)
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"unknown normalize {normalize!r}: use 'filter' (Li et al.), 'layer' or None")
    if ignore not in IGNORES:
        raise ValueError(f"unknown ignore {ignore!r}: use 'biasbn' (d = 0 for biases and BN parameters) or None")
    out = {}
    for name, p in trainable_parameters(model).items():
        w = p.detach()
        d = torch.randn(w.shape, generator=generator, dtype=w.dtype, device=generator.device).to(w.device)
        if w.ndim <= 1 and ignore == "biasbn":
            d = torch.zeros_like(w)
        elif normalize == "filter" and w.ndim >= 2:
            d = d * _scale(w.flatten(1).norm(dim=1), d.flatten(1).norm(dim=1)).view(-1, *[1] * (w.ndim - 1))
        elif normalize is not None:   # "layer", or "filter" on a 1-D parameter: one unit
            d = d * _scale(w.norm(), d.norm())
        out[name] = d
    return out


def _scale(target: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    return torch.where(current > 0, target / torch.where(current > 0, current, 1), 0)


# -- evaluation ----------------------------------------------------------------------------------------------------
class _Scored:
    """``loss_fn`` that also counts argmax hits when outputs are (N, C) scores and targets (N,) class indices."""

    def __init__(self, loss_fn: Callable):
        self.loss_fn = loss_fn
        self.correct: Optional[torch.Tensor] = None

    def __call__(self, outputs, targets):
        classes = (isinstance(outputs, torch.Tensor) and outputs.ndim == 2 and targets.ndim == 1
                   and not targets.is_floating_point() and not targets.is_complex()
                   and outputs.shape[0] == targets.shape[0])
        self.correct = (outputs.argmax(1) == targets).sum() if classes else None
        return self.loss_fn(outputs, targets)


def _check_coords(coords, n: int) -> Tuple[np.ndarray, ...]:
    if isinstance(coords, (np.ndarray, torch.Tensor)) or not isinstance(coords, Sequence) or len(coords) != n:
        raise ValueError(f"coords must be a list of {n} 1-D arrays of coefficients, one per direction")
    out = []
    for k, c in enumerate(coords):
        a = np.asarray(c.detach().cpu() if isinstance(c, torch.Tensor) else c, dtype=np.float64)
        if a.ndim != 1 or a.size == 0:
            raise ValueError(f"coords[{k}] must be a non-empty 1-D array of coefficients, got shape {a.shape}")
        if not np.isfinite(a).all():
            raise ValueError(f"coords[{k}] holds non-finite coefficients")
        out.append(a)
    return tuple(out)


def _check_bn_stats(bn_mode: str, bn_stats: str) -> None:
    check_bn_mode(bn_mode)
    if bn_stats not in BN_STATS:
        raise ValueError(f"unknown bn_stats {bn_stats!r}: use 'keep' (the stored running statistics, Li et al.) "
                         f"or 'recompute' (re-estimated on the data at every point)")
    if bn_mode == "batch" and bn_stats != "keep":
        raise ValueError("bn_stats='recompute' only applies to bn_mode='running': in 'batch' mode every point "
                         "already normalises with its own batch statistics")


def _running_stats(model: nn.Module) -> Tuple[List[str], List[nn.Module]]:
    """The names of the running-statistics buffers (``running_*``) and the modules that own them."""
    names, owners = [], []
    for prefix, module in model.named_modules():
        own = [n for n, b in module.named_buffers(recurse=False) if n.startswith("running_") and b is not None]
        if not own:
            continue
        if not hasattr(module, "momentum"):
            raise ValueError(f"bn_stats='recompute' needs every layer with running statistics to have a "
                             f"`momentum` attribute (running = (1 - momentum)·running + momentum·batch); "
                             f"{prefix or 'the model'} ({type(module).__name__}) has none. Use bn_stats='keep'")
        owners.append(module)
        names += [f"{prefix}.{n}" if prefix else n for n in own]
    return names, owners


@contextlib.contextmanager
def _momentum_one(modules: Sequence[nn.Module]) -> Iterator[None]:
    """With momentum 1 one train-mode pass sets running_* to exactly that batch's statistics."""
    saved = [(m, m.momentum) for m in modules]
    try:
        for m in modules:
            m.momentum = 1.0
        yield
    finally:
        for m, momentum in saved:
            m.momentum = momentum


class _Evaluator:
    """Loss and accuracy at given parameters over all chunks, with the chosen BatchNorm handling."""

    def __init__(self, model: nn.Module, loss_fn: Callable, data, bn_mode: str, bn_stats: str):
        _check_bn_stats(bn_mode, bn_stats)
        self.loss_fn, self.scored = loss_fn, _Scored(loss_fn)
        self.objective = make_objective(model, self.scored, data, bn_mode)
        self.n_samples = self.objective.n_samples
        self.recompute = bn_mode == "running" and bn_stats == "recompute"
        self.stat_names, self.owners = _running_stats(model) if self.recompute else ([], [])
        self.buffers = dict(model.named_buffers())
        self.passes_per_point = 2 if self.recompute and self.stat_names else 1

    def context(self):
        return _momentum_one(self.owners) if self.recompute else contextlib.nullcontext()

    def __call__(self, params: Params) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        tensors = dict(params)
        if self.recompute and self.stat_names:
            stats = None
            for weight, chunk in self.objective.chunks():
                # a train-mode pass whose loss is discarded: it updates `fresh` in place to this chunk's statistics
                train = Objective(chunk.model, self.loss_fn, (chunk.inputs, chunk.targets), "batch")
                fresh = {n: self.buffers[n].clone() for n in self.stat_names}
                train.loss({**params, **fresh})
                stats = ({n: weight * fresh[n] for n in self.stat_names} if stats is None
                         else {n: stats[n] + weight * fresh[n] for n in self.stat_names})
            tensors.update(stats)
        loss, correct = None, 0
        for weight, chunk in self.objective.chunks():
            value = chunk.loss(tensors)
            loss = weight * value if loss is None else loss + weight * value
            correct = None if correct is None or self.scored.correct is None else correct + self.scored.correct
        accuracy = None if correct is None else correct / self.n_samples
        return loss, accuracy


def _run_points(evaluator: _Evaluator, points, n_points: int, progress: Optional[Progress]):
    losses, accuracies = [], []
    with torch.no_grad(), evaluator.context():
        for k, params in enumerate(points):
            loss, accuracy = evaluator(params)
            losses.append(loss)
            accuracies.append(accuracy)
            if progress is not None:
                progress(k + 1, n_points)
    loss_arr = torch.stack(losses).double().cpu().numpy()
    acc_arr = (None if any(a is None for a in accuracies)
               else torch.stack([torch.as_tensor(a) for a in accuracies]).double().cpu().numpy())
    return loss_arr, acc_arr


def loss_surface(model: nn.Module, loss_fn: Callable, data, directions: Sequence[Mapping],
                 coords: Sequence, *, bn_mode: str = "batch", bn_stats: str = "keep",
                 progress: Optional[Progress] = None) -> Surface:
    """L(w + Σᵢ coords[i][kᵢ]·dᵢ) for every grid point, with w the model's trainable parameters.

    ``directions`` holds one or two dicts keyed like ``dict(model.named_parameters())`` (e.g. from
    :func:`random_direction`); ``coords`` one 1-D array of coefficients per direction. The result's ``losses`` has
    shape ``(len(coords[0]),)`` or ``(len(coords[0]), len(coords[1]))``. Costs one forward pass over the data per
    point (two with ``bn_stats="recompute"``); ``progress(done, total)`` is called after every point.
    """
    if isinstance(directions, Mapping) or not isinstance(directions, Sequence) or len(directions) not in (1, 2):
        raise ValueError("directions must be a list of one or two direction dicts (a 1-D or a 2-D surface)")
    grid = _check_coords(coords, len(directions))
    evaluator = _Evaluator(model, loss_fn, data, bn_mode, bn_stats)
    base = evaluator.objective.base
    dirs = [evaluator.objective.check_direction(d, f"directions[{k}]") for k, d in enumerate(directions)]
    shape = tuple(len(c) for c in grid)

    def points():
        for index in np.ndindex(*shape):
            params = {}
            for n, w in base.items():
                p = w
                for d, c, i in zip(dirs, grid, index):
                    p = torch.add(p, d[n], alpha=float(c[i]))
                params[n] = p
            yield params

    n_points = math.prod(shape)
    losses, accuracies = _run_points(evaluator, points(), n_points, progress)
    return Surface(coords=grid, losses=losses.reshape(shape),
                   accuracies=None if accuracies is None else accuracies.reshape(shape), bn_mode=bn_mode,
                   bn_stats=bn_stats, n_samples=evaluator.n_samples,
                   n_passes=n_points * evaluator.passes_per_point)


def interpolation(model: nn.Module, loss_fn: Callable, data, start: Mapping, end: Mapping,
                  alphas, *, bn_mode: str = "batch", bn_stats: str = "keep",
                  progress: Optional[Progress] = None) -> Surface:
    """L((1 − α)·start + α·end) for every α in ``alphas`` (Goodfellow et al. 2015), e.g. init → final weights.

    ``start`` and ``end`` are dicts keyed like ``dict(model.named_parameters())``; the model supplies the network
    and its buffers (with ``bn_stats="keep"`` its stored running statistics are used at every α, so load the state
    whose statistics you mean, or use ``"recompute"``); its own parameter values do not enter. The points are
    ``torch.lerp(start, end, α)``, exact at α = 0 and α = 1.
    """
    (alpha_arr,) = _check_coords([alphas], 1)
    evaluator = _Evaluator(model, loss_fn, data, bn_mode, bn_stats)
    a = evaluator.objective.check_direction(start, "start", allow_zero=True)
    b = evaluator.objective.check_direction(end, "end", allow_zero=True)
    points = ({n: torch.lerp(a[n], b[n], float(alpha)) for n in a} for alpha in alpha_arr)
    losses, accuracies = _run_points(evaluator, points, len(alpha_arr), progress)
    return Surface(coords=(alpha_arr,), losses=losses, accuracies=accuracies, bn_mode=bn_mode, bn_stats=bn_stats,
                   n_samples=evaluator.n_samples, n_passes=len(alpha_arr) * evaluator.passes_per_point)
