"""Hessian-vector products: the one product all curvature code is built on.

``HessianOperator`` runs the forward pass and the first backward pass once (with ``create_graph=True``) and then
answers every product H·v with one more backward pass through that graph, the way a Krylov method needs it.
"""
from __future__ import annotations

from typing import Callable, Dict, Mapping

import torch
from torch import nn

from ._objective import Objective, Params


class HessianOperator:
    """H = ∇²L(w; B) as a linear map on flat vectors (and on parameter dicts)."""

    def __init__(self, objective: Objective):
        self.objective = objective
        self.names = objective.names
        self.shapes = [objective.base[n].shape for n in self.names]
        self.numels = [objective.base[n].numel() for n in self.names]
        self.n = objective.n_params
        self.dtype = objective.base[self.names[0]].dtype
        self.device = objective.base[self.names[0]].device
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
        self.n_hvp = 0

    def flatten(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([tensors[n].reshape(-1) for n in self.names])

    def unflatten(self, flat: torch.Tensor) -> Params:
        parts = torch.split(flat, self.numels)
        return {n: t.reshape(s) for n, t, s in zip(self.names, parts, self.shapes)}

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

    def matvec(self, flat: torch.Tensor) -> torch.Tensor:
        return self.flatten(self.matvec_dict(self.unflatten(flat)))


def hvp(model: nn.Module, loss_fn: Callable, batch, vector: Mapping[str, torch.Tensor], *,
        bn_mode: str = "batch") -> Dict[str, torch.Tensor]:
    """The exact Hessian-vector product H·v with H = ∇²_w L(w; B), by double backpropagation.

    ``vector`` and the result are dicts keyed like ``dict(model.named_parameters())`` (trainable parameters only).
    The model is left exactly as it was (parameters, buffers, train/eval flags, ``.grad``).
    """
    objective = Objective(model, loss_fn, batch, bn_mode)
    v = objective.check_direction(vector, "vector", allow_zero=True)
    return HessianOperator(objective).matvec_dict(v)
