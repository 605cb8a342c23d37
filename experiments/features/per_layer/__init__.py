"""Per-layer curvature: λ_max and trace of each module's block of the Hessian and the GGN, and λ_min."""
from experiments.features.base import Feature
from experiments.features.per_layer.measurement import PER_LAYER

FEATURE = Feature("per_layer", "per-module Hessian/GGN block curvature and the Hessian's λ_min (--per-layer)",
                  measurement=PER_LAYER, figures=("experiments.features.per_layer.figures:PER_LAYER",),
                  commands=("experiments.features.per_layer.command:per_layer_command",))
