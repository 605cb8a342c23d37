"""Argument checks and defaults shared by the estimators: counts, positive numbers, generators, renamed keywords."""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch

from ._rng import ESTIMATOR_SEED


def generator_or_default(generator: Optional[torch.Generator]) -> torch.Generator:
    """``generator``, or by default a fresh CPU generator seeded with ``ESTIMATOR_SEED`` (every estimator's default,
    so results are deterministic)."""
    if generator is None:
        return torch.Generator().manual_seed(ESTIMATOR_SEED)
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator (e.g. torch.Generator().manual_seed(0)) or None, "
                        f"got {type(generator).__name__}")
    return generator


def check_positive(name: str, value, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    ok = value >= 0 if allow_zero else value > 0
    if not (ok and math.isfinite(value)):
        raise ValueError(f"{name} must be {'non-negative' if allow_zero else 'positive'} and finite, got {value}")
    return float(value)


def check_count(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def renamed(new_name: str, new_value, old_name: str, old_value, function: str):
    """The value of a keyword renamed from ``old_name`` to ``new_name``: the old one still works, with a warning."""
    if old_value is None:
        return new_value
    warnings.warn(f"{function}: {old_name}= is deprecated, use {new_name}= (the same number)", FutureWarning,
                  stacklevel=3)
    return old_value
