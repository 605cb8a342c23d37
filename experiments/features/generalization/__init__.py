"""Sharpness and flatness versus generalisation: perturbation sharpness, PAC-Bayes and relative flatness, λ_max,
trace and norm baselines at the end of training, and their Kendall τ / Ψ with the generalisation gap."""
from experiments.features.base import Feature
from experiments.features.generalization.measurement import GENERALIZATION

FEATURE = Feature("generalization", "generalisation measures and the target loss (--generalization-every)",
                  measurement=GENERALIZATION, figures=("experiments.features.generalization.table:GENERALIZATION",),
                  commands=("experiments.features.generalization.command:generalization_command",))
