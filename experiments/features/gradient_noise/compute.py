"""The ``gradient_noise`` records: `smoothness.gradient_noise` and `smoothness.step_quality` on a fixed sample cut
into minibatches of the run's batch size, one record per unit (minibatch or example)."""
from __future__ import annotations

from typing import Callable, Dict, List, Mapping, Sequence, Tuple

import torch
from torch import nn

import smoothness
from experiments.normalization import batch_coupled

KIND = {"batch": "gradient_noise", "example": "gradient_noise_example"}
#: bin edges of the recorded histogram of per-unit gradient entries (Cockpit's 1-D histogram): 100 bins on [-2, 2]
EDGES = tuple(float(e) for e in torch.linspace(-2.0, 2.0, 101))


def fixed_minibatches(x: torch.Tensor, y: torch.Tensor, order: torch.Tensor, n_batches: int,
                      batch_size: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """The first ``n_batches`` × ``batch_size`` images of the run's fixed permutation, as that many minibatches
    (fewer when the training subset is smaller). A subset smaller than two minibatches is cut into two halves: the
    records' ``unit_size`` says which size the units had."""
    if len(order) < 2:
        raise ValueError("the gradient-noise sample needs at least two training images")
    n_batches = min(n_batches, len(order) // batch_size)
    if n_batches < 2:
        n_batches, batch_size = 2, len(order) // 2
    idx = order[:n_batches * batch_size]
    return [(x[idx[i * batch_size:(i + 1) * batch_size]], y[idx[i * batch_size:(i + 1) * batch_size]])
            for i in range(n_batches)]


def units_for(model: nn.Module, choice: str) -> Tuple[str, ...]:
    """The units ``--gradient-noise-unit`` asks for on this network (module docstring of ``measurement``)."""
    coupled = batch_coupled(model)
    if choice == "example" and coupled:
        raise ValueError("--gradient-noise-unit example: per-example gradients are not defined for a network with "
                          "BatchNorm in batch mode (its examples are coupled); use --gradient-noise-unit batch, or "
                          "auto")
    if choice == "auto":
        return ("batch",) if coupled else ("example",)
    if choice == "both":
        return ("batch",) if coupled else ("batch", "example")
    return (choice,)


def records(model: nn.Module, loss_fn: Callable, batches: Sequence, units: Sequence[str],
            step: Mapping[str, torch.Tensor]) -> List[Dict]:
    """One record per unit: the noise statistics and the histogram of the per-unit gradient entries at the current
    weights, α along ``step`` (the update about to be made) and, for example units, the diagonal TIC (centred, GGN
    diagonal); all on ``batches``, BatchNorm in batch mode (the loss SGD descends)."""
    out = []
    for unit in units:
        noise = smoothness.gradient_noise(model, loss_fn, batches, unit=unit, bn_mode="batch", edges=EDGES)
        quality = smoothness.step_quality(model, loss_fn, batches, step, unit=unit, bn_mode="batch")
        tic = smoothness.tic(model, loss_fn, batches, bn_mode="batch") if unit == "example" else None
        hist = noise.histogram
        out.append({"kind": KIND[unit], "bn_mode": "batch", "n_units": noise.n_units, "unit_size": noise.batch_size,
                    "gradient_norm": noise.gradient_norm, "norm_test": noise.norm_test,
                    "inner_product_test": noise.inner_product_test, "orthogonality_test": noise.orthogonality_test,
                    "gsnr": noise.gsnr, "noise_scale": noise.noise_scale,
                    "signal_estimate": noise.gradient_norm ** 2 - noise.variance / noise.n_units,
                    "alpha": quality.alpha, "step_length": quality.step_length, "base_loss": noise.loss,
                    "tic_diag": None if tic is None else tic.tic_diag,
                    "tic_trace": None if tic is None else tic.tic_trace,
                    "histogram_low": EDGES[0], "histogram_high": EDGES[-1], "histogram_below": hist.below,
                    "histogram_above": hist.above, "histogram_counts": [int(c) for c in hist.counts]})
    return out
