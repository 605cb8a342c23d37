"""The generalised Gauss-Newton matrix G = Jᵀ ∇²_z L J as a linear operator: Gv = Jᵀ(∇²_z L (Jv)) by one jvp and one vjp
per product (J never formed). PSD for a loss convex in z; the Fisher for softmax cross-entropy. Details (BatchNorm,
chunks): docs/smoothness.md.
"""
from __future__ import annotations

from typing import Mapping

import torch

from ._objective import Objective, Params
from .hvp import ChunkedOperator, FlatOperator


class GGNOperator(FlatOperator):
    """G = Jᵀ ∇²_z L J for one batch (see the module docstring); ``.loss`` and ``.gradient`` are L and ∇L at w."""

    product = "jvp + vjp"

    def __init__(self, objective: Objective):
        super().__init__(objective)
        objective.ensure_checked()
        self._w = {n: objective.base[n] for n in self.names}
        with torch.enable_grad():
            z, self._vjp = torch.func.vjp(objective.outputs, self._w)
            self._z = z.detach().requires_grad_(True)
            loss = objective.loss_fn(self._z, objective.targets)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise TypeError("loss_fn(outputs, targets) must return a scalar tensor (the mean loss)")
            objective.check_finite(loss)
            (self._grad_z,) = torch.autograd.grad(loss.reshape(()), self._z, create_graph=True)
        self.loss = float(loss.detach())
        self._gradient = None

    @property
    def gradient(self) -> Params:
        """∇L(w) = Jᵀ ∇_z L, from the retained vjp (no extra forward pass)."""
        if self._gradient is None:
            (g,) = self._vjp(self._grad_z.detach())
            self._gradient = {n: g[n].detach() for n in self.names}
        return self._gradient

    def matvec_dict(self, vector: Mapping[str, torch.Tensor]) -> Params:
        self.n_hvp += 1
        _, jv = torch.func.jvp(self.objective.outputs, (self._w,), ({n: vector[n] for n in self.names},))
        if self._grad_z.requires_grad:  # a loss linear in z has no curvature in z
            (hjv,) = torch.autograd.grad(self._grad_z, self._z, jv.detach(), retain_graph=True)
        else:
            hjv = torch.zeros_like(self._z)
        (gv,) = self._vjp(hjv.detach())
        return {n: gv[n].detach() for n in self.names}


class ChunkedGGNOperator(ChunkedOperator):
    """G = Σ_c (n_c/N)·G(w; B_c) over the chunks of a :class:`~smoothness._objective.ChunkedObjective`."""

    chunk_operator = GGNOperator
