"""Seed 003's local smoothness along a minibatch step (``smoothness.local_lipschitz``)."""
from __future__ import annotations

from typing import Callable

import torch.nn.functional as F
from torch import nn

import smoothness


def local_smoothness(model: nn.Module, minibatch, full_batch, lr: float, loss_fn: Callable = F.cross_entropy) -> float:
    """Seed 003's measure with the true l2 norm: u = -lr * (minibatch gradient), then
    ||grad f(w + u) - grad f(w)|| / ||u|| with f the train-mode loss on the whole ``full_batch``."""
    _, grad = smoothness.loss_and_gradient(model, loss_fn, minibatch, bn_mode="batch")
    step = {n: -lr * g for n, g in grad.items()}
    return smoothness.local_lipschitz(model, loss_fn, full_batch, step, bn_mode="batch").value
