"""The ``probe`` record: Santurkar et al.'s line probe on the step's batch (``smoothness.line_probe``)."""
from __future__ import annotations

from typing import Callable, Dict, Mapping, Optional

import torch.nn.functional as F
from torch import nn

import smoothness


def probe_record(model: nn.Module, batch, step_sizes, bn_mode: str, *, direction: Optional[Mapping] = None,
                 loss_fn: Callable = F.cross_entropy) -> Dict:
    """Santurkar's Fig. 4 measures on the step's own batch, along d = −g (``direction`` None) or along the given
    ``direction``: the optimizer's own step divided by its learning rate, so that the step sizes stay multiples of
    η and s = η is the step actually taken (for plain SGD the two coincide)."""
    p = smoothness.line_probe(model, loss_fn, batch, step_sizes, direction=direction, bn_mode=bn_mode)
    lo, hi = p.loss_range
    glo, ghi = p.grad_diff_range
    # the direction is named only when it is not Santurkar's −g, so plain-SGD records stay as they always were
    extra = {} if direction is None else {"direction": "update"}
    return {"kind": "probe", "bn_mode": bn_mode, **extra, "base_loss": p.base_loss, "grad_norm": p.grad_norm,
            "loss_min": lo, "loss_max": hi, "grad_pred_min": glo, "grad_pred_max": ghi,
            "effective_beta": p.effective_beta, "step_sizes": list(p.step_sizes), "losses": list(p.losses),
            "grad_diff_norms": list(p.grad_diff_norms)}
