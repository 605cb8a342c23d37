"""Hessian-vector products, the one product all curvature code is built on: a retained double-backward graph (one
batch), ``torch.func.linearize`` of the gradient (one batch, many products on convolutional networks), or a
recomputation per chunk (an iterable of batches). Details: docs/smoothness.md.
"""
from __future__ import annotations

import warnings
from typing import Callable, Mapping

import torch
from torch import nn

from ._objective import ChunkedObjective, Objective, Params


class FlatOperator:
    """The parameter layout shared by the operators: dicts of tensors <-> one flat vector. ``product`` names how a
    product is computed (recorded in every curvature result as ``product``)."""

    product = ""

    def __init__(self, objective):
        self.objective = objective
        self.names = objective.names
        self.shapes = [objective.base[n].shape for n in self.names]
        self.numels = [objective.base[n].numel() for n in self.names]
        self.n = objective.n_params
        self.dtype = objective.base[self.names[0]].dtype
        self.device = objective.base[self.names[0]].device
        self.n_hvp = 0

    def flatten(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([tensors[n].reshape(-1) for n in self.names])

    def unflatten(self, flat: torch.Tensor) -> Params:
        parts = torch.split(flat, self.numels)
        return {n: t.reshape(s) for n, t, s in zip(self.names, parts, self.shapes)}

    def matvec(self, flat: torch.Tensor) -> torch.Tensor:
        return self.flatten(self.matvec_dict(self.unflatten(flat)))


class HessianOperator(FlatOperator):
    """H = ∇²L(w; B) as a linear map on flat vectors (and on parameter dicts)."""

    product = "double-backward"

    def __init__(self, objective: Objective):
        super().__init__(objective)
        leaves = objective.leaves()
        self._leaves = tuple(leaves.values())
        with torch.enable_grad():
            loss = objective.loss(leaves)
            objective.check_finite(loss)
            grads = torch.autograd.grad(loss, self._leaves, create_graph=True, allow_unused=True)
        self.loss = float(loss.detach())
        # a parameter the loss does not use has zero gradient and zero curvature
        self._used = [g is not None and g.requires_grad for g in grads]
        self._grads = tuple(g for g, u in zip(grads, self._used) if u)
        self._used_leaves = tuple(p for p, u in zip(self._leaves, self._used) if u)
        self.gradient = {n: (g.detach() if g is not None else torch.zeros_like(p))
                         for n, g, p in zip(self.names, grads, self._leaves)}

    def matvec_dict(self, vector: Mapping[str, torch.Tensor]) -> Params:
        self.n_hvp += 1
        if not self._grads:
            return {n: torch.zeros_like(vector[n]) for n in self.names}
        grad_outputs = tuple(vector[n] for n, u in zip(self.names, self._used) if u)
        with torch.enable_grad():
            hv = torch.autograd.grad(self._grads, self._used_leaves, grad_outputs=grad_outputs,
                                     retain_graph=True, allow_unused=True)
        hv_iter = iter(hv)
        out = {}
        for n, u, p in zip(self.names, self._used, self._leaves):
            h = next(hv_iter) if u else None
            out[n] = torch.zeros_like(p) if h is None else h.detach()
        return out


class LinearizedHessianOperator(FlatOperator):
    """H = ∇²L(w; B) through ``torch.func.linearize(∇L, w)``: one trace, then tangent-only products.

    Raises whatever ``torch.func`` raises for a model it cannot trace (data-dependent Python control flow,
    ``.item()`` in the forward, in-place writes to captured tensors); :func:`hessian_operator` then falls back
    to :class:`HessianOperator`.
    """

    product = "linearize"

    def __init__(self, objective: Objective):
        super().__init__(objective)
        base = {n: objective.base[n] for n in self.names}
        with warnings.catch_warnings():  # torch.fx's const folding and make_fx warn about their own internals
            warnings.simplefilter("ignore")
            (grad, loss), self._jvp = torch.func.linearize(torch.func.grad_and_value(objective.loss), base)
        objective.check_finite(loss)
        self.loss = float(loss.detach())
        self.gradient = {n: grad[n].detach() for n in self.names}

    def matvec_dict(self, vector: Mapping[str, torch.Tensor]) -> Params:
        self.n_hvp += 1
        hv, _ = self._jvp({n: vector[n] for n in self.names})
        return {n: hv[n].detach() for n in self.names}


class ChunkedOperator(FlatOperator):
    """M = Σ_c (n_c/N)·M(w; B_c) over the chunks of a :class:`ChunkedObjective`, one chunk's graph at a time, for
    the one-batch operator class ``chunk_operator`` (the Hessian here; the GGN and empirical Fisher subclass it)."""

    chunk_operator: Callable[[Objective], FlatOperator]

    @property
    def product(self) -> str:
        one = self.chunk_operator
        return f"{getattr(one, 'func', one).product} per chunk"   # func: a functools.partial of the class

    def __init__(self, objective: ChunkedObjective):
        super().__init__(objective)
        loss, grad = objective.loss_and_grad(check_finite=True)
        self.loss = float(loss)
        self.gradient = grad

    def matvec_dict(self, vector: Mapping[str, torch.Tensor]) -> Params:
        self.n_hvp += 1
        out = None
        for weight, chunk in self.objective.chunks():
            hv = self.chunk_operator(chunk).matvec_dict(vector)  # the chunk's graph is freed when the operator goes
            out = ({n: weight * t for n, t in hv.items()} if out is None
                   else {n: out[n] + weight * t for n, t in hv.items()})
        return out


class ChunkedHessianOperator(ChunkedOperator):
    """H = Σ_c (n_c/N)·∇²L(w; B_c) over the chunks of a :class:`ChunkedObjective`."""

    chunk_operator = HessianOperator


# Linearize when (convolution FLOPs of one forward pass, as torch's FlopCounterMode counts them) x (expected products)
# reaches this, per device type: the break-even of the one-off trace against the cheaper products, measured on CPU
# (benchmarks/results/density-products.md, products.md). A device type without a measurement keeps the double
# backward. Results record which ran (``product``).
LINEARIZE_MIN_CONV_FLOPS = {"cpu": 7e10}


def _conv_flops(objective: Objective) -> float:
    """Convolution FLOPs of one forward pass on the objective's batch (0 without convolution modules)."""
    if not any(isinstance(m, nn.modules.conv._ConvNd) for m in objective.model.modules()):
        return 0.0
    from torch.utils.flop_counter import FlopCounterMode
    objective.ensure_checked()   # the first use of a model runs the determinism check (passes not to be counted)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        objective.loss(objective.base)
    return float(sum(count for op, count in counter.get_flop_counts().get("Global", {}).items()
                     if "convolution" in str(op)))


def hessian_operator(objective, *, products: int = 0) -> FlatOperator:
    """The operator for ``objective``: chunked for an iterable of batches; for one batch, linearized when about
    ``products`` products will be taken and their convolution work makes the trace pay on this device type (by the
    measured ``LINEARIZE_MIN_CONV_FLOPS``; and the model can be traced), else a retained graph. The choice depends
    only on the device type, the model and the batch shape, never on timings of this call, so results are
    reproducible; the operator's ``product`` names it."""
    if isinstance(objective, ChunkedObjective):
        return ChunkedHessianOperator(objective)
    threshold = LINEARIZE_MIN_CONV_FLOPS.get(objective.inputs.device.type)
    if products and threshold is not None and _conv_flops(objective) * products >= threshold:
        try:
            return LinearizedHessianOperator(objective)
        except Exception:  # noqa: BLE001 -- an untraceable model still has a Hessian: take the general route
            pass
    return HessianOperator(objective)
