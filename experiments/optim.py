"""Optimizers, learning-rate schedules, the step an optimizer is about to take, and its stability threshold.

``build_optimizer`` (torch's own SGD, Adam and AdamW), ``build_schedule`` (torch's schedulers, stepped once per
optimizer step; ``lr_at`` is the same schedule in closed form), ``lookahead`` (the update ``optimizer.step()`` would
apply now, and Adam's preconditioner, changing nothing) and ``stability_threshold`` (the largest curvature at which
the optimizer's iteration on a quadratic stays stable; for Adam's preconditioned sharpness (2 + 2β₁)/((1 − β₁)η)).

Details: docs/explanation/modules.md#optim
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Tuple

import torch
from torch import nn

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "step")


def build_optimizer(params, name: str = "sgd", *, lr: float, momentum: float = 0.0, nesterov: bool = False,
                    weight_decay: float = 0.0, betas: Tuple[float, float] = (0.9, 0.999),
                    eps: float = 1e-8) -> torch.optim.Optimizer:
    """torch's optimizer ``name`` over ``params``. ``momentum``/``nesterov`` are SGD's (torch's form: buffer
    b ← μb + g, step −η·b, or −η·(g + μb) with Nesterov); ``betas``/``eps`` are Adam's and AdamW's.
    ``weight_decay`` is an L2 term added to the gradient for sgd and adam, and decoupled (w ← w − ηλw) for adamw."""
    if name == "sgd":
        if nesterov and momentum <= 0:
            raise ValueError("Nesterov momentum needs a positive momentum; set momentum > 0 or nesterov off")
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    if momentum or nesterov:
        raise ValueError(f"momentum and nesterov are SGD's; {name}'s momentum is beta1 (betas[0])")
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZERS)}")


def build_schedule(optimizer: torch.optim.Optimizer, name: str = "constant", *, total_steps: int,
                   warmup_steps: int = 0, decay_every: int = 0,
                   decay_factor: float = 0.1) -> Optional[torch.optim.lr_scheduler.LRScheduler]:
    """torch's scheduler for ``name`` (None for a constant rate without warmup); call ``.step()`` after every
    optimizer step. ``cosine`` reaches 0 at step ``total_steps``; ``step`` needs ``decay_every`` > 0."""
    from torch.optim import lr_scheduler as S

    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of: {', '.join(SCHEDULES)}")
    if not 0 <= warmup_steps < max(total_steps, 1):
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}), got {warmup_steps}")
    if name == "step" and decay_every <= 0:
        raise ValueError("the step schedule needs decay_every > 0 (steps between decays)")
    after = total_steps - warmup_steps
    if name == "cosine":
        main = S.CosineAnnealingLR(optimizer, T_max=after, eta_min=0.0)
    elif name == "step":
        main = S.StepLR(optimizer, step_size=decay_every, gamma=decay_factor)
    else:
        main = None
    if warmup_steps < 2:  # a warmup of one step starts at lr·1/1: no warmup at all
        return main
    warm = S.LinearLR(optimizer, start_factor=1.0 / warmup_steps, end_factor=1.0, total_iters=warmup_steps - 1)
    if main is None:
        return warm
    return S.SequentialLR(optimizer, [warm, main], milestones=[warmup_steps])


def lr_at(step: int, lr: float, name: str = "constant", *, total_steps: int, warmup_steps: int = 0,
          decay_every: int = 0, decay_factor: float = 0.1) -> float:
    """The learning rate of step ``step`` (0-based) in closed form: what ``build_schedule`` gives."""
    if warmup_steps >= 2 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    t = step - (warmup_steps if warmup_steps >= 2 else 0)
    if name == "cosine":
        return lr * (1 + math.cos(math.pi * t / (total_steps - (warmup_steps if warmup_steps >= 2 else 0)))) / 2
    if name == "step":
        return lr * decay_factor ** (t // decay_every)
    return lr


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    """The learning rate of the next step (all parameter groups share one here)."""
    return float(optimizer.param_groups[0]["lr"])


@dataclass(frozen=True)
class Lookahead:
    """The step ``optimizer.step()`` would take now. Dicts are keyed like ``dict(model.named_parameters())``."""

    update: Dict[str, torch.Tensor]                    # Δw = w_{t+1} − w_t (zero for parameters without .grad)
    lr: float                                          # the learning rate of this step
    preconditioner: Optional[Dict[str, torch.Tensor]]  # Adam/AdamW: P_t's diagonal (module docstring); else None


def _adam_preconditioner(group: dict, state: dict) -> torch.Tensor:
    beta1, beta2 = group["betas"]
    t = float(state["step"])
    v = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
    return (1 - beta1 ** t) * ((v / (1 - beta2 ** t)).sqrt() + group["eps"])


@torch.no_grad()
def lookahead(optimizer: torch.optim.Optimizer, named_parameters: Mapping[str, nn.Parameter]) -> Lookahead:
    """The update the optimizer's next ``step()`` would make, from the current ``.grad`` fields, computed on copies.

    A fresh optimizer of the same class, over copies of the parameters (with copies of their gradients) and the
    same parameter groups (learning rate, momentum, betas, ...), loads a deep copy of the state and steps once:
    it runs torch's own update code, so the result is the real step to the bit, and neither the real optimizer's
    state, nor its step count, nor the parameters change. Costs one optimizer step and one copy of the state.
    """
    index = {id(p): name for name, p in named_parameters.items()}
    copies, groups = {}, []
    for group in optimizer.param_groups:
        params = []
        for p in group["params"]:
            c = p.detach().clone()
            c.grad = None if p.grad is None else p.grad.detach().clone()
            copies[id(p)] = c
            params.append(c)
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": params})
    shadow = type(optimizer)(groups)
    shadow.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    shadow.step()
    update, precond = {}, None
    adam = isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))
    if adam:
        precond = {}
    for group, shadow_group in zip(optimizer.param_groups, shadow.param_groups):
        for p, c in zip(group["params"], shadow_group["params"]):
            name = index.get(id(p))
            if name is None:
                continue
            update[name] = c - p
            if adam:
                state = shadow.state.get(c)
                precond[name] = (_adam_preconditioner(shadow_group, state) if state
                                 else torch.ones_like(p))  # no gradient yet: no preconditioning
    for name, p in named_parameters.items():
        if name not in update:  # not optimised: it does not move
            update[name] = torch.zeros_like(p)
            if precond is not None:
                precond[name] = torch.ones_like(p)
    return Lookahead(update=update, lr=current_lr(optimizer), preconditioner=precond)


def stability_threshold(name: str, lr: float, *, momentum: float = 0.0, nesterov: bool = False,
                        beta1: float = 0.9) -> float:
    """The curvature above which the optimizer's iteration on a quadratic diverges (its edge of stability).

    - sgd: (2 + 2μ)/η (2/η without momentum; Polyak momentum, torch's form; Cohen et al. 2021, App. B);
    - sgd with Nesterov: (2 + 2μ)/(η(1 + 2μ));
    - adam, adamw: (2 + 2β₁)/((1 − β₁)η) for the *preconditioned* sharpness λ_max(P⁻¹H) (Cohen et al. 2022);
      38/η at β₁ = 0.9.
    L2 weight decay adds λ to every Hessian eigenvalue and is not included (the measured sharpness is of the loss).
    """
    if name == "sgd":
        if nesterov:
            return (2 + 2 * momentum) / (lr * (1 + 2 * momentum))
        return (2 + 2 * momentum) / lr
    if name in ("adam", "adamw"):
        return (2 + 2 * beta1) / ((1 - beta1) * lr)
    raise ValueError(f"unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZERS)}")
