"""Curvature over data split across the ranks of a ``torch.distributed`` process group: M = Σ_r (N_r/N)·M_r, one
``all_reduce`` per product. Every rank calls the same estimator with the same arguments except its data, and takes
the same products in the same order. Details: docs/smoothness.md.
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.distributed as dist

from ._objective import Params


def check_group(group) -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("group= needs an initialised torch.distributed process group (call "
                         "torch.distributed.init_process_group first); pass group=None for one process")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed.ProcessGroup (e.g. torch.distributed.group.WORLD), got "
                        f"{type(group).__name__}")


class DistributedOperator:
    """M = Σ_r (N_r/N)·M_r for a local flat operator M_r over ``n_local`` samples (see the module docstring)."""

    def __init__(self, local, n_local: int, group):
        check_group(group)
        self.local, self.group = local, group
        self.objective, self.names, self.n = local.objective, local.names, local.n
        self.dtype, self.device = local.dtype, local.device
        self.flatten, self.unflatten = local.flatten, local.unflatten
        self.product = f"{local.product}, all-reduced"
        count = torch.tensor([float(n_local)], dtype=torch.float64, device=self.device)
        dist.all_reduce(count, group=group)
        self.n_samples = int(count.item())
        self._n_local = float(n_local)
        # loss and gradient: one collective for both
        packed = torch.cat([torch.tensor([local.loss], dtype=torch.float64, device=self.device),
                            local.flatten(local.gradient).to(torch.float64)]) * self._n_local
        dist.all_reduce(packed, group=group)
        packed /= self.n_samples
        self.loss = float(packed[0])
        self.gradient = local.unflatten(packed[1:].to(self.dtype))

    @property
    def n_hvp(self) -> int:
        return self.local.n_hvp

    def matvec_dict(self, vector: Mapping[str, torch.Tensor]) -> Params:
        flat = self.local.flatten(self.local.matvec_dict(vector)) * self._n_local
        dist.all_reduce(flat, group=self.group)
        return self.local.unflatten(flat / self.n_samples)

    def matvec(self, flat: torch.Tensor) -> torch.Tensor:
        return self.flatten(self.matvec_dict(self.unflatten(flat)))
