"""The loss and its gradient at w, computed the way every estimator does (model left untouched)."""
from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch
from torch import nn

from ._objective import make_objective


def loss_and_gradient(model: nn.Module, loss_fn: Callable, data, *,
                      bn_mode: str = "batch") -> Tuple[float, Dict[str, torch.Tensor]]:
    """(L(w; B), ∇L(w; B)) with the gradient keyed like ``dict(model.named_parameters())``, for one batch or an
    iterable of them. Unlike a plain ``loss.backward()`` this moves no BatchNorm running statistic and writes no
    ``.grad``."""
    objective = make_objective(model, loss_fn, data, bn_mode)
    loss, grad = objective.loss_and_grad(check_finite=True)
    return float(loss), grad
