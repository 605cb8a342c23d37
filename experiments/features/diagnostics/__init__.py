"""The seed notebooks' diagnostics outside training runs: activation variance through a residual MLP, and internal
covariate shift along SGD (`smoothness-lab variance`, `smoothness-lab ics`)."""
from experiments.features.base import Feature

FEATURE = Feature("diagnostics", "activation variance (seed 002) and internal covariate shift (Santurkar Fig. 3/5)",
                  commands=("experiments.features.diagnostics.commands:variance_command",
                            "experiments.features.diagnostics.commands:ics_command"))
