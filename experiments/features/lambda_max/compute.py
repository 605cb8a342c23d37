"""The step-wise sharpness record (λ_max of the train-mode Hessian on a fixed sample) and its warm start."""
from __future__ import annotations

from typing import Callable, Dict, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

import smoothness

from experiments.normalization import batch_coupled

# Curvature over more images than this is taken in chunks (smoothness' iterables of batches): memory is one chunk's
# graph whatever the sample. Only for networks without batch statistics: with BatchNorm in train
# mode a chunk's loss is normalised by that chunk's statistics, a different loss from the one-batch loss that
# full-batch GD descends (and whose forward pass the training step already holds in memory).
SHARPNESS_CHUNK = 1000


def sharpness_batch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = SHARPNESS_CHUNK):
    """The sharpness sample as one batch, or as a list of chunks of at most ``chunk`` images when it is larger and
    chunking leaves the loss unchanged (no batch statistics)."""
    if x.shape[0] <= chunk or batch_coupled(model):
        return x, y
    return [(x[i:i + chunk], y[i:i + chunk]) for i in range(0, x.shape[0], chunk)]


class WarmStart:
    """The top eigenvectors of the last sharpness measurement, to start the next one from (``--sharpness-start
    warm``). Along training they move slowly, so Lanczos from them converges in fewer products
    (benchmarks/results/sharpness_warm.md).

    A warm measurement asks for the top ``K`` = 2 eigenvalues from the previous top 2 vectors (its first one, with
    nothing to start from, is cold, also with k = 2) and records the largest. Why not the top one from the previous
    top vector alone: that vector is (nearly) an eigenvector, so Lanczos from it certifies *its* eigenvalue at once
    (residual ≈ 0) even when another eigenvalue has overtaken it, and a random guard row in the block does not help
    because the stopping rule looks only at the wanted value. At the edge of stability the top eigenvalues take
    turns, and the one-vector warm start returned the second one, up to 5% below the sharpness a cold start found
    (benchmarks/results/sharpness_warm.md). Asking for two keeps Lanczos going until the second is resolved too, so a
    swap of the top two is caught (tests/experiments/test_tracking.py::test_warm_start_survives_a_swap_of_the_top_two);
    a jump of a third eigenvalue past both would still be missed, as it can be by a cold start's random vector. The
    state goes into checkpoints, so a resumed run starts its next measurement from the same vectors."""

    K = 2

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.vectors: Optional[torch.Tensor] = None

    @property
    def k(self) -> int:
        return self.K if self.enabled else 1

    def start(self):
        return self.vectors if self.enabled else None

    def update(self, result: smoothness.EigenResult) -> None:
        if self.enabled and result.vectors is not None:
            self.vectors = result.vectors[:self.K].detach().clone()

    def get_state(self):
        return None if self.vectors is None else self.vectors.cpu()

    def set_state(self, state) -> None:
        self.vectors = None if state is None or not self.enabled else state


def sharpness(model: nn.Module, batch, tol: float, loss_fn: Callable = F.cross_entropy,
              warm: Optional[WarmStart] = None) -> smoothness.EigenResult:
    """Top eigenvalue of the train-mode (batch-statistics) Hessian: the curvature SGD sees (edge of stability).
    ``batch`` may be a list of chunks (see :func:`sharpness_batch`); ``warm`` starts from the last vector."""
    start, k = (None, 1) if warm is None else (warm.start(), warm.k)
    eig = smoothness.top_eigenvalues(model, loss_fn, batch, k=k, tol=tol, bn_mode="batch", start=start)
    if warm is not None:
        warm.update(eig)
    return eig


def sharpness_record(model: nn.Module, batch, tol: float, *, threshold: float, lr: float,
                     preconditioner: Optional[Mapping] = None, loss_fn: Callable = F.cross_entropy,
                     warm: Optional[WarmStart] = None) -> Dict:
    """The step-wise sharpness (``--sharpness-every``) with the optimizer's stability threshold at this step's
    learning rate; for Adam also λ_max(P⁻¹H) with the preconditioner P of the step about to be taken."""
    eig = sharpness(model, batch, tol, loss_fn, warm)
    rec = {"kind": "sharpness", "bn_mode": "batch", "sharpness": eig.values[0], "sharpness_n_hvp": eig.n_hvp,
           "samples": eig.batch_size, "lr": lr, "stability_threshold": threshold}
    if preconditioner is not None:
        pre = smoothness.preconditioned_top_eigenvalues(model, loss_fn, batch, preconditioner, tol=tol,
                                                        bn_mode="batch")
        rec.update(preconditioned_sharpness=pre.values[0], preconditioned_n_hvp=pre.n_hvp)
    return rec
