"""Weight-norm baselines of the generalisation studies (Jiang et al. 2020): distance to initialisation ‖w − w₀‖₂, the
product of spectral norms Π ‖W_i‖₂, and Neyshabur et al.'s path norm √(Σ_paths Π w²) (of the logits: a final
Softmax/LogSoftmax module is left out). Functions of the weights alone. Details: docs/smoothness.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.func import functional_call

from ._objective import estimator_mode
from ._rng import fixed_rng

_STATELESS_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
_OUTPUT_MAPS = (nn.Softmax, nn.LogSoftmax, nn.Softmin)


@dataclass(frozen=True)
class DistanceToInit:
    value: float                              # ‖w − w₀‖₂ over all parameters
    n_params: int


@dataclass(frozen=True)
class SpectralProduct:
    value: float                              # Π ‖W_i‖₂
    log_value: float                          # Σ log ‖W_i‖₂ (finite where value over/underflows)
    layers: Tuple[str, ...]                   # parameter names of the W_i
    norms: Tuple[float, ...]                  # ‖W_i‖₂


@dataclass(frozen=True)
class PathNorm:
    value: float                              # √(Σ_paths Π w²), Neyshabur et al.'s ℓ2 path norm
    squared: float                            # Σ_paths Π w², Jiang et al.'s "path.norm"
    input_shape: Tuple[int, ...]
    dropped: Optional[str] = None             # a final Softmax/LogSoftmax module left out (the norm is on the logits)


def distance_to_init(model: nn.Module, init_state: Mapping[str, torch.Tensor]) -> DistanceToInit:
    """‖w − w₀‖₂ with w₀ from ``init_state`` (a state_dict saved at initialisation, or a dict of parameters; buffers
    in it are ignored)."""
    params = dict(model.named_parameters())
    missing = [n for n in params if n not in init_state]
    if missing:
        raise ValueError(f"init_state lacks the parameters {missing}: pass the model's state_dict() saved at "
                         f"initialisation (a copy, e.g. copy.deepcopy(model.state_dict()))")
    total = 0.0
    for n, p in params.items():
        w0 = init_state[n]
        if tuple(w0.shape) != tuple(p.shape):
            raise ValueError(f"init_state[{n!r}] has shape {tuple(w0.shape)}, the parameter {tuple(p.shape)}")
        total += float(torch.sum((p.detach().double() - w0.detach().to(p.device).double()) ** 2))
    return DistanceToInit(value=math.sqrt(total), n_params=sum(p.numel() for p in params.values()))


def spectral_product(model: nn.Module) -> SpectralProduct:
    """Π ‖W_i‖₂ over nn.Linear and convolution weights (conv kernels as (out, in·k·k) matrices)."""
    layers, norms = [], []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
            w = m.weight.detach()
            # transposed convs store (in, out/groups, k...): rows are still the first dimension's filters
            norms.append(float(torch.linalg.matrix_norm(w.reshape(w.shape[0], -1).double(), ord=2)))
            layers.append(f"{name}.weight" if name else "weight")
    if not layers:
        raise ValueError("the model has no nn.Linear or convolution layer: no weight matrices to take norms of")
    log_value = sum(math.log(v) if v > 0 else -math.inf for v in norms)
    return SpectralProduct(value=math.prod(norms), log_value=log_value, layers=tuple(layers), norms=tuple(norms))


def _has_running_stats(m: nn.Module) -> bool:
    return (isinstance(getattr(m, "running_mean", None), torch.Tensor)
            and isinstance(getattr(m, "running_var", None), torch.Tensor))


def path_norm(model: nn.Module, input_shape: Sequence[int]) -> PathNorm:
    """Neyshabur et al.'s ℓ2 path norm: the square root of the summed outputs of the squared network (every
    parameter squared, BatchNorm folded and squared, eval mode) on one all-ones input of ``input_shape`` (one
    sample, without the batch dimension)."""
    shape = tuple(int(s) for s in input_shape)
    refused = [f"{n} ({type(m).__name__})" for n, m in model.named_modules()
               if isinstance(m, _STATELESS_NORMS) or (hasattr(m, "running_mean") and not _has_running_stats(m))]
    if refused:
        raise ValueError(f"path norm needs every normalisation layer to be a fixed affine map in eval mode, but "
                         f"{refused} normalise with statistics of the input itself")
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    tensors = {**{n: b.clone() for n, b in buffers.items()}, **{n: p.detach() ** 2 for n, p in params.items()}}
    for name, m in model.named_modules():
        if _has_running_stats(m):
            if getattr(m, "weight", None) is None or getattr(m, "bias", None) is None:
                raise ValueError(f"{name} ({type(m).__name__}) has no affine parameters to hold the folded "
                                 f"map; path norm supports affine BatchNorm only")
            prefix = f"{name}." if name else ""
            scale = m.weight.detach() * torch.rsqrt(m.running_var.detach() + m.eps)
            shift = m.bias.detach() - scale * m.running_mean.detach()
            tensors[prefix + "weight"], tensors[prefix + "bias"] = scale ** 2, shift ** 2
            # with mean 0 and var + eps = 1 the layer computes weight·x + bias: the folded, squared map
            tensors[prefix + "running_mean"] = torch.zeros_like(m.running_mean)
            tensors[prefix + "running_var"] = torch.full_like(m.running_var, 1.0) - m.eps
    first = next(iter(params.values()))
    ones = torch.ones((1, *shape), dtype=first.dtype, device=first.device)

    def forward(hooks):
        handles = [m.register_forward_hook(hook) for m, hook in hooks]
        try:
            with torch.no_grad(), fixed_rng({first.device}), estimator_mode(model, "running"):
                return functional_call(model, tensors, (ones,))
        finally:
            for handle in handles:
                handle.remove()

    # a final (log-)softmax maps the logits to probabilities, not a path sum: the norm is the logits', so run again
    # with that module as the identity
    produced = {}
    out = forward([(m, lambda m, i, o: produced.__setitem__(id(o), m)) for m in model.modules()
                   if isinstance(m, _OUTPUT_MAPS)])
    final = produced.get(id(out))
    dropped = None
    if final is not None:
        dropped = next(f"{n} ({type(m).__name__})" for n, m in model.named_modules() if m is final)
        out = forward([(final, lambda m, i, o: i[0])])
    squared = float(out.double().sum())
    if not squared >= 0:
        raise ValueError(f"the squared network's outputs sum to {squared:g}, but a path norm is a sum of squares: the "
                         f"network is not a path sum on its logits (path norm supports Linear/conv layers, ReLU, "
                         f"average pooling, BatchNorm and a final nn.Softmax/nn.LogSoftmax module, not a softmax "
                         f"applied by a function or other output maps)")
    return PathNorm(value=math.sqrt(squared), squared=squared, input_shape=shape, dropped=dropped)
