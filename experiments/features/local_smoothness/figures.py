"""The per-pass sharpness (λ_max of the train-mode Hessian on the fixed sample, ``smoothness`` records) against 2/η."""
from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from experiments.analysis.figures import (curve_labels, figure_grid, legend, run_palette, seeds_and_mean)
from experiments.analysis.load import select
from experiments.analysis.plots import FigureWriter
from experiments.plotstyle import styled


def has_pass_sharpness(df: pd.DataFrame, runs: pd.DataFrame) -> bool:
    """Whether some run recorded its sharpness per pass (``smoothness`` records): ``sharpness`` applies."""
    return not select(df, "smoothness", "sharpness")["value"].dropna().empty


@styled
def sharpness(df: pd.DataFrame, runs: pd.DataFrame, smooth: int = 1, include_unfinished: bool = False) -> Figure:
    """Top Hessian eigenvalue per epoch with the 2/η line of Cohen et al. (2021), and the caveat that goes with it.

    2/η is the stability threshold of *full-batch* gradient descent without momentum. The per-pass sharpness of an
    SGD study is measured on a fixed sample (``--sharpness-samples``, 256 images by default) while training takes
    minibatch steps, a different quantity from GD's threshold: the figure says so in its title. The step-wise
    sharpness of a full-batch study is drawn by ``eos_figures`` instead. None when no run recorded it per pass."""
    if not has_pass_sharpness(df, runs):
        return None
    values = select(df, "smoothness", "sharpness")["value"].dropna()
    runs = curve_labels(runs, include_unfinished=include_unfinished)
    palette = run_palette(runs)
    fig, (ax,) = figure_grid(1, width=6.5, height=4.5)
    banded = seeds_and_mean(ax, df, runs, palette, "smoothness", "sharpness", "epoch", smooth,
                             "sharpness λ_max(∇²L)", "Sharpness vs the edge of stability")
    fig.suptitle("Caveat: 2/η is the threshold of full-batch GD; these runs take minibatch steps and the "
                 "sharpness is measured on a fixed sample,\nso a crossing here is not Cohen et al.'s edge of "
                 "stability (for that: smoothness-lab run --study edge-of-stability)", fontsize="small")
    if runs["lr"].nunique() > 1 and len(values) and (values > 0).all():
        ax.set_yscale("log")  # several lrs: sharpness and 2/η span decades
    for lr in sorted(runs["lr"].dropna().unique()):
        ax.axhline(2 / lr, ls="--", color="0.3", lw=1.2)
        ax.annotate(f"2/η = {2 / lr:g}", (1.0, 2 / lr), xycoords=("axes fraction", "data"), ha="right",
                    va="bottom", color="0.3")
    legend(fig, palette, runs, bool(banded),
            [Line2D([], [], ls="--", color="0.3", label="2/η: edge of stability (Cohen et al. 2021)")])
    return fig


def _draw(df, runs, smooth, include_unfinished):
    return sharpness(df, runs, include_unfinished=include_unfinished)


SHARPNESS = FigureWriter("sharpness", has_pass_sharpness, _draw)
