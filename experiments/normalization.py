"""Normalisation layers for the BatchNorm-smoothness experiments (METHODS.md §6 and §9), written from scratch.

:func:`batch_norm` and :class:`BatchNorm` (drop-in and state_dict compatible with ``nn.BatchNorm1d/2d``, torch's
running-statistics convention), :class:`FunctionalBatchNorm`, Santurkar et al.'s :class:`NoisyBatchNorm` and
:class:`LpNorm`, and the registry :data:`NORMS` / :func:`make_norm` the experiment configs use.

Details: docs/explanation/modules.md#normalization
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch
from torch import Tensor, nn

__all__ = [
    "batch_norm",
    "BatchNorm",
    "FunctionalBatchNorm",
    "NoisyBatchNorm",
    "LpNorm",
    "NORMS",
    "make_norm",
]

_SUPPORTED_NDIMS = (2, 3, 4)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _check_input(x: Tensor, num_features: Optional[int]) -> None:
    """Validate ``x`` is (N, C), (N, C, L) or (N, C, H, W) with ``C == num_features``.

    Raises ValueError (torch raises a RuntimeError deep in the kernel for a channel mismatch;
    a ValueError naming both numbers is easier to act on).
    """
    if x.dim() not in _SUPPORTED_NDIMS:
        raise ValueError(
            f"expected 2D (N, C), 3D (N, C, L) or 4D (N, C, H, W) input (got {x.dim()}D input "
            f"of size {tuple(x.shape)})"
        )
    if num_features is not None and x.shape[1] != num_features:
        raise ValueError(
            f"expected {num_features} channels (num_features) in dim 1, got {x.shape[1]} "
            f"(input size {tuple(x.shape)})"
        )


def _check_batch_size(x: Tensor) -> None:
    """Refuse batch statistics from one value per channel, exactly like torch.

    With a single value the biased variance is 0 (output is all zeros) and the unbiased variance
    is a 0/0, so torch raises; we raise the same ValueError with the same message.
    """
    values_per_channel = x.shape[0] * math.prod(x.shape[2:])
    if values_per_channel == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {x.size()}"
        )


def _reduce_dims(x: Tensor) -> list[int]:
    """All dims except the channel dim 1: batch and spatial positions share one statistic."""
    return [0] + list(range(2, x.dim()))


def _per_channel(v: Tensor, x: Tensor) -> Tensor:
    """Reshape a (C,) vector so it broadcasts against ``x`` along dim 1."""
    return v.reshape((1, -1) + (1,) * (x.dim() - 2))


# --------------------------------------------------------------------------------------------
# functional BatchNorm
# --------------------------------------------------------------------------------------------
def batch_norm(
    x: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = True,
    momentum: Optional[float] = 0.1,
    eps: float = 1e-5,
    num_batches_tracked: Optional[Tensor] = None,
) -> Tensor:
    r"""From-scratch BatchNorm over dim 1 of an (N, C), (N, C, L) or (N, C, H, W) tensor.

    For channel c, with the m = N·L (or N·H·W) values x of that channel::

        mu     = mean(x)
        var_b  = mean((x - mu)^2)                      # biased: used to normalise
        var_u  = var_b · m / (m - 1)                   # unbiased: used for the running update
        y      = (x - mu) / sqrt(var_b + eps) · weight + bias     # eps inside the sqrt

    Batch statistics are used when ``training`` is True **or** when both running buffers are
    None (no running statistics to fall back on, as in torch with track_running_stats=False).
    Otherwise (eval) ``running_mean`` / ``running_var`` replace mu / var_b.

    Running update (training with buffers, in place, outside autograd), torch's convention::

        running_mean = (1 - f) · running_mean + f · mu
        running_var  = (1 - f) · running_var  + f · var_u

    with f = ``momentum``, or f = 1 / num_batches_tracked when ``momentum`` is None (a cumulative
    average, exactly what torch does).  NB: the course seeds weight the *old* value by momentum
    (``momentum·running + (1 - momentum)·batch``, momentum = 0.9) and seed 004 keeps a running
    *std*; this function follows torch, not the seeds (METHODS.md §9).

    ``num_batches_tracked`` (a long scalar tensor, as the module buffer) is incremented in place
    by one whenever running statistics are updated; it is required when ``momentum`` is None.

    Raises ValueError for an unsupported ndim, for running stats / affine params whose length
    differs from C, and when batch statistics would come from one value per channel.
    """
    running = running_mean is not None and running_var is not None
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be tensors or both be None")
    # C comes from the first per-channel tensor given (all None: any C is fine)
    given = [t for t in (running_mean, running_var, weight, bias) if t is not None]
    _check_input(x, given[0].numel() if given else None)
    for name, t in (("running_mean", running_mean), ("running_var", running_var),
                    ("weight", weight), ("bias", bias)):
        if t is not None and t.numel() != x.shape[1]:
            raise ValueError(
                f"{name} has {t.numel()} elements, expected {x.shape[1]} (channels of input "
                f"size {tuple(x.shape)})"
            )

    use_batch_stats = training or not running
    dims = _reduce_dims(x)
    if use_batch_stats:
        _check_batch_size(x)
        mean = x.mean(dim=dims)
        # biased variance normalises (what torch does); computed as the mean of squared
        # deviations so autograd differentiates through the mean as well
        var = (x - _per_channel(mean, x)).pow(2).mean(dim=dims)
        if training and running:
            assert running_mean is not None and running_var is not None
            with torch.no_grad():
                if num_batches_tracked is not None:
                    num_batches_tracked.add_(1)
                if momentum is None:
                    if num_batches_tracked is None:
                        raise ValueError(
                            "momentum=None (cumulative average) needs num_batches_tracked"
                        )
                    factor = 1.0 / float(num_batches_tracked.item())
                else:
                    factor = float(momentum)
                m = x.numel() // x.shape[1]
                # unbiased variance for the running estimate (torch's convention)
                var_u = var.detach() * (m / (m - 1))
                running_mean.mul_(1.0 - factor).add_(mean.detach().to(running_mean.dtype),
                                                     alpha=factor)
                running_var.mul_(1.0 - factor).add_(var_u.to(running_var.dtype), alpha=factor)
    else:
        assert running_mean is not None and running_var is not None
        mean = running_mean.to(x.dtype)
        var = running_var.to(x.dtype)

    y = (x - _per_channel(mean, x)) / torch.sqrt(_per_channel(var, x) + eps)
    if weight is not None:
        y = y * _per_channel(weight, x)
    if bias is not None:
        y = y + _per_channel(bias, x)
    return y


# --------------------------------------------------------------------------------------------
# BatchNorm module
# --------------------------------------------------------------------------------------------
class BatchNorm(nn.Module):
    r"""From-scratch BatchNorm for (N, C), (N, C, L) and (N, C, H, W) inputs.

    ``y = (x - mu) / sqrt(var + eps) · weight + bias`` per channel; see :func:`batch_norm` for
    the statistics and the running-average convention (torch's:
    ``running = (1 - momentum)·running + momentum·batch``, unbiased running variance,
    ``momentum=None`` = cumulative average).

    Parameters / buffers carry the same names, shapes and dtypes as ``nn.BatchNorm1d/2d``
    (``weight``, ``bias``, ``running_mean``, ``running_var``, ``num_batches_tracked`` (long,
    shape ())), so state_dicts load both ways with ``strict=True``.  With ``affine=False`` the
    parameters are None; with ``track_running_stats=False`` the buffers are None and batch
    statistics are used in train *and* eval mode, as in torch.
    """

    # torch's _NormBase is at version 2 (the version that added num_batches_tracked); matching
    # it keeps state_dict metadata identical.
    _version = 2

    weight: Optional[nn.Parameter]
    bias: Optional[nn.Parameter]
    running_mean: Optional[Tensor]
    running_var: Optional[Tensor]
    num_batches_tracked: Optional[Tensor]

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_features = int(num_features)
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, **factory))
            self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        else:
            # registered as None (not plain attributes) so they are absent from state_dict,
            # exactly as in torch
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer(
                "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)

    def reset_running_stats(self) -> None:
        """Running mean 0, running variance 1, counter 0 (torch's initial state)."""
        if self.track_running_stats:
            assert self.running_mean is not None and self.running_var is not None
            assert self.num_batches_tracked is not None
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """Reset running statistics and set weight = 1, bias = 0 (torch's initial state)."""
        self.reset_running_stats()
        if self.affine:
            assert self.weight is not None and self.bias is not None
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def _normalise(self, x: Tensor) -> Tensor:
        """Normalised + affine output without any noise (shared with subclasses)."""
        _check_input(x, self.num_features)
        return batch_norm(
            x,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            # running buffers are updated only in train mode; with no buffers batch_norm falls
            # back to batch statistics on its own (torch's bn_training rule)
            training=self.training,
            momentum=self.momentum,
            eps=self.eps,
            num_batches_tracked=self.num_batches_tracked,
        )

    def forward(self, x: Tensor) -> Tensor:
        """Apply BatchNorm; see the class docstring."""
        return self._normalise(x)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, track_running_stats={self.track_running_stats}"
        )


