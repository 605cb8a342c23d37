"""The Hessian spectrum along training (Ghorbani, Krishnan & Xiao 2019), in records.

With ``--spectrum-every E`` a run measures, at initialisation, every E epochs and after the last epoch, on a fixed
sample of its training subset (the first ``SAMPLES`` images of the same fixed permutation the sharpness uses):

- the eigenvalue density of the train-mode Hessian (BatchNorm with the sample's own batch statistics) by stochastic
  Lanczos quadrature, stored as per-probe ``nodes`` and ``weights`` lists (a ``smoothness.DensityResult`` can be
  rebuilt from them, see :func:`density_of`);
- the top ``TOP_K`` eigenvalues and the fraction of ‖g‖² in their eigenspace (gradient concentration, Gur-Ari et
  al. 2018 take k = number of classes = 10);
- for networks with a normalisation layer, the same again with running (population) statistics: Ghorbani's
  population-statistics experiment, where the outliers BatchNorm removes come back.

One record of kind ``spectrum`` per (epoch, bn_mode); the scalars (``lambda_max``, ``gradient_concentration``, ...)
melt into the long-form table like every other metric, the lists are read by ``analysis.spectrum_figures``.

Cost: a measurement is N_PROBES·N_STEPS + about 4·TOP_K+20 Hessian-vector products on SAMPLES images, about 3
minutes per BN mode for the seed ConvNets on one core, so it is off by default (the default study must stay within
about 10 minutes on 2 cores; `smoothness-lab run --spectrum-every 5` adds about 2 × 3 measurements per run).
The measurements draw from their own seeded generators and leave the model untouched, so a run's training
trajectory is the same with or without them. The records hold no wall-clock time (it goes to timing.json, under
``spectrum``), so that records.jsonl stays byte-identical between runs and across a resume.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import smoothness

SAMPLES = 1000      # fixed training images (one batch: in train mode BatchNorm normalises by their statistics)
N_PROBES = 2        # SLQ probes: each places every outlier; more only average their weights
N_STEPS = 80        # Lanczos steps per probe: resolves ~10 outliers plus the bulk (W1 in benchmarks/results/density.md)
TOP_K = 10          # eigenvalues for the gradient concentration (the number of classes, as Gur-Ari et al.)
PROBE_SEED = 0


def due(every: int, epoch: int, epochs: int) -> bool:
    """At initialisation, every ``every`` epochs and after the last one (0 = never)."""
    return bool(every) and (epoch % every == 0 or epoch == epochs)


def bn_modes(norm: str) -> Tuple[str, ...]:
    """Both modes when the network normalises (train vs eval behaviour differs), else the one that exists."""
    return ("batch",) if norm in (None, "none") else smoothness.BN_MODES


def measure(model: nn.Module, batch, norm: str, loss_fn=F.cross_entropy) -> List[Dict]:
    """The spectrum records (without step/epoch) for every BN mode of this network."""
    out = []
    for bn_mode in bn_modes(norm):
        density = smoothness.spectral_density(model, loss_fn, batch, n_probes=N_PROBES, n_steps=N_STEPS,
                                              bn_mode=bn_mode,
                                              generator=torch.Generator().manual_seed(PROBE_SEED))
        k = min(TOP_K, density.n_params - 1)
        conc = smoothness.gradient_concentration(model, loss_fn, batch, k, bn_mode=bn_mode,
                                                 generator=torch.Generator().manual_seed(PROBE_SEED))
        out.append({
            "kind": "spectrum", "bn_mode": bn_mode, "samples": density.batch_size, "n_params": density.n_params,
            "n_probes": density.n_probes, "n_steps": density.n_steps,
            "nodes": [list(x) for x in density.nodes], "weights": [list(w) for w in density.weights],
            "top_eigenvalues": list(conc.eigenvalues), "top_k": k, "lambda_max": conc.eigenvalues[0],
            "lambda_k": conc.eigenvalues[-1], "gradient_concentration": conc.fraction, "grad_norm": conc.grad_norm,
            "loss": conc.loss, "mean_eigenvalue": density.moment(1), "concentration_converged": conc.converged,
            "density_n_hvp": density.n_hvp, "concentration_n_hvp": conc.n_hvp})
    return out


def density_of(record: Dict) -> smoothness.DensityResult:
    """The DensityResult a spectrum record was made from (its ``density(grid, sigma)`` draws the figures)."""
    return smoothness.DensityResult(
        nodes=tuple(tuple(float(v) for v in x) for x in record["nodes"]),
        weights=tuple(tuple(float(v) for v in w) for w in record["weights"]),
        n_params=int(record["n_params"]), n_steps=int(record["n_steps"]),
        n_hvp=int(record.get("density_n_hvp", 0)), bn_mode=record["bn_mode"], batch_size=int(record["samples"]))
