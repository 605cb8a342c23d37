"""What is measured along training, on which batch, in which BatchNorm mode: each function returns records
(flat dicts, schema in results/README.md) and calls only the `smoothness` estimators for the measurements."""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, List, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

import smoothness

# Eval mode makes chunking exact (no batch statistics) and bounds memory. On CPU, small chunks with the conv
# weights in channels_last (NHWC) layout run oneDNN's fast path: evaluating 16,000 FashionMNIST images took 1.6 s
# instead of 5.3 s (chunk 2000, NCHW) on one core, and evaluation was 35% of a default run (issue 11 §6;
# benchmarks/results/training.md). GPUs keep large chunks, and every layout change is undone before returning.
EVAL_CHUNK = {"cpu": 256, "other": 2000}


def probe_record(model: nn.Module, batch, step_sizes, bn_mode: str, *, direction: Optional[Mapping] = None,
                 loss_fn: Callable = F.cross_entropy) -> Dict:
    """Santurkar's Fig. 4 measures on the step's own batch, along d = −g (``direction`` None) or along the given
    ``direction``: the optimizer's own step divided by its learning rate, so that the step sizes stay multiples of
    η and s = η is the step actually taken (for plain SGD the two coincide)."""
    p = smoothness.line_probe(model, loss_fn, batch, step_sizes, direction=direction, bn_mode=bn_mode)
    lo, hi = p.loss_range
    glo, ghi = p.grad_diff_range
    # the direction is named only when it is not Santurkar's −g, so plain-SGD records stay as they always were
    extra = {} if direction is None else {"direction": "update"}
    return {"kind": "probe", "bn_mode": bn_mode, **extra, "base_loss": p.base_loss, "grad_norm": p.grad_norm,
            "loss_min": lo, "loss_max": hi, "grad_pred_min": glo, "grad_pred_max": ghi,
            "effective_beta": p.effective_beta, "step_sizes": list(p.step_sizes), "losses": list(p.losses),
            "grad_diff_norms": list(p.grad_diff_norms)}


@torch.no_grad()
def _loss_and_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable = F.cross_entropy):
    total_loss, correct = 0.0, 0
    chunk = EVAL_CHUNK["cpu" if x.device.type == "cpu" else "other"]
    with _channels_last_on_cpu(model, x.device):
        for i in range(0, x.shape[0], chunk):
            out = model(x[i:i + chunk])
            total_loss += float(loss_fn(out, y[i:i + chunk], reduction="sum"))
            correct += int((out.argmax(1) == y[i:i + chunk]).sum())
    return total_loss / x.shape[0], correct / x.shape[0]


@contextlib.contextmanager
def _channels_last_on_cpu(model: nn.Module, device: torch.device):
    """4-D parameters in channels_last layout for the block (CPU only), restored bit for bit afterwards.

    The parameters keep their identity (``param.data`` is swapped), so an optimizer holding them is unaffected;
    values are copied, never recomputed."""
    convs = [p for p in model.parameters() if p.ndim == 4] if device.type == "cpu" else []
    saved = [p.data for p in convs]
    for p in convs:
        p.data = p.data.contiguous(memory_format=torch.channels_last)
    try:
        yield
    finally:
        for p, data in zip(convs, saved):
            p.data = data


def eval_record(model: nn.Module, data, loss_fn: Callable = F.cross_entropy) -> Dict:
    """Train and test loss/accuracy in eval mode (running statistics), as the seed's compute_logs does."""
    was_training = model.training
    model.eval()
    try:
        train_loss, train_acc = _loss_and_accuracy(model, data.x_train, data.y_train, loss_fn)
        test_loss, test_acc = _loss_and_accuracy(model, data.x_test, data.y_test, loss_fn)
    finally:
        model.train(was_training)
    return {"kind": "eval", "bn_mode": "running", "train_loss": train_loss, "train_accuracy": train_acc,
            "test_loss": test_loss, "test_accuracy": test_acc}


def local_smoothness(model: nn.Module, minibatch, full_batch, lr: float, loss_fn: Callable = F.cross_entropy) -> float:
    """Seed 003's measure with the true l2 norm: u = -lr * (minibatch gradient), then
    ||grad f(w + u) - grad f(w)|| / ||u|| with f the train-mode loss on the whole ``full_batch``."""
    _, grad = smoothness.loss_and_gradient(model, loss_fn, minibatch, bn_mode="batch")
    step = {n: -lr * g for n, g in grad.items()}
    return smoothness.local_lipschitz(model, loss_fn, full_batch, step, bn_mode="batch")


# Curvature over more images than this is taken in chunks (smoothness' iterables of batches): memory is one chunk's
# graph whatever the sample (issue 12 §3). Only for networks without batch statistics: with BatchNorm in train
# mode a chunk's loss is normalised by that chunk's statistics, a different loss from the one-batch loss that
# full-batch GD descends (and whose forward pass the training step already holds in memory).
SHARPNESS_CHUNK = 1000


def batch_coupled(model: nn.Module) -> bool:
    """Whether the model's train-mode output for one sample depends on the other samples of the batch."""
    from experiments.norms import BatchNorm, FunctionalBatchNorm
    return any(isinstance(m, (nn.modules.batchnorm._BatchNorm, BatchNorm, FunctionalBatchNorm))
               for m in model.modules())


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
