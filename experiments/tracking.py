"""What is measured along training, on which batch, in which BatchNorm mode: each function returns records
(flat dicts, schema in results/README.md) and calls only the `smoothness` estimators for the measurements."""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn

import smoothness

EVAL_CHUNK = 2000  # eval mode makes chunking exact (no batch statistics), and it bounds memory


def probe_record(model: nn.Module, batch, step_sizes, bn_mode: str) -> Dict:
    """Santurkar's Fig. 4 measures on the step's own batch, along d = -g."""
    p = smoothness.line_probe(model, F.cross_entropy, batch, step_sizes, bn_mode=bn_mode)
    lo, hi = p.loss_range
    glo, ghi = p.grad_diff_range
    return {"kind": "probe", "bn_mode": bn_mode, "base_loss": p.base_loss, "grad_norm": p.grad_norm,
            "loss_min": lo, "loss_max": hi, "grad_pred_min": glo, "grad_pred_max": ghi,
            "effective_beta": p.effective_beta, "step_sizes": list(p.step_sizes), "losses": list(p.losses),
            "grad_diff_norms": list(p.grad_diff_norms)}


@torch.no_grad()
def _loss_and_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    total_loss, correct = 0.0, 0
    for i in range(0, x.shape[0], EVAL_CHUNK):
        out = model(x[i:i + EVAL_CHUNK])
        total_loss += float(F.cross_entropy(out, y[i:i + EVAL_CHUNK], reduction="sum"))
        correct += int((out.argmax(1) == y[i:i + EVAL_CHUNK]).sum())
    return total_loss / x.shape[0], correct / x.shape[0]


def eval_record(model: nn.Module, data) -> Dict:
    """Train and test loss/accuracy in eval mode (running statistics), as the seed's compute_logs does."""
    was_training = model.training
    model.eval()
    try:
        train_loss, train_acc = _loss_and_accuracy(model, data.x_train, data.y_train)
        test_loss, test_acc = _loss_and_accuracy(model, data.x_test, data.y_test)
    finally:
        model.train(was_training)
    return {"kind": "eval", "bn_mode": "running", "train_loss": train_loss, "train_accuracy": train_acc,
            "test_loss": test_loss, "test_accuracy": test_acc}


def local_smoothness(model: nn.Module, minibatch, full_batch, lr: float) -> float:
    """Seed 003's measure with the true l2 norm: u = -lr * (minibatch gradient), then
    ||grad f(w + u) - grad f(w)|| / ||u|| with f the train-mode loss on the whole ``full_batch``."""
    _, grad = smoothness.loss_and_gradient(model, F.cross_entropy, minibatch, bn_mode="batch")
    step = {n: -lr * g for n, g in grad.items()}
    return smoothness.local_lipschitz(model, F.cross_entropy, full_batch, step, bn_mode="batch")


def sharpness(model: nn.Module, batch, tol: float) -> smoothness.EigenResult:
    """Top eigenvalue of the train-mode (batch-statistics) Hessian: the curvature SGD sees (edge of stability)."""
    return smoothness.top_eigenvalues(model, F.cross_entropy, batch, k=1, tol=tol, bn_mode="batch")
