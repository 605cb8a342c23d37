"""smoothness: estimators of loss-landscape smoothness over (model, loss_fn, data).

``data`` is one ``(inputs, targets)`` batch or an iterable of them (a list or a DataLoader; L is then the
sample-weighted mean of the chunks' mean losses, one chunk in memory at a time). Results are frozen dataclasses.

Every estimator leaves the model exactly as it found it and takes ``bn_mode``: ``"batch"`` differentiates the
train-mode loss (BatchNorm with batch statistics, the loss SGD optimises), ``"running"`` the eval-mode loss.
``nn.Dropout`` modules are always off (eval mode) inside estimators; dropout applied through a function
(``F.dropout(h, p, training=self.training)``) cannot be switched off and raises ``NondeterministicLossError`` in
``"batch"`` mode. Every evaluation runs with torch's CPU/CUDA generators seeded with ``ESTIMATOR_SEED`` (the caller's
generator states are restored), so every number is a deterministic function of w even with random modules such as
noisy BatchNorm; randomness out of that seed's reach raises ``NondeterministicLossError`` too.

Curvature estimators take ``kind`` (the Hessian, the generalised Gauss-Newton or the empirical Fisher), ``params`` (a
block of parameters) and ``group`` (data split across torch.distributed ranks), or a ``CurvatureOperator`` from
``curvature_operator`` in place of (model, loss_fn, data); the operator is also a scipy LinearOperator (see
``smoothness.operator``). Probe counts are ``n_probes``; ``n_samples`` counts Monte Carlo draws of a perturbation.
Generators are optional: the default is a fresh one seeded with ``ESTIMATOR_SEED``.
"""
from ._objective import BN_MODES, NonFiniteLossError
from ._rng import ESTIMATOR_SEED, NondeterministicLossError
from .concentration import ConcentrationResult, gradient_concentration
from .curvature import (DirectionalCurvature, EigenResult, TraceResult, directional_curvature, hessian_trace,
                        top_eigenvalues)
from .density import DensityResult, spectral_density
from .flatness import PacBayesFlatness, RelativeFlatness, pacbayes_flatness, pacbayes_mag_flatness, relative_flatness
from .gradient import loss_and_gradient
from .gradient_noise import GradientHistogram, GradientNoise, gradient_histogram, gradient_noise
from .ics import ICSResult, LayerShift, internal_covariate_shift
from .landscape import Surface, interpolation, loss_surface, random_direction
from .lipschitz import LocalLipschitz, local_lipschitz
from .weight_norms import DistanceToInit, PathNorm, SpectralProduct, distance_to_init, path_norm, spectral_product
from .operator import KINDS, CurvatureOperator, curvature_operator, hvp
from .preconditioned import preconditioned_top_eigenvalues
from .probes import LineProbe, line_probe
from .perturbation_sharpness import (AverageCaseSharpness, EpsilonSharpness, WorstCaseSharpness,
                                     average_case_sharpness, epsilon_sharpness, worst_case_sharpness)
from .step_quality import LineObservation, StepQuality, observe_line, step_quality, step_quality_from
from .tic import TakeuchiResult, tic

__all__ = [
    "ESTIMATOR_SEED", "NondeterministicLossError",
    "BN_MODES", "NonFiniteLossError", "loss_and_gradient", "LineProbe", "line_probe", "LocalLipschitz",
    "local_lipschitz", "hvp", "EigenResult", "TraceResult", "DirectionalCurvature", "top_eigenvalues",
    "hessian_trace", "directional_curvature", "ICSResult", "LayerShift",
    "internal_covariate_shift", "Surface", "random_direction", "loss_surface", "interpolation",
    "DensityResult", "spectral_density", "ConcentrationResult", "gradient_concentration",
    "preconditioned_top_eigenvalues",
    "WorstCaseSharpness", "AverageCaseSharpness", "EpsilonSharpness", "worst_case_sharpness",
    "average_case_sharpness", "epsilon_sharpness",
    "PacBayesFlatness", "RelativeFlatness", "pacbayes_flatness", "pacbayes_mag_flatness", "relative_flatness",
    "DistanceToInit", "SpectralProduct", "PathNorm", "distance_to_init", "spectral_product", "path_norm",
    "KINDS", "CurvatureOperator", "curvature_operator",
    "GradientNoise", "GradientHistogram", "gradient_noise", "gradient_histogram", "StepQuality", "step_quality",
    "LineObservation", "observe_line", "step_quality_from", "TakeuchiResult", "tic",
]
__version__ = "0.1.0"
