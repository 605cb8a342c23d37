"""Loss surfaces and interpolations around a finished run's weights (Li et al. 2018), stored in the run folder."""
from experiments.features.base import Feature

FEATURE = Feature("surface", "1-D/2-D loss surfaces and interpolations of finished runs (smoothness-lab surface)",
                  commands=("experiments.features.surface.command:surface_command",))
