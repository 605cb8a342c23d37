"""The measurements along training, one object each (base.py), registered here in loop order: at a point (an
evaluation), the evaluation, the spectrum, the per-pass smoothness record, the per-layer curvature, the generalisation measures and the target
stop run in this order, as the records they write. A measurement defined elsewhere is added with `register`."""
from __future__ import annotations

from .base import (MEASUREMENTS, Measurement, Metric, Option, Record, RecordSchema, RegistryError, RunContext,
                   find_option, loss_name, metrics, option_name, options, register, unregister)
from .evaluation import EVALUATION
from .generalization import GENERALIZATION
from .per_layer import PER_LAYER
from .probe import PROBE
from .sharpness import SHARPNESS
from .smoothness import SMOOTHNESS
from .spectrum import SPECTRUM
from .step import STEP
from . import base

for _m in (STEP, EVALUATION, PROBE, SHARPNESS, SPECTRUM, SMOOTHNESS, PER_LAYER, GENERALIZATION):
    register(_m)
BUILT_IN = base.freeze_built_in()

__all__ = ["MEASUREMENTS", "Measurement", "Metric", "Option", "Record", "RecordSchema", "RegistryError", "RunContext",
           "find_option", "loss_name", "metrics", "option_name", "options", "register", "unregister", "BUILT_IN"]
