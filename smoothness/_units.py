"""Units of gradient noise (METHODS.md §12): one example, or one minibatch, per unit.

``unit="example"``: u_i = ∇ℓ(f(x_i; w), y_i), all examples of a chunk at once with
``vmap(grad(…))`` through ``functional_call`` (each example run as a batch of one); memory: one chunk's
n_c × n per-example gradients. ``unit="batch"``: u_b = ∇L(w; B_b), the minibatch gradient SGD uses (BatchNorm in
batch mode normalising inside B_b); each minibatch of ``data`` is one unit.

Per-example gradients do not exist when a module couples the examples of a batch (BatchNorm with batch statistics):
:func:`check_unit` refuses that combination, by the modules' types and, once per model, by a forward probe
(outputs of the first half of a chunk alone must equal those inside the whole chunk).
"""
from __future__ import annotations

import weakref
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.autograd import forward_ad as fwAD
from torch.func import functional_call

from ._objective import (Objective, check_batch, check_chunk, chunk_kind, estimator_mode, is_one_batch,
                         trainable_parameters)
from ._rng import fixed_rng
from .operator import resolve_params

UNITS = ("example", "batch")
Batch = Tuple[torch.Tensor, torch.Tensor]
_PROBED: "weakref.WeakKeyDictionary[nn.Module, set]" = weakref.WeakKeyDictionary()


def coupled_layers(model: nn.Module) -> List[str]:
    """Modules whose train-mode output for one example depends on the other examples: torch's BatchNorm family
    (SyncBatchNorm included) and any module keeping BatchNorm-style running statistics (not InstanceNorm)."""
    found = []
    for name, m in model.named_modules():
        running = "running_mean" in dict(m.named_buffers(recurse=False))
        if isinstance(m, nn.modules.batchnorm._BatchNorm) or (
                running and not isinstance(m, nn.modules.instancenorm._InstanceNorm)):
            found.append(f"{name or '<root>'} ({type(m).__name__})")
    return found


def _refuse(what: str) -> ValueError:
    return ValueError(f"unit='example' with bn_mode='batch' is undefined here: {what}, so an example's gradient "
                      f"depends on the rest of its batch; use unit='batch' (one unit per minibatch, the gradient the "
                      f"optimiser uses) or bn_mode='running'")


def check_unit(unit: str, model: nn.Module, bn_mode: str) -> str:
    if unit == "example" and bn_mode == "batch":
        layers = coupled_layers(model)
        if layers:
            raise _refuse(f"the model normalises with batch statistics ({', '.join(layers)})")
    return unit


