"""The training curves every study gets (``seed_homework``: training loss per step, test loss and accuracy, local
smoothness) and, with several learning rates, the final metrics against the learning rate (``lr_sweep``); drawn by
``experiments.analysis.figures``, the study-wide curve helpers."""
from __future__ import annotations

from experiments.analysis.figures import lr_sweep, seed_homework, several_lrs
from experiments.analysis.plots import FigureWriter, always


def _seed_homework(df, runs, smooth, include_unfinished):
    return seed_homework(df, runs, include_unfinished=include_unfinished)


def _lr_sweep(df, runs, smooth, include_unfinished):
    return lr_sweep(df, runs, include_unfinished=include_unfinished)


SEED_HOMEWORK = FigureWriter("seed_homework", always, _seed_homework)
LR_SWEEP = FigureWriter("lr_sweep", several_lrs, _lr_sweep)
