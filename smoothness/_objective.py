"""The one place where a model, a loss and data become a function of the parameters: :func:`make_objective` turns
``data`` (one batch, or an iterable of batches walked chunk by chunk by :meth:`ChunkedObjective.chunks`, the one chunk
loop) into an :class:`Objective`, which never writes to the model, runs every evaluation with the estimators' fixed
seed and checks determinism at w. Details: docs/smoothness.md.
"""
from __future__ import annotations

import collections.abc
import contextlib
import math
from typing import Callable, Dict, Iterator, Mapping, Sequence, Tuple

import torch
from torch import nn
from torch.func import functional_call

from ._rng import check_deterministic, fixed_rng, is_checked

BN_MODES = ("batch", "running")
Params = Dict[str, torch.Tensor]

_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


class NonFiniteLossError(ValueError):
    """The loss at w is NaN or infinite (the model has diverged); no estimate is meaningful there."""


def check_bn_mode(bn_mode: str) -> str:
    if bn_mode not in BN_MODES:
        raise ValueError(f"unknown bn_mode {bn_mode!r}: use 'batch' (train-mode BatchNorm, batch statistics) "
                         f"or 'running' (eval-mode BatchNorm, running statistics)")
    return bn_mode


def trainable_parameters(model: nn.Module) -> Params:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("the model has no trainable parameters (none with requires_grad=True); "
                         "there is no loss landscape to measure")
    return params


