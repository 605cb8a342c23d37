"""Santurkar et al.'s Fig. 4 from the ``probe`` records: the loss landscape band, the gradient predictiveness band and
the effective β along training, one thin line per seed and the mean over finished runs bold."""
from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure

from experiments.analysis.figures import (BAND_MIN_N, GRAD_DIFF, SMOOTH, band, curve_labels, figure_grid, legend,
                                          loss_name, run_palette, seeds_and_mean)
from experiments.analysis.plots import FigureWriter, always
from experiments.plotstyle import styled


@styled
def santurkar_fig4(df: pd.DataFrame, runs: pd.DataFrame, smooth: int = SMOOTH,
                   include_unfinished: bool = False) -> Figure:
    """(a) loss landscape band, (b) gradient predictiveness band, (c) effective β over steps, per seed and mean."""
    runs = curve_labels(runs, include_unfinished=include_unfinished)
    palette = run_palette(runs)
    fig, (a, b, c) = figure_grid(3)
    band(a, df, runs, palette, "loss_min", "loss_max", smooth, f"loss L(w+s·d) ({loss_name(df)})",
          "(a) loss landscape")
    band(b, df, runs, palette, "grad_pred_min", "grad_pred_max", smooth, GRAD_DIFF, "(b) gradient predictiveness")
    banded = seeds_and_mean(c, df, runs, palette, "probe", "effective_beta", "step", smooth,
                             "effective β: max over s of ratio", "(c) “effective” β-smoothness")
    fig.suptitle(f"Along d = −∇L(w); (a), (b): shading spans min..max over probe step sizes s (means over finished "
                 f"runs); (c) ratio = {GRAD_DIFF} / ‖s·d‖₂; rolling mean over {smooth} probes")
    shading = "shading: (a), (b) min..max over step sizes s (means over finished runs)"
    if banded:
        shading += f"; (c) 95% t-interval of the mean (n ≥ {BAND_MIN_N})"
    legend(fig, palette, runs, True, band_label=shading)
    return fig


SANTURKAR_FIG4 = FigureWriter("santurkar_fig4", always, santurkar_fig4)
