"""λ_max of the train-mode Hessian every --sharpness-every steps (the "sharpness" of the edge-of-stability
literature; perturbation sharpness is the generalisation feature's), with the optimizer's stability threshold."""
from experiments.features.base import Feature
from experiments.features.lambda_max.measurement import SHARPNESS

FEATURE = Feature("lambda_max", "step-wise λ_max and the stability threshold (edge of stability)", measurement=SHARPNESS,
                  figures=("experiments.features.lambda_max.eos:EOS",))
