"""The training losses a run can use (``--loss``): ``loss_fn(outputs, class_indices, reduction="mean"|"sum")``.

- ``cross-entropy``: ``torch.nn.functional.cross_entropy`` (the seed labs, Santurkar et al.).
- ``mse``: Cohen et al.'s (2021) square loss for classification, ½‖f(x) − e_y‖² summed over the classes and averaged
  over the examples, e_y the one-hot target (locuslab/edge-of-stability, ``SquaredLoss``). Their Figure 1 trains
  fc-tanh with it; under cross-entropy the sharpness also settles at 2/η, but later, and falls once the margins
  grow (their §3.2 / Appendix).
Accuracy is the argmax of the outputs for both.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch
import torch.nn.functional as F


def squared_error(outputs: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """½‖outputs − one_hot(targets)‖² per example, averaged (or summed) over the batch."""
    one_hot = F.one_hot(targets, outputs.shape[1]).to(outputs.dtype)
    per_example = 0.5 * (outputs - one_hot).pow(2).sum(dim=1)
    if reduction == "mean":
        return per_example.mean()
    if reduction == "sum":
        return per_example.sum()
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


LOSSES: Dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "cross-entropy": F.cross_entropy,
    "mse": squared_error,
}


def get_loss(name: str) -> Callable:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r} (--loss); choose one of: {', '.join(LOSSES)}")
    return LOSSES[name]