# --------------------------------------------------------------------------------------------
# "functional" BatchNorm (seed 000's first variant)
# --------------------------------------------------------------------------------------------
class FunctionalBatchNorm(nn.Module):
    """Seed 000's functional BatchNorm as a layer: it only *holds* ``weight``, ``bias`` and the
    running buffers (torch's names, so state_dicts match ``nn.BatchNorm1d/2d``) and its forward is
    a single call to :func:`batch_norm` -- the seed's ``batchnorm(inputs, beta, gamma,
    stats_dict, train)`` with the stats dict replaced by registered buffers.  Norm kind
    ``"scratch-fn"``; the numbers are those of :class:`BatchNorm` (momentum 0.1, eps 1e-5)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1):
        super().__init__()
        self.num_features, self.eps, self.momentum = int(num_features), eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        return batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                          training=self.training, momentum=self.momentum, eps=self.eps,
                          num_batches_tracked=self.num_batches_tracked)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"


# --------------------------------------------------------------------------------------------
# Noisy BatchNorm (Santurkar et al. 2018, §3, Figure 2)
# --------------------------------------------------------------------------------------------
class NoisyBatchNorm(BatchNorm):
    r"""BatchNorm followed, in training mode only, by random distributional shift (METHODS §6).

    After normalising and the affine transform, each activation a becomes::

        a <- s · a + m

    where, for this layer and this forward call (one "step"),
    ``mu_t ~ U(-0.5, 0.5)`` and ``sigma_t ~ U(1, 1.25)`` are scalars, and per activation
    (per element of the tensor) ``m ~ U(mu_t - 0.1, mu_t + 0.1)`` and ``s ~ N(sigma_t, 0.1)``
    (0.1 is the standard deviation).  Eval mode adds no noise: the output equals
    :class:`BatchNorm`'s.

    Randomness comes from ``self.generator`` if set (a ``torch.Generator``), otherwise torch's
    global RNG, so ``torch.manual_seed`` makes runs reproducible.  Sampling order per call:
    mu_t, sigma_t, then m's uniform part, then s's normal part.

    After each training forward ``last_mu`` / ``last_sigma`` hold mu_t / sigma_t (floats); when
    ``record_noise`` is True, ``last_m`` / ``last_s`` also hold the per-element tensors
    (detached; off by default because they double the activation memory).
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
        *,
        generator: Optional[torch.Generator] = None,
        record_noise: bool = False,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.generator = generator
        self.record_noise = record_noise
        self.last_mu: Optional[float] = None
        self.last_sigma: Optional[float] = None
        self.last_m: Optional[Tensor] = None
        self.last_s: Optional[Tensor] = None

    def forward(self, x: Tensor) -> Tensor:
        """BatchNorm, then (train mode only) ``s · a + m`` noise; see the class docstring."""
        a = self._normalise(x)
        if not self.training:
            return a
        g = self.generator
        # sample on the generator's device (a CPU generator cannot drive CUDA sampling), then move
        dev = g.device if g is not None else a.device
        mu_t = float(torch.rand((), generator=g, device=dev, dtype=torch.float64)) - 0.5
        sigma_t = 1.0 + 0.25 * float(torch.rand((), generator=g, device=dev, dtype=torch.float64))
        m = mu_t + 0.2 * torch.rand(a.shape, generator=g, device=dev, dtype=a.dtype) - 0.1
        s = sigma_t + 0.1 * torch.randn(a.shape, generator=g, device=dev, dtype=a.dtype)
        m, s = m.to(a.device), s.to(a.device)
        self.last_mu, self.last_sigma = mu_t, sigma_t
        if self.record_noise:
            self.last_m, self.last_s = m.detach(), s.detach()
        # noise is a constant w.r.t. the parameters: gradients flow through a only
        return s * a + m


