"""The generalised Gauss-Newton matrix (GGN) as a linear operator, by one jvp and one vjp per product.

For a mean-reduced loss L(w) = (1/N) Σᵢ ℓ(zᵢ, yᵢ) with outputs zᵢ = f(xᵢ; w) and Jᵢ = ∂zᵢ/∂w,

    G = (1/N) Σᵢ Jᵢᵀ ∇²_z ℓ(zᵢ, yᵢ) Jᵢ = Jᵀ ∇²_z L(z) J,

with J = ∂z/∂w the Jacobian of the whole batch's outputs: ∇²_z L is block-diagonal with blocks (1/N)∇²_z ℓᵢ when
every zᵢ depends on sample i alone. A product is Gv = Jᵀ(∇²_z L (Jv)): Jv by forward mode
(``torch.func.jvp`` through ``functional_call``), the loss Hessian in z by double backward through the loss alone
(exact for any loss: cross-entropy, MSE, …), and Jᵀu by the vjp of a forward pass kept from construction. Jᵢ is
never formed. G is the Hessian without the term Σ_c (∂ℓ/∂z_c)∇²_w z_c (METHODS.md §10), so it is positive
semi-definite whenever ℓ is convex in z; for softmax cross-entropy, ∇²_z ℓ = diag(p) − ppᵀ and G is the Fisher.

BatchNorm: in ``bn_mode="running"`` BN is an affine map and the formula above holds sample by sample. In
``bn_mode="batch"`` every output depends on the whole batch (through the batch statistics), so there are no
per-sample Jacobians: G is then Jᵀ ∇²_z L J with J the Jacobian of all N outputs with respect to w, which is what
this operator computes in both modes (the GGN of the train-mode loss as a function of w). Over chunks (an iterable
of batches), G = Σ_c (n_c/N) G_c, each chunk with its own batch statistics.

Cost per product (one batch): one forward pass with tangents (the jvp) and one backward pass through the retained
graph, about a gradient's worth (benchmarks/results/products.md).
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
