"""What the sharpness and flatness measures share: loss at w + δ without a gradient, per-weight scales, flat
vectors, and argument checks. Every evaluation goes through the :class:`~smoothness._objective.Objective` (or its
chunked form), so the model is never written and every forward pass sees the same random draws."""
from __future__ import annotations

import math
from typing import Mapping, Optional

import torch

from ._objective import Params


def loss_at(objective, shift: Optional[Mapping[str, torch.Tensor]]) -> float:
    """L(w + shift) (L(w) for None) by forward passes only: one per chunk."""
    params = objective.base if shift is None else {n: w + shift[n] for n, w in objective.base.items()}
    with torch.no_grad():
        return sum(weight * float(chunk.loss(params)) for weight, chunk in objective.chunks())


def blown_up(loss: float) -> float:
    """A perturbed loss with NaN or ±inf replaced by +inf: the rule every perturbation measure follows (the loss blew
    up, so the increase is unbounded); each result counts such evaluations in ``n_non_finite``."""
    return loss if math.isfinite(loss) else math.inf


def base_loss(objective) -> float:
    """L(w), through the evaluation that checks finiteness and determinism."""
    loss, _ = objective.loss_and_grad(check_finite=True)
    return float(loss)


def weight_scale(objective, adaptive: bool, eta: float) -> Params:
    """T_w: |w| + η per weight (adaptive, Kwon et al. 2021's ASAM normalisation) or 1 everywhere (plain)."""
    if adaptive:
        return {n: w.abs() + eta for n, w in objective.base.items()}
    return {n: torch.ones_like(w) for n, w in objective.base.items()}


def flatten(objective, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([tensors[n].reshape(-1) for n in objective.names])


def unflatten(objective, flat: torch.Tensor) -> Params:
    parts = torch.split(flat, [objective.base[n].numel() for n in objective.names])
    return {n: t.reshape(objective.base[n].shape) for n, t in zip(objective.names, parts)}


def gaussian(objective, generator: torch.Generator) -> Params:
    """N(0, I) draws keyed like the parameters, in ``names`` order, drawn on the generator's device in the
    parameters' dtype (the same numbers whatever device the model is on)."""
    return {n: torch.randn(w.shape, generator=generator, dtype=w.dtype, device=generator.device).to(w.device)
            for n, w in objective.base.items()}


def mean_and_stderr(samples) -> tuple:
    t = torch.tensor(samples, dtype=torch.float64)
    return float(t.mean()), float(t.std(unbiased=True) / math.sqrt(len(samples)))
