"""The empirical Fisher F̂ = (1/N) Σᵢ gᵢgᵢᵀ as a linear operator, from per-sample gradients gᵢ (``torch.func.vmap``);
a product is Gᵀ(Gv)/N. Refused for BatchNorm in ``bn_mode="batch"``, where per-sample gradients do not exist. Not a
curvature matrix in general (Kunstner et al. 2019). Details: docs/smoothness.md.
"""
from __future__ import annotations

import functools
from typing import Mapping

import torch
from torch import nn
from torch.func import functional_call

from ._objective import Objective, Params, estimator_mode
from ._rng import fixed_rng
from .hvp import ChunkedOperator, FlatOperator

# the per-sample gradients must average to the batch gradient to this relative accuracy (far above rounding)
_MEAN_RTOL = 1e-4


def check_per_sample(model: nn.Module, bn_mode: str) -> None:
    """Refuse the empirical Fisher where per-sample gradients do not exist: BatchNorm with batch statistics."""
    if bn_mode == "batch":
        bns = [name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if bns:
            raise ValueError(_coupled_message(f"the model has BatchNorm layers ({', '.join(bns)})"))


def _coupled_message(what: str) -> str:
    return (f"kind='empirical-fisher' needs per-sample gradients, but {what} and bn_mode='batch' normalises each "
            f"sample with the statistics of the whole batch, so a sample's loss depends on the other samples and "
            f"has no gradient of its own. Use bn_mode='running' (BatchNorm with its running statistics, a fixed "
            f"affine map per sample), or kind='ggn' / kind='hessian', which are defined in both modes")


class EmpiricalFisherOperator(FlatOperator):
    """F̂ = (1/N) Σᵢ gᵢgᵢᵀ for one batch (see the module docstring); ``.loss`` and ``.gradient`` at w.

    ``check``: verify that the per-sample gradients average to the batch gradient (one extra forward and backward
    pass; the chunked operator checks its first chunk once and skips it at every product).
    """

    product = "per-sample gradients"

    def __init__(self, objective: Objective, check: bool = True):
        super().__init__(objective)
        check_per_sample(objective.model, objective.bn_mode)
        objective.ensure_checked()
        w = {n: objective.base[n] for n in self.names}
        buffers = {n: b.clone() for n, b in objective.model.named_buffers()}

        def sample_loss(params, x, y):
            out = functional_call(objective.model, {**buffers, **params}, (x.unsqueeze(0),))
            return objective.loss_fn(out, y.unsqueeze(0)).reshape(())

        per_sample = torch.func.vmap(torch.func.grad_and_value(sample_loss), in_dims=(None, 0, 0))
        try:
            with fixed_rng(objective._devices), estimator_mode(objective.model, objective.bn_mode):
                grads, losses = per_sample(w, objective.inputs, objective.targets)
        except Exception as exc:  # noqa: BLE001 -- a module that couples samples fails in its own words
            if objective.bn_mode == "batch":
                raise ValueError(_coupled_message(f"the per-sample pass failed ({type(exc).__name__}: {exc})")) \
                    from exc
            raise
        self.loss = float(losses.mean())
        objective.check_finite(torch.tensor(self.loss))
        self._g = torch.cat([grads[n].reshape(grads[n].shape[0], -1) for n in self.names], dim=1)  # N × n
        self.gradient = self.unflatten(self._g.mean(dim=0))
        if check:
            _, batch_grad = objective.loss_and_grad_at_w()
            gap = float(torch.linalg.vector_norm(self._g.mean(dim=0) - self.flatten(batch_grad)))
            size = float(torch.linalg.vector_norm(self.flatten(batch_grad)))
            if gap > _MEAN_RTOL * max(size, 1e-30):
                raise ValueError(
                    f"the per-sample gradients do not average to the batch gradient (relative gap {gap / size:.3g}) "
                    f"with bn_mode={objective.bn_mode!r}: either a module couples the samples of a batch (a "
                    f"BatchNorm-like layer in train mode: use bn_mode='running'), or loss_fn is not the mean of "
                    f"per-sample losses (the empirical Fisher is defined for mean-reduced losses)")

    def matvec_dict(self, vector: Mapping[str, torch.Tensor]) -> Params:
        self.n_hvp += 1
        v = self.flatten(vector).to(self._g.dtype)
        return self.unflatten(self._g.T @ (self._g @ v) / self._g.shape[0])


class ChunkedEmpiricalFisherOperator(ChunkedOperator):
    """F̂ = Σ_c (n_c/N)·F̂(w; B_c) = (1/N) Σᵢ gᵢgᵢᵀ over all samples of all chunks."""

    chunk_operator = staticmethod(functools.partial(EmpiricalFisherOperator, check=False))

    def __init__(self, objective):
        check_per_sample(objective.model, objective.bn_mode)
        super().__init__(objective)
        EmpiricalFisherOperator(objective.first, check=True)  # the coupling check, once
