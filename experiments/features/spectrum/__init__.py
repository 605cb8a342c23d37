"""The Hessian spectrum along training: density, top eigenvalues, gradient concentration, in both BN modes."""
from experiments.features.base import Feature
from experiments.features.spectrum.measurement import SPECTRUM

FEATURE = Feature("spectrum", "Hessian eigenvalue density, top-10 and gradient concentration (--spectrum-every)",
                  measurement=SPECTRUM, figures=("experiments.features.spectrum.figures:SPECTRUM",),
                  commands=("experiments.features.spectrum.command:spectrum_command",))
