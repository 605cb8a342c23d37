"""Sharpness-versus-generalisation measures of one network (Jiang et al. 2020, Andriushchenko et al. 2023):
the ``generalization`` record a run writes every ``generalization_every`` passes and at its end.

Every measure is taken on one fixed sample of training images in ``running`` BN mode, with random numbers from a
generator seeded with ``SEED``, so it is a deterministic function of the weights; the options are fixed here, as
part of what the record means.

Details: docs/explanation/modules.md#generalization-compute
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
