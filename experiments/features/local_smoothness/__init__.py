"""Per-pass local smoothness along a minibatch step and per-pass λ_max (the ``smoothness`` record)."""
from experiments.features.base import Feature
from experiments.features.local_smoothness.measurement import SMOOTHNESS

FEATURE = Feature("local_smoothness", "per-pass local smoothness and λ_max on a fixed sample", measurement=SMOOTHNESS,
                  figures=("experiments.features.local_smoothness.figures:SHARPNESS",))
