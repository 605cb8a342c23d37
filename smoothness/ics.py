"""Internal covariate shift in Santurkar et al.'s sense (Fig. 3/5): how much a layer's gradient changes when the
layers before it take their SGD step on the same batch."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Tuple

import torch
from torch import nn

from ._objective import make_objective


@dataclass(frozen=True)
class LayerShift:
    layer: str            # module name, e.g. "features.0"
    parameters: Tuple[str, ...]
    grad_diff_norm: float  # ‖G − G′‖₂
    cosine: float          # cos(G, G′); 1.0 when both are zero


@dataclass(frozen=True)
class ICSResult:
    layers: Tuple[LayerShift, ...]
    lr: float
    bn_mode: str

    def as_dict(self):
        return {s.layer: {"grad_diff_norm": s.grad_diff_norm, "cosine": s.cosine} for s in self.layers}


def _layers(objective):
    """Parameterised layers in the order their parameters were registered (the forward order for Sequential-style
    models): each module that owns trainable parameters directly, with those parameters."""
    groups = {}
    for name in objective.names:
        layer = name.rpartition(".")[0]
        groups.setdefault(layer, []).append(name)
    return list(groups.items())


def internal_covariate_shift(model: nn.Module, loss_fn: Callable, data, lr: float, *,
                             bn_mode: str = "batch") -> ICSResult:
    """For each layer i: G = ∇_{W_i} L(w; B) and G′ = the same gradient after layers 1…i−1 took the SGD step
    W ← W − lr·∇L (same data B: one batch or an iterable of them). Returns ‖G − G′‖ and cos(G, G′) per layer;
    one pass per layer plus one."""
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
        raise ValueError(f"lr must be a finite number >= 0, got {lr}")
    objective = make_objective(model, loss_fn, data, bn_mode)
    _, grad = objective.loss_and_grad(check_finite=True)
    layers = _layers(objective)
    shifts = []
    earlier = []
    for layer, names in layers:
        if not earlier:
            g_prime = grad
        else:
            shift = {n: (-grad[n] if n in earlier else torch.zeros_like(grad[n])) for n in objective.names}
            _, g_prime = objective.loss_and_grad(shift, float(lr))
        g = torch.cat([grad[n].reshape(-1).double() for n in names])
        gp = torch.cat([g_prime[n].reshape(-1).double() for n in names])
        diff = float(torch.linalg.vector_norm(g - gp))
        denom = float(torch.linalg.vector_norm(g) * torch.linalg.vector_norm(gp))
        cosine = 1.0 if denom == 0 and diff == 0 else (float(torch.dot(g, gp)) / denom if denom > 0 else 0.0)
        shifts.append(LayerShift(layer=layer or "<root>", parameters=tuple(names), grad_diff_norm=diff, cosine=cosine))
        earlier.extend(names)
    return ICSResult(layers=tuple(shifts), lr=float(lr), bn_mode=bn_mode)
