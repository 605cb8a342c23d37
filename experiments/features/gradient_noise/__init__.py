"""Gradient noise and step quality along training (Cockpit's instruments, well defined with BatchNorm): the gradient
tests, the GSNR, the noise scale and α, with a per-run dashboard and `smoothness-lab watch`."""
from experiments.features.base import Feature
from experiments.features.gradient_noise.measurement import GRADIENT_NOISE

FEATURE = Feature("gradient_noise", "gradient tests, GSNR, noise scale, step quality α (--gradient-noise-every)",
                  measurement=GRADIENT_NOISE, figures=("experiments.features.gradient_noise.figures:DASHBOARDS",),
                  commands=("experiments.features.gradient_noise.watch:watch_command",))
