"""Figures of sharpness versus generalisation (``generalization``), drawn in the project style, saved PNG + PDF.

- ``measure_vs_gap``: one panel per measure, the measure against the gap, one dot per run; colour = ``hue`` (BN on
  or off, or the first axis), marker = learning rate. Runs that did not reach the target are drawn as grey × and
  enter no coefficient; each panel's title gives τ and Ψ.
- ``coefficients``: τ and Ψ per measure as bars, with their cluster-bootstrap intervals as error bars.

Nothing random is drawn and ``save_figure`` writes no date, so the same table gives byte-identical files.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from experiments.plotstyle import styled
from experiments.analysis.figures import save_figure
from experiments.features.generalization.kendall import CONFIDENCE
from experiments.features.generalization.report import MeasureResult

NOT_REACHED = "did not reach the target (excluded)"


MAX_COLUMNS = 4


def _new_figure(n: int, width: float, height: float) -> tuple[Figure, list]:
    """``n`` panels in rows of at most ``MAX_COLUMNS``; the unused panels of the last row are hidden."""
    ncols = min(n, MAX_COLUMNS)
    nrows = -(-n // ncols)
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = list(fig.subplots(nrows, ncols, squeeze=False).ravel())
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _label(column: str, values: pd.Series) -> pd.Series:
    return values.map(lambda v: f"{column}={v:g}" if isinstance(v, (float, np.floating)) else f"{column}={v}")


@styled
def measure_vs_gap(df: pd.DataFrame, results: dict[str, MeasureResult], hue: str, gap: str = "gap",
                   gap_label: str = "generalisation gap", lr: str | None = "lr") -> Figure:
    """One panel per measure of ``results``: measure (x; log scale when positive over > 2 decades) vs gap (y)."""
    measures = list(results)
    fig, axes = _new_figure(len(measures), 4.5, 4.2)
    d = df.assign(_hue=_label(hue, df[hue]))
    hue_order = [_label(hue, pd.Series([v])).iloc[0] for v in sorted(df[hue].unique())]
    style = style_order = None
    if lr is not None and lr in df.columns:
        d["_style"] = _label("η", df[lr])
        style, style_order = "_style", [_label("η", pd.Series([v])).iloc[0] for v in sorted(df[lr].unique())]
    palette = dict(zip(hue_order, sns.color_palette("colorblind", len(hue_order))))
    for ax, m in zip(axes, measures):
        reached = d[d["reached"]].dropna(subset=[m, gap])
        sns.scatterplot(data=reached, x=m, y=gap, hue="_hue", hue_order=hue_order, style=style,
                        style_order=style_order, palette=palette, s=45, ax=ax, legend=ax is axes[0])
        out = d[~d["reached"]].dropna(subset=[m, gap])
        ax.plot(out[m], out[gap], ls="", marker="x", ms=7, mew=1.5, color="0.55")
        x = d[m].dropna()
        if len(x) and (x > 0).all() and x.max() / x.min() > 100:
            ax.set_xscale("log")
        else:  # at most 5 ticks, small or large values as a ×10ⁿ offset: labels such as 0.00075 would overlap
            ax.xaxis.set_major_locator(MaxNLocator(nbins=5))
            ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 3), useMathText=True)
        r = results[m]
        ax.set(xlabel=m, ylabel=gap_label if axes.index(ax) % MAX_COLUMNS == 0 else "",
               title=f"{m}\nτ = {r.tau.value:.2f}, Ψ = {r.granulated.value:.2f} (n={r.tau.n})")
    handles, labels = axes[0].get_legend_handles_labels()
    if axes[0].get_legend() is not None:
        axes[0].get_legend().remove()
    if not d["reached"].all():
        handles.append(Line2D([], [], ls="", marker="x", ms=7, mew=1.5, color="0.55"))
        labels.append(NOT_REACHED)
    fig.legend(handles, labels, loc="outside right center", frameon=False)
    return fig


@styled
def coefficients(results: dict[str, MeasureResult]) -> Figure:
    """Bars of τ and Ψ per measure; error bars: the percentile cluster-bootstrap intervals (``kendall``)."""
    measures = list(results)
    fig, (ax,) = _new_figure(1, max(5.0, 1.1 * len(measures) + 2), 4.2)
    colours = sns.color_palette("colorblind", 2)
    x = np.arange(len(measures))
    for k, (name, value, interval) in enumerate((("τ", lambda r: r.tau.value, lambda r: r.boot.tau),
                                                  ("Ψ", lambda r: r.granulated.value, lambda r: r.boot.psi))):
        v = np.array([value(results[m]) for m in measures])
        lo = np.array([interval(results[m]).low for m in measures])
        hi = np.array([interval(results[m]).high for m in measures])
        err = np.vstack([np.where(np.isnan(lo), 0, v - lo), np.where(np.isnan(hi), 0, hi - v)])
        ax.bar(x + (k - 0.5) * 0.38, v, width=0.38, color=colours[k], label=name)
        ax.errorbar(x + (k - 0.5) * 0.38, v, yerr=np.maximum(err, 0), ls="", color="0.15", capsize=3, lw=1.2)
    ax.axhline(0, color="0.3", lw=0.8)
    ax.set_xticks(x, measures, rotation=30, ha="right")
    some = next(iter(results.values())).boot.tau
    ax.set(ylim=(-1.05, 1.05), ylabel="rank correlation with the gap",
           title=f"Kendall's τ and Jiang et al.'s Ψ\nerror bars: {CONFIDENCE:.0%} percentile cluster bootstrap over "
                 f"configurations ({some.n_resamples} resamples)")
    ax.legend(frameon=False)
    return fig


def write_figures(df: pd.DataFrame, results: dict[str, MeasureResult], out_dir, hue: str | None = None,
                  gap: str = "gap", gap_label: str = "generalisation gap", lr: str | None = "lr") -> list[Path]:
    """Save ``measure_vs_gap`` and ``generalization_coefficients`` (PNG + PDF) to ``out_dir``; return the paths.

    ``hue`` defaults to ``bn`` where the table has it, else to the first axis of the analysis that is not ``lr``.
    """
    if hue is None:
        axes = [a.axis for a in next(iter(results.values())).granulated.axes]
        hue = "bn" if "bn" in df.columns else next((a for a in axes if a != lr), axes[0])
    paths = save_figure(measure_vs_gap(df, results, hue, gap, gap_label, lr), out_dir, "measure_vs_gap")
    return paths + save_figure(coefficients(results), out_dir, "generalization_coefficients")
