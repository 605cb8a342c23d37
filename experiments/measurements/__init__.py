"""The measurements along training, one object each (base.py), registered here in loop order: at a point (an
evaluation), the evaluation, the spectrum, the per-pass smoothness record, the per-layer curvature, the generalisation measures and the target
stop run in this order, as the records they write. A measurement defined elsewhere is added with `register`."""
from __future__ import annotations

from experiments.measurements.base import (MEASUREMENTS, Measurement, Metric, Option, Record, RecordSchema, RegistryError, RunContext,
                   find_option, loss_name, metrics, option_name, options, register, unregister)
from experiments.measurements.evaluation import EVALUATION
from experiments.measurements.generalization import GENERALIZATION
from experiments.measurements.per_layer import PER_LAYER
from experiments.measurements.probe import PROBE
from experiments.measurements.sharpness import SHARPNESS
from experiments.measurements.smoothness import SMOOTHNESS
from experiments.measurements.spectrum import SPECTRUM
from experiments.measurements.step import STEP
from experiments.measurements import base

for _m in (STEP, EVALUATION, PROBE, SHARPNESS, SPECTRUM, SMOOTHNESS, PER_LAYER, GENERALIZATION):
    register(_m)
BUILT_IN = base.freeze_built_in()

__all__ = ["MEASUREMENTS", "Measurement", "Metric", "Option", "Record", "RecordSchema", "RegistryError", "RunContext",
           "find_option", "loss_name", "metrics", "option_name", "options", "register", "unregister", "BUILT_IN"]
