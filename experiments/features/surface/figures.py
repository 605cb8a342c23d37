"""Figures of the loss surfaces stored beside runs (``experiments.features.surface.grid``): 2-D contours, 1-D curves and init → final
interpolations, every model side by side with the same direction seed, normalisation and grid.

Contours follow tomgoldstein/loss-landscape's ``plot_2D.py``: lines at ``levels = numpy.arange(vmin, vmax, vlevel)``
(defaults vmin 0.1, vmax 10, vlevel 0.5, as there), labelled inline; the same levels in every panel, so the spacing of
the lines compares the models directly. Cells not computed yet (or non-finite) are left blank and the panel title
says how many points it holds. Figures are written by ``figures.save_figure`` (PNG + PDF, no dates in the metadata,
so the same arrays give byte-identical files).
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import seaborn as sns
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from experiments.plotstyle import styled
from experiments.features.surface.grid import StoredSurface
from experiments.analysis.figures import save_figure
from experiments.analysis.load import AnalysisError, model_order

VMIN, VMAX, VLEVEL = 0.1, 10.0, 0.5   # loss-landscape's plot_2D.py defaults
MAX_LEVELS = 200                      # matplotlib takes minutes to draw and label thousands of contour lines


def check_levels(vmin: float, vmax: float, vlevel: float) -> None:
    """Refuse contour levels that cannot be drawn: non-finite, empty, or too many lines."""
    if not all(np.isfinite([vmin, vmax, vlevel])):
        raise AnalysisError(f"--vmin, --vmax and --vlevel must be finite numbers, got {vmin}, {vmax}, {vlevel}")
    if not (vmin < vmax and vlevel > 0):
        raise AnalysisError(f"contour levels need --vmin < --vmax and --vlevel > 0, got {vmin}, {vmax}, {vlevel}")
    n = (vmax - vmin) / vlevel
    if n > MAX_LEVELS:
        raise AnalysisError(f"--vmin {vmin:g} --vmax {vmax:g} --vlevel {vlevel:g} asks for {n:.3g} contour lines; "
                            f"at most {MAX_LEVELS} can be drawn: use --vlevel {(vmax - vmin) / MAX_LEVELS:.3g} or "
                            f"more, or a narrower --vmin/--vmax")


def _label(spec: dict, by_lr: bool) -> str:
    from experiments.models import MODELS
    model, norm = spec["model"], spec["norm"]
    name = model if model in MODELS and MODELS[model].default_norm == norm else f"{model}:{norm}"
    return f"{name}, η={spec['lr']:g}" if by_lr else name


def _columns(surfaces: Sequence[StoredSurface]) -> Dict[str, List[StoredSurface]]:
    """Surfaces grouped by model (and lr, when several), models in the study's order, seeds sorted."""
    by_lr = len({s.spec["lr"] for s in surfaces}) > 1
    groups: Dict[str, List[StoredSurface]] = defaultdict(list)
    for s in surfaces:
        groups[_label(s.spec, by_lr)].append(s)
    rank = {m: i for i, m in enumerate(model_order(s.spec["model"] for s in surfaces))}
    order = sorted(groups, key=lambda g: (rank[groups[g][0].spec["model"]], g))
    return {g: sorted(groups[g], key=lambda s: s.spec["seed"]) for g in order}


def _figure(nrows: int, ncols: int, width: float, height: float, **kw):
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False, **kw)


def _points(s: StoredSurface) -> str:
    return "" if s.complete else f" [{int(s.done.sum())}/{s.done.size} points]"


def _loss(spec: dict) -> str:
    """The loss the surface was evaluated with: the run's training loss (config.json's ``loss``)."""
    return f"training loss ({spec['loss']})"


def _setting(spec: dict) -> str:
    bn = spec["bn_mode"] + ("" if spec["bn_mode"] == "batch" else f", {spec['bn_stats']} BN statistics")
    return f"BN {bn}; {spec['samples'] or 'all'} training images"


@styled
def contour_figure(surfaces: Sequence[StoredSurface], *, vmin: float = VMIN, vmax: float = VMAX,
                   vlevel: float = VLEVEL) -> Figure:
    """2-D surfaces: a column per model, a row per seed; contour lines at arange(vmin, vmax, vlevel)."""
    columns = _columns(surfaces)
    nrows = max(len(v) for v in columns.values())
    fig, axes = _figure(nrows, len(columns), 4.2, 4.0, sharex=True, sharey=True)
    levels = np.arange(vmin, vmax, vlevel)
    spec = surfaces[0].spec
    for c, (label, runs) in enumerate(columns.items()):
        for r in range(nrows):
            ax = axes[r][c]
            if r >= len(runs):
                ax.set_axis_off()
                continue
            s = runs[r]
            z = np.ma.masked_where(~s.done.T | ~np.isfinite(s.losses.T), s.losses.T)  # losses[i, j] is at (x_i, y_j)
            X, Y = np.meshgrid(s.x, s.y)
            if z.count() and z.min() < levels[-1] and z.max() > levels[0]:
                cs = ax.contour(X, Y, z, levels=levels, cmap="viridis", linewidths=1.0)
                ax.clabel(cs, inline=True, fontsize=7, fmt="%g")
            else:
                ax.text(0.5, 0.5, "no contour level in range", ha="center", va="center", transform=ax.transAxes)
            ax.plot([0], [0], marker="+", ms=10, mew=1.5, color="black")
            ax.set_aspect("equal")
            ax.set_title(f"{label}, seed {s.spec['seed']}{_points(s)}", fontsize="medium")
            if r == nrows - 1:
                ax.set_xlabel("α (direction 1)")
            if c == 0:
                ax.set_ylabel("β (direction 2)")
    fig.suptitle(f"{_loss(spec).capitalize()} L(w + αd₁ + βd₂) at {spec['epoch']} weights, "
                 f"{spec['normalize']}-normalised directions (seed {spec['direction_seed']}); lines every {vlevel:g} "
                 f"from {vmin:g}\n{_setting(spec)}; + = w", fontsize="medium")
    return fig


