"""Sharpness-versus-generalisation measures of one network (Jiang et al. 2020, Andriushchenko et al. 2023):
the ``generalization`` record a run writes every ``generalization_every`` passes and at its end.

Every measure is taken on the same fixed sample of ``generalization_samples`` training images, in ``running`` BN mode
(eval mode: the function whose test error the generalisation gap is about), with its random numbers from a generator
seeded with ``SEED``, so a measure is a deterministic function of the weights. The options are fixed here rather than
on the command line: they are part of what the ``generalization`` record means, and the report names them.

| field | measure | cost on the MLP of the preset |
|---|---|---|
| ``worst_case_sharpness`` | max L(w+δ) − L(w), ‖δ/|w|‖₂ ≤ ρ = 0.1 (adaptive, APGD-style ascent, 20 steps) | 21 passes |
| ``average_case_sharpness`` | E L(w+δ) − L(w), δ ~ N(0, ρ²diag(w²)), ρ = 0.1, 100 draws | 101 forwards |
| ``epsilon_sharpness`` | Keskar et al.'s ε-sharpness, ε = 1e-3 | 21 passes |
| ``pacbayes_flatness`` | Jiang et al.'s 1/σ² at a mean loss increase of 0.1 | ~225 forwards |
| ``pacbayes_mag_flatness`` | the same with magnitude-aware noise | ~240 forwards |
| ``relative_flatness`` | Petzka et al.'s κ of the last linear layer (Hutchinson, 50 probes) | 50 products |
| ``lambda_max``, ``hessian_trace`` | top Hessian eigenvalue (tol 1e-3), Hutchinson trace (50 probes) | ~30 + 50 products |
| ``distance_to_init``, ``spectral_product_log``, ``path_norm`` | weight-norm baselines | no data |
"""
from __future__ import annotations

from typing import Callable, Dict, Mapping, Sequence

import torch
from torch import nn

import smoothness

SEED = 0
BN_MODE = "running"
RHO = 0.1
N_AVERAGE = 100
N_HUTCHINSON = 50
EPSILON = 1e-3
PACBAYES_TARGET = 0.1
#: the record's measure fields, in report order: smaller = flatter / simpler for every one of them
FIELDS = ("worst_case_sharpness", "average_case_sharpness", "epsilon_sharpness", "pacbayes_flatness",
          "pacbayes_mag_flatness", "relative_flatness", "lambda_max", "hessian_trace", "distance_to_init",
          "spectral_product_log", "path_norm")


def due(every: int, epoch: int, epochs: int) -> bool:
    """At every ``every``-th pass (from initialisation) and at the end; never when ``every`` is 0."""
    return every > 0 and (epoch % every == 0 or epoch == epochs)


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(SEED)


def measure(model: nn.Module, batch, loss_fn: Callable, init_state: Mapping[str, torch.Tensor],
            input_shape: Sequence[int]) -> Dict:
    """The ``generalization`` record's fields for the model's current weights (module docstring)."""
    kw = dict(bn_mode=BN_MODE)
    worst = smoothness.worst_case_sharpness(model, loss_fn, batch, rho=RHO, generator=_gen(), **kw)
    average = smoothness.average_case_sharpness(model, loss_fn, batch, rho=RHO, n_samples=N_AVERAGE,
                                                generator=_gen(), **kw)
    eps = smoothness.epsilon_sharpness(model, loss_fn, batch, epsilon=EPSILON, generator=_gen(), **kw)
    pac = smoothness.pacbayes_flatness(model, loss_fn, batch, generator=_gen(), target=PACBAYES_TARGET, **kw)
    mag = smoothness.pacbayes_mag_flatness(model, loss_fn, batch, generator=_gen(), target=PACBAYES_TARGET, **kw)
    rel = smoothness.relative_flatness(model, loss_fn, batch, n_probes=N_HUTCHINSON, generator=_gen(), **kw)
    top = smoothness.top_eigenvalues(model, loss_fn, batch, k=1, generator=_gen(), **kw)
    trace = smoothness.hessian_trace(model, loss_fn, batch, n_probes=N_HUTCHINSON, generator=_gen(), **kw)
    return {"kind": "generalization", "bn_mode": BN_MODE, "n_samples": int(batch[0].shape[0]),
            "base_loss": worst.base_loss,
            "worst_case_sharpness": worst.value, "average_case_sharpness": average.value,
            "average_case_sharpness_stderr": average.stderr, "epsilon_sharpness": eps.value,
            "pacbayes_flatness": pac.measure, "pacbayes_sigma": pac.sigma,
            "pacbayes_mag_flatness": mag.measure, "pacbayes_mag_sigma": mag.sigma,
            "relative_flatness": rel.value, "lambda_max": top.values[0], "hessian_trace": trace.mean,
            "distance_to_init": smoothness.distance_to_init(model, init_state).value,
            "spectral_product_log": smoothness.spectral_product(model).log_value,
            "path_norm": smoothness.path_norm(model, input_shape).value}
