"""What is measured along training, on which batch, in which BatchNorm mode: each function returns records
(flat dicts, schema in results/README.md) and calls only the `smoothness` estimators for the measurements."""
from __future__ import annotations

from typing import Callable, Dict, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

import smoothness

EVAL_CHUNK = 2000  # eval mode makes chunking exact (no batch statistics), and it bounds memory


def probe_record(model: nn.Module, batch, step_sizes, bn_mode: str, *, direction: Optional[Mapping] = None,
                 loss_fn: Callable = F.cross_entropy) -> Dict:
    """Santurkar's Fig. 4 measures on the step's own batch, along d = −g (``direction`` None) or along the given
    ``direction``: the optimizer's own step divided by its learning rate, so that the step sizes stay multiples of
    η and s = η is the step actually taken (for plain SGD the two coincide)."""
    p = smoothness.line_probe(model, loss_fn, batch, step_sizes, direction=direction, bn_mode=bn_mode)
    lo, hi = p.loss_range
    glo, ghi = p.grad_diff_range
    return {"kind": "probe", "bn_mode": bn_mode, "direction": "gradient" if direction is None else "update",
            "base_loss": p.base_loss, "grad_norm": p.grad_norm,
            "loss_min": lo, "loss_max": hi, "grad_pred_min": glo, "grad_pred_max": ghi,
            "effective_beta": p.effective_beta, "step_sizes": list(p.step_sizes), "losses": list(p.losses),
            "grad_diff_norms": list(p.grad_diff_norms)}


@torch.no_grad()
def _loss_and_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable):
    total_loss, correct = 0.0, 0
    for i in range(0, x.shape[0], EVAL_CHUNK):
        out = model(x[i:i + EVAL_CHUNK])
        total_loss += float(loss_fn(out, y[i:i + EVAL_CHUNK], reduction="sum"))
        correct += int((out.argmax(1) == y[i:i + EVAL_CHUNK]).sum())
    return total_loss / x.shape[0], correct / x.shape[0]


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


def sharpness(model: nn.Module, batch, tol: float, loss_fn: Callable = F.cross_entropy) -> smoothness.EigenResult:
    """Top eigenvalue of the train-mode (batch-statistics) Hessian: the curvature SGD sees (edge of stability)."""
    return smoothness.top_eigenvalues(model, loss_fn, batch, k=1, tol=tol, bn_mode="batch")


def sharpness_record(model: nn.Module, batch, tol: float, *, threshold: float, lr: float,
                     preconditioner: Optional[Mapping] = None, loss_fn: Callable = F.cross_entropy) -> Dict:
    """The step-wise sharpness (``--sharpness-every``) with the optimizer's stability threshold at this step's
    learning rate; for Adam also λ_max(P⁻¹H) with the preconditioner P of the step about to be taken."""
    eig = sharpness(model, batch, tol, loss_fn)
    rec = {"kind": "sharpness", "bn_mode": "batch", "sharpness": eig.values[0], "sharpness_n_hvp": eig.n_hvp,
           "samples": eig.batch_size, "lr": lr, "stability_threshold": threshold}
    if preconditioner is not None:
        pre = smoothness.preconditioned_top_eigenvalues(model, loss_fn, batch, preconditioner, tol=tol,
                                                        bn_mode="batch")
        rec.update(preconditioned_sharpness=pre.values[0], preconditioned_n_hvp=pre.n_hvp)
    return rec