@styled
def curves_figure(surfaces: Sequence[StoredSurface]) -> Figure:
    """1-D surfaces: a column per model; loss (top) and accuracy (bottom) against α, a line per seed."""
    columns = _columns(surfaces)
    fig, axes = _figure(2, len(columns), 4.5, 3.2, sharex=True, sharey="row")
    seeds = sorted({s.spec["seed"] for s in surfaces})
    palette = dict(zip(seeds, sns.color_palette("colorblind", len(seeds))))
    spec = surfaces[0].spec
    for c, (label, runs) in enumerate(columns.items()):
        for s in runs:
            ok = s.done
            axes[0][c].plot(s.x[ok], s.losses[ok], color=palette[s.spec["seed"]], lw=1.5)
            axes[1][c].plot(s.x[ok], s.accuracies[ok], color=palette[s.spec["seed"]], lw=1.5)
        axes[0][c].set_title(label + "".join(_points(s) for s in runs[:1]), fontsize="medium")
        axes[1][c].set_xlabel("α")
        for ax in axes[:, c]:
            ax.axvline(0, color="0.5", lw=0.8, ls=":")
    axes[0][0].set_ylabel(_loss(spec))
    axes[1][0].set_ylabel("training accuracy")
    handles = [Line2D([], [], color=col, lw=2, label=f"seed {seed}") for seed, col in palette.items()]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(6, len(handles)), frameon=False)
    fig.suptitle(f"L(w + αd) at {spec['epoch']} weights, {spec['normalize']}-normalised direction "
                 f"(seed {spec['direction_seed']})\n{_setting(spec)}", fontsize="medium")
    return fig


@styled
def interpolation_figure(surfaces: Sequence[StoredSurface]) -> Figure:
    """Init → final interpolation of every run: loss and accuracy against α, a colour per model."""
    columns = _columns(surfaces)
    palette = dict(zip(columns, sns.color_palette("colorblind", len(columns))))
    fig, axes = _figure(1, 2, 5.0, 3.8)
    (loss_ax, acc_ax) = axes[0]
    spec = surfaces[0].spec
    for label, runs in columns.items():
        for s in runs:
            ok = s.done
            loss_ax.plot(s.x[ok], s.losses[ok], color=palette[label], lw=1.5, alpha=0.85)
            acc_ax.plot(s.x[ok], s.accuracies[ok], color=palette[label], lw=1.5, alpha=0.85)
    for ax, ylabel in ((loss_ax, _loss(spec)), (acc_ax, "training accuracy")):
        for a in (0, 1):
            ax.axvline(a, color="0.5", lw=0.8, ls=":")
        ax.set(xlabel="α  (0 = initial weights, 1 = final weights)", ylabel=ylabel)
    loss_ax.set_title("(a) L((1 − α)·w_init + α·w_final)", fontsize="medium")
    acc_ax.set_title("(b) accuracy", fontsize="medium")
    handles = [Line2D([], [], color=col, lw=2, label=f"{lab} (n={len(columns[lab])})") for lab, col in palette.items()]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(4, len(handles)), frameon=False)
    fig.suptitle(f"Linear interpolation between initial and final weights; {_setting(spec)}"
                 + ("" if spec["bn_mode"] == "batch" or spec["bn_stats"] == "recompute"
                    else " (final weights' statistics)"), fontsize="medium")
    return fig


def _same_setting(surfaces: Sequence[StoredSurface]) -> None:
    keys = ("kind", "loss", "epoch", "dim", "grid", "lo", "hi", "samples", "bn_mode", "bn_stats", "direction_seed",
            "normalize", "ignore")
    settings = {tuple(s.spec[k] for k in keys) for s in surfaces}
    if len(settings) > 1:
        raise AnalysisError("surfaces drawn together must share the loss and every option (grid, range, samples, BN handling, "
                            "direction seed, normalisation); got several settings: "
                            + "; ".join(str(dict(zip(keys, t))) for t in sorted(settings, key=str)))


def plot_surfaces(surfaces: Sequence[StoredSurface], out_dir, *, vmin: float = VMIN, vmax: float = VMAX,
                  vlevel: float = VLEVEL) -> List[Path]:
    """Draw one figure from surfaces computed with the same options; named after their file stem."""
    if not surfaces:
        raise AnalysisError("no surfaces to draw")
    check_levels(vmin, vmax, vlevel)
    _same_setting(surfaces)
    spec = surfaces[0].spec
    if spec["kind"] == "interpolation":
        fig = interpolation_figure(surfaces)
    elif spec["dim"] == 2:
        fig = contour_figure(surfaces, vmin=vmin, vmax=vmax, vlevel=vlevel)
    else:
        fig = curves_figure(surfaces)
    return save_figure(fig, out_dir, surfaces[0].path.stem)
