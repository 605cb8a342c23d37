"""The ``eval`` record: training and test loss and accuracy in eval mode (running BatchNorm statistics)."""
from __future__ import annotations

import contextlib
from typing import Callable, Dict

import torch
import torch.nn.functional as F
from torch import nn


# Eval mode makes chunking exact (no batch statistics) and bounds memory. On CPU, small chunks with the conv weights
# in channels_last (NHWC) layout run oneDNN's fast path (benchmarks/results/training.md); GPUs keep large chunks, and
# every layout change is undone before returning.
EVAL_CHUNK = {"cpu": 256, "other": 2000}


@torch.no_grad()
def loss_and_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable = F.cross_entropy):
    total_loss, correct = 0.0, 0
    chunk = EVAL_CHUNK["cpu" if x.device.type == "cpu" else "other"]
    with channels_last_on_cpu(model, x.device):
        for i in range(0, x.shape[0], chunk):
            out = model(x[i:i + chunk])
            total_loss += float(loss_fn(out, y[i:i + chunk], reduction="sum"))
            correct += int((out.argmax(1) == y[i:i + chunk]).sum())
    return total_loss / x.shape[0], correct / x.shape[0]


@contextlib.contextmanager
def channels_last_on_cpu(model: nn.Module, device: torch.device):
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
        train_loss, train_acc = loss_and_accuracy(model, data.x_train, data.y_train, loss_fn)
        test_loss, test_acc = loss_and_accuracy(model, data.x_test, data.y_test, loss_fn)
    finally:
        model.train(was_training)
    return {"kind": "eval", "bn_mode": "running", "train_loss": train_loss, "train_accuracy": train_acc,
            "test_loss": test_loss, "test_accuracy": test_acc}
