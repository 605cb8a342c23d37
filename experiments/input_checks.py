"""Checks a run's data and model must pass before anything is written, shared by the CLI's pre-launch checks
(`experiments.plugins.check_runs`) and the `experiments.Tracker`. Each returns what is wrong, as the end of a one-line
message its caller begins with what it checked (``--dataset mod:data: the training set``), or None."""
from __future__ import annotations

from typing import Mapping, Optional

import torch
from torch import nn

__all__ = ["frozen_or_empty", "missing_linear", "non_finite", "one_line", "single_class", "weights_mismatch"]


def one_line(exc: BaseException) -> str:
    """``Type: message`` of an exception on one line (torch's messages often span several)."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def non_finite(x: torch.Tensor) -> Optional[str]:
    """Of inputs ``x`` (n, ...): how many values are NaN or inf, and the first item holding one (the caller says
    what to do: a NaN input reads as a diverged run, an inf test input as a test loss of null)."""
    if not x.is_floating_point() or x.numel() == 0:
        return None
    bad = ~torch.isfinite(x.reshape(len(x), -1))
    if not bad.any():
        return None
    count, first = int(bad.sum()), int(bad.any(dim=1).nonzero()[0])
    return f"inputs hold {count} non-finite value{'s' if count > 1 else ''} (NaN or inf), the first in item {first}"


def single_class(y: torch.Tensor) -> Optional[str]:
    """Integer labels ``y`` of one class only: the loss of a classifier is then 0 or its step 0."""
    if y.is_floating_point() or y.numel() == 0:
        return None
    labels = torch.unique(y)
    if len(labels) > 1:
        return None
    return (f"holds a single class (label {int(labels[0])}, all {y.numel()} items): a classifier needs at least two "
            f"classes")


def frozen_or_empty(model: nn.Module) -> Optional[str]:
    """A model without a trainable parameter: nothing for the optimizer to step, no loss landscape to measure."""
    params = list(model.parameters())
    if not params:
        return "has no parameters: nothing to train or measure (its layers need at least one nn.Parameter)"
    if not any(p.requires_grad for p in params):
        return (f"has no trainable parameter: every one of its {len(params)} parameters is frozen "
                f"(requires_grad=False); unfreeze the ones to train")
    return None


def missing_linear(model: nn.Module, option: str) -> Optional[str]:
    """The generalization measures take relative flatness on the last nn.Linear's weight: a model without one."""
    if any(isinstance(m, nn.Linear) for m in model.modules()):
        return None
    return (f"has no nn.Linear layer, which {option} needs (relative flatness is measured on the last one's weight); "
            f"leave {option} at 0, or end the model with an nn.Linear")


def weights_mismatch(model: nn.Module, saved) -> Optional[str]:
    """How saved weights (a state_dict, from a checkpoint) differ from the model's: tensors of another shape (the
    first two named), tensors only one side has; None when they fit."""
    if not isinstance(saved, Mapping):
        return f"it holds a {type(saved).__name__}, not a state_dict"
    ours = model.state_dict()
    shapes = [f"{k} is {tuple(saved[k].shape)} there, {tuple(v.shape)} in the model" for k, v in ours.items()
              if isinstance(saved.get(k), torch.Tensor) and saved[k].shape != v.shape]
    missing, extra = [k for k in ours if k not in saved], [k for k in saved if k not in ours]
    parts = shapes[:2] + ([f"{len(shapes) - 2} more tensors differ in shape"] if len(shapes) > 2 else [])
    for keys, where in ((missing, "the model has, not there"), (extra, "there, not in the model")):
        if keys:
            parts.append(f"{len(keys)} tensor{'s' if len(keys) > 1 else ''} {where} ({', '.join(keys[:3])}"
                         f"{', ...' if len(keys) > 3 else ''})")
    return "; ".join(parts) or None
