"""Evaluation: training and test loss and accuracy in eval mode at every evaluation point, and the training curves."""
from experiments.features.base import Feature
from experiments.features.evaluation.measurement import EVALUATION

FEATURE = Feature("evaluation", "train/test loss and accuracy at every evaluation; training curves, the lr sweep",
                  measurement=EVALUATION,
                  figures=("experiments.features.evaluation.figures:SEED_HOMEWORK",
                           "experiments.features.evaluation.figures:LR_SWEEP"))
