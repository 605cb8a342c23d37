"""The step loss: the loop itself writes it (experiments/loop.py), every step, before the update, on the step's
batch; with a learning-rate schedule or warmup it also holds the step's ``lr``. No options, no hook."""
from __future__ import annotations

from experiments.features.base import Measurement, Record

STEP = Measurement(
    name="step", schedule="every step, before the update, on the step's batch",
    records=(Record("step", numbers=("loss", "accuracy")),))