def check_batch(batch) -> Tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError("batch must be a pair (inputs, targets)")
    inputs, targets = batch
    if not isinstance(inputs, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise TypeError(f"batch must hold two tensors, got ({type(inputs).__name__}, {type(targets).__name__})")
    if inputs.ndim == 0 or inputs.shape[0] == 0:
        raise ValueError("the batch is empty: inputs have no samples")
    if targets.ndim == 0 or targets.shape[0] != inputs.shape[0]:
        n_t = "a scalar" if targets.ndim == 0 else str(targets.shape[0])
        raise ValueError(f"inputs and targets differ in length: {inputs.shape[0]} inputs, {n_t} targets")
    return inputs, targets


@contextlib.contextmanager
def estimator_mode(model: nn.Module, bn_mode: str) -> Iterator[None]:
    """Put every module in the mode the estimate needs and restore each module's own flag afterwards.

    ``batch``: every module in train mode (BatchNorm uses batch statistics) except dropout layers, which are put in
    eval mode so that the loss is a deterministic function of the parameters. ``running``: everything in eval mode.
    """
    flags = [(m, m.training) for m in model.modules()]
    try:
        if bn_mode == "batch":
            for m in model.modules():
                m.training = not isinstance(m, _DROPOUT)
        else:
            for m in model.modules():
                m.training = False
        yield
    finally:
        for m, flag in flags:
            m.training = flag


class Objective:
    """L(w; B) for one model, loss and batch, as a function of the trainable parameters."""

    def __init__(self, model: nn.Module, loss_fn: Callable, batch, bn_mode: str = "batch"):
        self.model = model
        self.loss_fn = loss_fn
        self.bn_mode = check_bn_mode(bn_mode)
        self.params = trainable_parameters(model)
        self.inputs, self.targets = check_batch(batch)
        self.names = tuple(self.params)
        self.base = {n: p.detach() for n, p in self.params.items()}
        self._buffers = dict(model.named_buffers())
        self.n_params = sum(p.numel() for p in self.params.values())
        self._devices = {self.inputs.device, *(p.device for p in self.base.values())}
        self._at_w = None  # (loss, grad) at w, evaluated once

    @property
    def n_samples(self) -> int:
        """How many samples the loss averages over (the ``batch_size`` recorded with every result)."""
        return int(self.inputs.shape[0])

    def chunks(self) -> Iterator[Tuple[float, "Objective"]]:
        """(weight 1, itself): one batch is the one chunk of :meth:`ChunkedObjective.chunks`."""
        yield 1.0, self

    # -- evaluation -------------------------------------------------------------------------------------------
    def loss(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        self.ensure_checked()
        return self._loss(params)

    def ensure_checked(self) -> None:
        """Run the determinism check before the first estimate on this model (see check_deterministic)."""
        if self._at_w is None and not is_checked(self.model, self.bn_mode, self._devices):
            self.loss_and_grad_at_w()

    def outputs(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The model's outputs z = f(x; params) on the batch, in the objective's mode and with its fixed seed (no
        determinism check: callers run :meth:`ensure_checked` first)."""
        tensors = {**{n: b.clone() for n, b in self._buffers.items()}, **params}
        with fixed_rng(self._devices), estimator_mode(self.model, self.bn_mode):
            return functional_call(self.model, tensors, (self.inputs,))

    def _loss(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        tensors = {**{n: b.clone() for n, b in self._buffers.items()}, **params}
        with fixed_rng(self._devices), estimator_mode(self.model, self.bn_mode):
            outputs = functional_call(self.model, tensors, (self.inputs,))
            loss = self.loss_fn(outputs, self.targets)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise TypeError("loss_fn(outputs, targets) must return a scalar tensor (the mean loss)")
        return loss.reshape(())

    def leaves(self, shift: Mapping[str, torch.Tensor] | None = None, scale: float = 1.0) -> Params:
        """Fresh leaf tensors holding w (+ scale * shift), requiring grad."""
        if shift is None:
            return {n: p.clone().requires_grad_(True) for n, p in self.base.items()}
        with torch.no_grad():
            return {n: (p + scale * shift[n]).requires_grad_(True) for n, p in self.base.items()}

    def loss_and_grad(self, shift=None, scale: float = 1.0, *, check_finite: bool = False):
        """L and ∇L at w (+ scale * shift). At w itself (no shift) this is the determinism-checked evaluation."""
        if shift is None:
            return self.loss_and_grad_at_w()
        return self._loss_and_grad(shift, scale, check_finite)

    def _loss_and_grad(self, shift, scale: float, check_finite: bool):
        leaves = self.leaves(shift, scale)
        with torch.enable_grad():
            loss = self._loss(leaves)
            if check_finite:
                self.check_finite(loss)
            grads = torch.autograd.grad(loss, tuple(leaves.values()), allow_unused=True)
        grad = {n: (torch.zeros_like(leaves[n]) if g is None else g) for n, g in zip(self.names, grads)}
        return loss.detach(), grad

    def loss_and_grad_at_w(self):
        """(L(w), ∇L(w)), computed once per Objective; raises NonFiniteLossError if the loss is not finite and
        NondeterministicLossError if a second evaluation disagrees (see check_deterministic for when it runs)."""
        if self._at_w is None:
            first = self._loss_and_grad(None, 1.0, check_finite=True)
            check_deterministic(self.model, self.bn_mode, self._devices, first,
                                lambda: self._loss_and_grad(None, 1.0, check_finite=False))
            self._at_w = first
        return self._at_w

    @staticmethod
    def check_finite(loss: torch.Tensor) -> None:
        value = float(loss.detach())
        if not math.isfinite(value):
            raise NonFiniteLossError(f"the loss at w is not finite ({value}); the model has probably diverged, "
                             f"so smoothness estimates are meaningless here")

    # -- directions ---------------------------------------------------------------------------------------------
    def check_direction(self, direction, what: str = "direction", allow_zero: bool = False,
                        names: Sequence[str] | None = None) -> Params:
        """``direction`` checked and cast to the parameters' dtype and device; keyed by the trainable parameters,
        or by ``names`` (a block of them) when given."""
        block = names is not None and tuple(names) != self.names
        names = self.names if names is None else tuple(names)
        if not isinstance(direction, Mapping):
            raise TypeError(f"{what} must be a dict keyed like dict(model.named_parameters())"
                            f"{' restricted to params' if block else ''}, got {type(direction).__name__}")
        missing = [n for n in names if n not in direction]
        extra = [n for n in direction if n not in names]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing keys {missing}")
            if extra:
                parts.append(f"unexpected keys {extra} (only " + (f"the block's parameters {list(names)}" if block
                                                                  else "trainable parameters") + " are allowed)")
            raise ValueError(f"{what} does not match the " + ("parameter block" if block else
                                                                "model's trainable parameters") + ": "
                             + "; ".join(parts))
        out = {}
        for n in names:
            d = direction[n]
            if not isinstance(d, torch.Tensor):
                raise TypeError(f"{what}[{n!r}] must be a tensor, got {type(d).__name__}")
            if d.shape != self.base[n].shape:
                raise ValueError(f"{what}[{n!r}] has shape {tuple(d.shape)}, "
                                 f"the parameter has shape {tuple(self.base[n].shape)}")
            out[n] = d.detach().to(dtype=self.base[n].dtype, device=self.base[n].device)
        if not allow_zero and all(not torch.any(d != 0) for d in out.values()):
            raise ValueError(f"{what} is all zeros; give a non-zero {what}")
        if any(not torch.isfinite(d).all() for d in out.values()):
            raise ValueError(f"{what} holds non-finite values")
        return out


def norm(tensors: Mapping[str, torch.Tensor] | Sequence[torch.Tensor]) -> float:
    """The true l2 norm over all tensors together (not a sum of per-tensor norms)."""
    values = tensors.values() if isinstance(tensors, Mapping) else tensors
    return math.sqrt(sum(float(torch.sum(t.detach().double() ** 2)) for t in values))


def diff_norm(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(torch.sum((a[n].detach().double() - b[n].detach().double()) ** 2)) for n in a))


def dot(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    return sum(float(torch.sum(a[n].detach().double() * b[n].detach().double())) for n in a)


# -- many batches: the one chunk loop -------------------------------------------------------------------------------------
ChunkKind = Tuple[Tuple[Tuple[int, ...], torch.dtype], Tuple[Tuple[int, ...], torch.dtype]]


def chunk_kind(inputs: torch.Tensor, targets: torch.Tensor) -> ChunkKind:
    """The shapes and dtypes of a chunk's inputs and targets, what :func:`check_chunk` compares."""
    return (tuple(inputs.shape), inputs.dtype), (tuple(targets.shape), targets.dtype)


def check_chunk(i: int, chunk, first: ChunkKind | None = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Chunk ``i`` of an iterable of batches as ``(inputs, targets)``: a valid batch and, given chunk 0's
    :func:`chunk_kind`, one of the same kind: the same per-sample shapes and dtypes of inputs and of targets. Only the
    number of samples may differ (a last chunk is often smaller). The one check of chunks, for every estimator."""
    try:
        inputs, targets = check_batch(chunk)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"chunk {i} of the batches: {exc}") from None
    if first is None:
        return inputs, targets
    for what, mine, (shape, dtype) in (("inputs", inputs, first[0]), ("targets", targets, first[1])):
        if tuple(mine.shape[1:]) != shape[1:] or mine.dtype != dtype:
            raise ValueError(f"chunk {i} of the batches has {what} of shape {tuple(mine.shape)} and dtype "
                             f"{mine.dtype}, but chunk 0 has {what} of shape {shape} and dtype {dtype}; all chunks "
                             f"must share the per-sample shape and the dtype of their inputs and of their targets "
                             f"(only the number of samples may differ)")
    return inputs, targets


class ChunkedObjective:
    """L(w) = Σ_c n_c·L(w; B_c) / Σ_c n_c over a re-iterable collection of chunks B_c (a list or a DataLoader).

    Each L(w; B_c) is the mean loss of chunk c, so L is the mean loss over all samples when no module couples the
    samples of a chunk. In ``batch`` BN mode each chunk is normalised with its own batch statistics: L is then the
    expected loss that SGD with batches of that size sees, not the loss of one giant batch (see METHODS.md §4).

    Nothing but one chunk is held at a time: :meth:`chunks` walks the iterable again on every call, moving each
    chunk to the parameters' device, so the data can stay on the host (or on disk behind a DataLoader). Every walk
    must give the same chunks (a DataLoader with ``shuffle=True`` or random augmentation does not), because an
    operator whose matrix changes between products breaks every Krylov method; this is checked with a cheap
    fingerprint of each chunk (size and sums of inputs and targets).
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, batches, bn_mode: str = "batch"):
        check_bn_mode(bn_mode)
        trainable_parameters(model)  # the model's errors come before the data's
        if isinstance(batches, (torch.Tensor, str, bytes, Mapping)) or not hasattr(batches, "__iter__"):
            raise TypeError(f"data must be a pair (inputs, targets) or an iterable of such pairs (a list or a "
                            f"DataLoader), got {type(batches).__name__}")
        if isinstance(batches, collections.abc.Iterator):
            raise TypeError(f"data is a one-shot iterator ({type(batches).__name__}); estimators walk the chunks "
                            f"more than once (once per product or point), so pass a list or a DataLoader instead")
        self.model, self.loss_fn, self.bn_mode, self.batches = model, loss_fn, bn_mode, batches
        self.device = next(iter(trainable_parameters(model).values())).device
        self._fingerprints: list = []
        self._kind: ChunkKind | None = None   # chunk 0's shapes and dtypes, which every chunk must share
        self.first: Objective | None = None
        for i, chunk in enumerate(batches):
            inputs, targets = self._check(i, chunk)
            self._kind = self._kind or chunk_kind(inputs, targets)
            self._fingerprints.append(self._fingerprint(inputs, targets))
            if self.first is None:
                self.first = Objective(model, loss_fn, (inputs.to(self.device), targets.to(self.device)), bn_mode)
        if self.first is None:
            raise ValueError("the iterable of batches is empty: give at least one (inputs, targets) pair")
        self.sizes = tuple(fp[0] for fp in self._fingerprints)
        self.n_samples = sum(self.sizes)
        # parameters, directions and leaves are those of any chunk's objective
        self.params, self.names, self.base = self.first.params, self.first.names, self.first.base
        self.n_params = self.first.n_params
        self.check_direction = self.first.check_direction
        self.leaves = self.first.leaves
        self.check_finite = self.first.check_finite

    def _check(self, i: int, chunk) -> Tuple[torch.Tensor, torch.Tensor]:
        return check_chunk(i, chunk, self._kind)

    @staticmethod
    def _fingerprint(inputs: torch.Tensor, targets: torch.Tensor) -> tuple:
        return (int(inputs.shape[0]), (tuple(inputs.shape[1:]), tuple(targets.shape[1:])),
                float(inputs.detach().double().sum()), float(targets.detach().double().sum()))

    def chunks(self) -> Iterator[Tuple[float, Objective]]:
        """(n_c / N, the objective of chunk c) for every chunk, one at a time."""
        count = 0
        for i, chunk in enumerate(self.batches):
            inputs, targets = self._check(i, chunk)
            if i >= len(self._fingerprints) or self._fingerprint(inputs, targets) != self._fingerprints[i]:
                raise ValueError(f"the batches changed between two passes (chunk {i} differs); estimators over "
                                 f"chunks need the same chunks on every pass: use a list, or a DataLoader with "
                                 f"shuffle=False and no random transforms")
            count += 1
            yield (self.sizes[i] / self.n_samples,
                   Objective(self.model, self.loss_fn, (inputs.to(self.device), targets.to(self.device)),
                             self.bn_mode))
        if count != len(self._fingerprints):
            raise ValueError(f"the batches changed between two passes ({count} chunks instead of "
                             f"{len(self._fingerprints)}); estimators over chunks need the same chunks every pass")

    def loss_and_grad(self, shift=None, scale: float = 1.0, *, check_finite: bool = False):
        """The sample-weighted mean of the chunks' losses and gradients."""
        total, grad = 0.0, None
        for weight, objective in self.chunks():
            loss, g = objective.loss_and_grad(shift, scale, check_finite=check_finite)
            total += weight * float(loss)
            grad = ({n: weight * t for n, t in g.items()} if grad is None
                    else {n: grad[n] + weight * t for n, t in g.items()})
        return torch.tensor(total, dtype=torch.float64), grad


def is_one_batch(data) -> bool:
    """Whether ``data`` is one batch (a tensor pair ``(inputs, targets)``, or anything else that is not a collection
    of pairs, which :func:`check_batch` then rejects with the single-batch message) rather than an iterable of
    batches: the one rule every estimator's data goes by."""
    first = data[0] if isinstance(data, (tuple, list)) and data else None
    return isinstance(data, torch.Tensor) or (first is not None and not (
        isinstance(first, (tuple, list)) and any(isinstance(t, torch.Tensor) for t in first)))


def make_objective(model: nn.Module, loss_fn: Callable, data, bn_mode: str = "batch"):
    """The objective of ``data``: one batch (a tensor pair ``(inputs, targets)``, or anything else that is not a
    collection of pairs, which :func:`check_batch` then rejects with the single-batch message) or an iterable of
    batches (one chunk: that chunk's plain Objective). Every estimator's data goes through here."""
    if is_one_batch(data):
        return Objective(model, loss_fn, data, bn_mode)
    chunked = ChunkedObjective(model, loss_fn, data, bn_mode)
    return chunked.first if len(chunked.sizes) == 1 else chunked
