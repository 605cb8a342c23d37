"""What is measured along training, on which batch, in which BatchNorm mode: each function returns records
(flat dicts, schema in results/README.md) and calls only the `smoothness` estimators for the measurements."""
from __future__ import annotations

import contextlib
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn

import smoothness

# Eval mode makes chunking exact (no batch statistics) and bounds memory. On CPU, small chunks with the conv
# weights in channels_last (NHWC) layout run oneDNN's fast path: evaluating 16,000 FashionMNIST images took 1.6 s
# instead of 5.3 s (chunk 2000, NCHW) on one core, and evaluation was 35% of a default run (issue 11 §6;
# benchmarks/results/training.md). GPUs keep large chunks, and every layout change is undone before returning.
EVAL_CHUNK = {"cpu": 256, "other": 2000}


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
    chunk = EVAL_CHUNK["cpu" if x.device.type == "cpu" else "other"]
    with _channels_last_on_cpu(model, x.device):
        for i in range(0, x.shape[0], chunk):
            out = model(x[i:i + chunk])
            total_loss += float(F.cross_entropy(out, y[i:i + chunk], reduction="sum"))
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
