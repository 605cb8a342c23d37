"""The features of the toolkit, one package each, registered here in loop order (a feature's hooks and records come
after those of the features before it). Each package's ``FEATURE`` (``base.Feature``) declares its measurement along
training (options, records, hooks, report metrics), its figures, its report section and its commands; the CLI,
``plot``, ``report``, ``status`` and the run store read them from this registry. A feature defined elsewhere is
added with `register` (docs/ARCHITECTURE.md, "Add a feature")."""
from __future__ import annotations

from experiments.features import base
from experiments.features.base import (FEATURES, MEASUREMENTS, Feature, Measurement, Metric, Option, Record,
                                       RecordSchema, RegistryError, RunContext, find_option, loss_name, metrics,
                                       option_name, options, register, resolve, unregister)
from experiments.features.diagnostics import FEATURE as DIAGNOSTICS
from experiments.features.evaluation import FEATURE as EVALUATION
from experiments.features.generalization import FEATURE as GENERALIZATION
from experiments.features.gradient_noise import FEATURE as GRADIENT_NOISE
from experiments.features.lambda_max import FEATURE as SHARPNESS
from experiments.features.local_smoothness import FEATURE as SMOOTHNESS
from experiments.features.per_layer import FEATURE as PER_LAYER
from experiments.features.probe import FEATURE as PROBE
from experiments.features.spectrum import FEATURE as SPECTRUM
from experiments.features.step import STEP
from experiments.features.surface import FEATURE as SURFACE

for _f in (STEP, EVALUATION, PROBE, SHARPNESS, SPECTRUM, SMOOTHNESS, PER_LAYER, GENERALIZATION, GRADIENT_NOISE, SURFACE,
           DIAGNOSTICS):
    register(_f)
BUILT_IN = base.freeze_built_in()

__all__ = ["FEATURES", "MEASUREMENTS", "Feature", "Measurement", "Metric", "Option", "Record", "RecordSchema",
           "RegistryError", "RunContext", "find_option", "loss_name", "metrics", "option_name", "options", "register",
           "resolve", "unregister", "BUILT_IN"]