# --------------------------------------------------------------------------------------------
# l_p normalisation (Santurkar et al. 2018, §3)
# --------------------------------------------------------------------------------------------
_P_CHOICES: dict[str, float] = {"1": 1.0, "2": 2.0, "inf": math.inf}


def _parse_p(p: Union[int, float, str]) -> float:
    """Map 1, 2, inf (numbers or the strings "1", "2", "inf") to a float; else ValueError."""
    key: Optional[str]
    if isinstance(p, str):
        key = p.strip().lower()
        key = {"1.0": "1", "2.0": "2", "infinity": "inf", "linf": "inf", "l1": "1", "l2": "2"}.get(
            key, key
        )
    elif isinstance(p, (int, float)) and not isinstance(p, bool):
        key = "inf" if math.isinf(p) and p > 0 else ("1" if p == 1 else ("2" if p == 2 else None))
    else:
        key = None
    if key not in _P_CHOICES:
        raise ValueError(f"unknown p {p!r}; choose one of: 1, 2, inf")
    return _P_CHOICES[key]


class LpNorm(nn.Module):
    r"""l_p normalisation (Santurkar et al. 2018, §3): centre like BN, scale by the mean p-norm.

    For channel c, with the m = N·L (or N·H·W) values x of that channel in the batch::

        mu    = mean(x)
        scale = (mean(|x|^p))^(1/p) = ||x||_p / m^(1/p)      for p = 1, 2
        scale = max(|x|)            = ||x||_inf              for p = inf
        y     = (x - mu) / (scale + eps) · weight + bias

    The scale is computed from the activations **before** centring (METHODS.md §6), and eps is
    added to the scale (not inside a root).  Gradients flow through mu and scale, as in BN.

    In training mode the running estimates (buffers ``running_mean``, ``running_scale``, plus
    ``num_batches_tracked``) are updated with torch's convention
    ``running = (1 - momentum)·running + momentum·batch`` (momentum 0.1); eval mode uses them
    in place of mu and scale.  ``p`` accepts 1, 2, float('inf') or "1", "2", "inf".
    """

    running_mean: Tensor
    running_scale: Tensor
    num_batches_tracked: Tensor

    def __init__(
        self,
        num_features: int,
        p: Union[int, float, str],
        eps: float = 1e-5,
        affine: bool = True,
        momentum: float = 0.1,
    ) -> None:
        super().__init__()
        self.num_features = int(num_features)
        self.p = _parse_p(p)
        self.eps = eps
        self.affine = affine
        self.momentum = momentum
        if affine:
            self.weight: Optional[nn.Parameter] = nn.Parameter(torch.ones(num_features))
            self.bias: Optional[nn.Parameter] = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_features))
        # 1 is the scale of a standard normal-ish activation: a neutral starting point
        self.register_buffer("running_scale", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def batch_scale(self, x: Tensor) -> Tensor:
        """Per-channel scale of ``x`` (before centring): mean-p-norm, or max |x| for p = inf."""
        dims = _reduce_dims(x)
        if math.isinf(self.p):
            return x.abs().amax(dim=dims)
        return x.abs().pow(self.p).mean(dim=dims).pow(1.0 / self.p)

    def forward(self, x: Tensor) -> Tensor:
        """Apply l_p normalisation; see the class docstring."""
        _check_input(x, self.num_features)
        if self.training:
            mean = x.mean(dim=_reduce_dims(x))
            scale = self.batch_scale(x)
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                f = self.momentum
                self.running_mean.mul_(1 - f).add_(mean.detach().to(self.running_mean.dtype),
                                                   alpha=f)
                self.running_scale.mul_(1 - f).add_(scale.detach().to(self.running_scale.dtype),
                                                    alpha=f)
        else:
            mean = self.running_mean.to(x.dtype)
            scale = self.running_scale.to(x.dtype)
        y = (x - _per_channel(mean, x)) / (_per_channel(scale, x) + self.eps)
        if self.weight is not None:
            y = y * _per_channel(self.weight, x)
        if self.bias is not None:
            y = y + _per_channel(self.bias, x)
        return y

    def extra_repr(self) -> str:
        p = "inf" if math.isinf(self.p) else int(self.p)
        return f"{self.num_features}, p={p}, eps={self.eps}, affine={self.affine}"


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------
def _torch_bn(num_features: int, dims: int) -> nn.Module:
    # BatchNorm1d takes (N, C) and (N, C, L); BatchNorm2d takes (N, C, H, W)
    return nn.BatchNorm1d(num_features) if dims == 1 else nn.BatchNorm2d(num_features)


#: kind -> factory ``(num_features, dims) -> nn.Module``.  dims = 1 for (N, C) / (N, C, L)
#: inputs, 2 for (N, C, H, W).  Only "torch" needs dims; the from-scratch layers take any.
NORMS: dict[str, Callable[[int, int], nn.Module]] = {
    "none": lambda num_features, dims: nn.Identity(),
    "torch": _torch_bn,
    "scratch": lambda num_features, dims: BatchNorm(num_features),
    "scratch-fn": lambda num_features, dims: FunctionalBatchNorm(num_features),
    "noisy": lambda num_features, dims: NoisyBatchNorm(num_features),
    "l1": lambda num_features, dims: LpNorm(num_features, p=1),
    "l2": lambda num_features, dims: LpNorm(num_features, p=2),
    "linf": lambda num_features, dims: LpNorm(num_features, p=math.inf),
}


def make_norm(kind: str, num_features: int, dims: int) -> nn.Module:
    """Build the normalisation layer ``kind`` (a key of :data:`NORMS`) for ``num_features``
    channels; ``dims`` is 1 for (N, C)/(N, C, L) inputs and 2 for (N, C, H, W).

    Raises ValueError for an unknown kind (listing the choices) or dims not in {1, 2}.
    """
    if kind not in NORMS:
        raise ValueError(f"unknown norm {kind!r}; choose one of: {', '.join(NORMS)}")
    if dims not in (1, 2):
        raise ValueError(f"dims must be 1 ((N, C) or (N, C, L) inputs) or 2 ((N, C, H, W)), "
                         f"got {dims!r}")
    return NORMS[kind](num_features, dims)


def batch_coupled(model: nn.Module) -> bool:
    """Whether the model's train-mode output for one sample depends on the other samples of the batch."""
    return any(isinstance(m, (nn.modules.batchnorm._BatchNorm, BatchNorm, FunctionalBatchNorm))
               for m in model.modules())