def probe_coupling(objective: Objective) -> None:
    """Refuse per-example units when the outputs of half a chunk alone differ from the same rows inside the whole
    chunk (a module coupling examples that :func:`coupled_layers` does not know). Once per model and module tree."""
    model, x = objective.model, objective.inputs
    key = (objective.bn_mode, tuple((name, id(m)) for name, m in model.named_modules()))
    if x.shape[0] < 2 or key in _PROBED.get(model, ()):
        return
    with torch.no_grad():
        whole = objective.outputs(objective.base)
        half = Objective(model, objective.loss_fn, (x[: x.shape[0] // 2], objective.targets[: x.shape[0] // 2]),
                         objective.bn_mode).outputs(objective.base)
    if not torch.allclose(whole[: half.shape[0]], half, rtol=1e-4, atol=1e-6 * float(whole.abs().max())):
        raise _refuse("the model's outputs for some examples change with the other examples of the batch")
    _PROBED.setdefault(model, set()).add(key)


def split_units(data, unit: str) -> List[Batch]:
    """``data`` as a list of (inputs, targets) chunks: one batch or an iterable of them; for ``unit="batch"`` at
    least two minibatches, all of one size."""
    if is_one_batch(data):
        if unit == "batch":
            raise ValueError("unit='batch' needs an iterable of minibatches (each one unit), got a single batch; "
                             "pass a list of (inputs, targets) minibatches of equal size")
        chunks = [check_batch(data)]
    else:
        if isinstance(data, (torch.Tensor, str, bytes, Mapping)) or not hasattr(data, "__iter__"):
            raise TypeError(f"data must be a pair (inputs, targets) or an iterable of such pairs, got "
                            f"{type(data).__name__}")
        chunks, first = [], None
        for i, chunk in enumerate(data):
            inputs, targets = check_chunk(i, chunk, first)
            first = first or chunk_kind(inputs, targets)
            chunks.append((inputs, targets))
        if not chunks:
            raise ValueError("data is empty: give at least one (inputs, targets) pair")
    sizes = [int(x.shape[0]) for x, _ in chunks]
    if unit == "batch":
        if len(chunks) < 2:
            raise ValueError(f"unit='batch' needs at least two minibatches (variances over units divide by m - 1), "
                             f"got {len(chunks)}")
        if len(set(sizes)) > 1:
            raise ValueError(f"unit='batch' needs minibatches of equal size (each is one draw of the minibatch "
                             f"gradient), got sizes {sizes}; drop the last, smaller one (drop_last=True)")
    elif sum(sizes) < 2:
        raise ValueError("unit='example' needs at least two examples (variances over units divide by m - 1)")
    return chunks


class Units:
    """Per-unit gradients (and losses along a line) of one model, loss and data; see the module docstring."""

    def __init__(self, model: nn.Module, loss_fn: Callable, data, unit: str, params: Optional[Sequence[str]],
                 bn_mode: str):
        if unit not in UNITS:
            raise ValueError(f"unknown unit {unit!r}: use 'example' (per-example gradients) or 'batch' (one "
                             f"gradient per minibatch of data)")
        self.unit = unit
        chunks = split_units(data, unit)
        device = next(iter(trainable_parameters(model).values())).device
        self.objectives = [Objective(model, loss_fn, (x.to(device), y.to(device)), bn_mode) for x, y in chunks]
        check_unit(unit, model, bn_mode)
        first = self.objectives[0]
        self.names = resolve_params(first, params) or first.names
        self.base = {n: first.base[n] for n in self.names}
        self.numels = [self.base[n].numel() for n in self.names]
        self.n_params = sum(self.numels)
        self.batch_size = 1 if unit == "example" else int(chunks[0][0].shape[0])
        self.n_units = sum(int(x.shape[0]) for x, _ in chunks) if unit == "example" else len(chunks)
        first.ensure_checked()
        if unit == "example":
            probe_coupling(first)

    def flatten(self, tensors: Mapping[str, torch.Tensor], rows: bool = False) -> torch.Tensor:
        if rows:
            return torch.cat([tensors[n].reshape(tensors[n].shape[0], -1) for n in self.names], dim=1)
        return torch.cat([tensors[n].reshape(-1) for n in self.names])

    def fixed_tensors(self, objective: Objective) -> Dict[str, torch.Tensor]:
        """Buffers (cloned: train-mode BatchNorm cannot move the model's) and the parameters outside ``params``."""
        rest = {n: p for n, p in objective.base.items() if n not in self.base}
        return {**{n: b.clone() for n, b in objective.model.named_buffers()}, **rest}

    # -- gradients ------------------------------------------------------------------------------------------------
    def gradients(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """(per-unit losses, per-unit gradients flattened), one chunk (k, k × n) at a time: a chunk of data for
        examples, all the minibatch gradients stacked (m × n) for minibatch units."""
        if self.unit == "batch":
            losses, rows = [], []
            for objective in self.objectives:
                loss, grad = objective.loss_and_grad_at_w()
                losses.append(loss.reshape(1))
                rows.append(self.flatten(grad))
            yield torch.cat(losses), torch.stack(rows)
            return
        for objective in self.objectives:
            yield self.example_gradients(objective)

    def example_gradients(self, objective: Objective) -> Tuple[torch.Tensor, torch.Tensor]:
        model, loss_fn, fixed = objective.model, objective.loss_fn, self.fixed_tensors(objective)

        def example_loss(params, x, y):
            out = functional_call(model, {**fixed, **params}, (x.unsqueeze(0),))
            return loss_fn(out, y.unsqueeze(0)).reshape(())

        per_example = torch.func.vmap(torch.func.grad_and_value(example_loss), in_dims=(None, 0, 0))
        with fixed_rng(objective._devices), estimator_mode(model, objective.bn_mode):
            grads, losses = per_example(self.base, objective.inputs, objective.targets)
        return losses.detach(), self.flatten(grads, rows=True)

    def mean_gradient(self) -> torch.Tensor:
        """ū from ordinary batched gradients, Σ_c (n_c/N)·∇L(w; B_c) (for examples: one backward per chunk)."""
        total = sum(int(o.inputs.shape[0]) for o in self.objectives)
        return sum(self.flatten(o.loss_and_grad_at_w()[1]) * (int(o.inputs.shape[0]) / total)
                   for o in self.objectives)

    # -- along a line ---------------------------------------------------------------------------------------------
    def line(self, direction: Mapping[str, torch.Tensor], shift: Optional[Mapping[str, torch.Tensor]] = None
             ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-unit losses and directional derivatives dᵀu_i at w (+ shift), by forward-mode AD (one jvp per chunk,
        no per-example backward)."""
        point = {n: p if shift is None else p + shift[n] for n, p in self.base.items()}
        losses, slopes = [], []
        for objective in self.objectives:
            model, loss_fn, fixed = objective.model, objective.loss_fn, self.fixed_tensors(objective)
            x, y = objective.inputs, objective.targets
            with fixed_rng(objective._devices), estimator_mode(model, objective.bn_mode), fwAD.dual_level():
                # forward-mode AD on dual tensors: train-mode BatchNorm may update the (cloned) buffers in place
                duals = {n: fwAD.make_dual(p, direction[n]) for n, p in point.items()}
                out = functional_call(model, {**fixed, **duals}, (x,))
                if self.unit == "batch":
                    total = loss_fn(out, y).reshape(1)
                else:
                    total = torch.func.vmap(lambda o, t: loss_fn(o.unsqueeze(0), t.unsqueeze(0)).reshape(()))(out, y)
                value, slope = fwAD.unpack_dual(total)
            losses.append(value.detach())
            slopes.append(slope.detach())
        return torch.cat(losses), torch.cat(slopes)
