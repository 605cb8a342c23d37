"""Figures of a study: seaborn on the long-form table, mean over seeds with 95% bootstrap CI bands.

Every figure function takes ``(df, runs)`` from ``load`` / ``load_runs`` and returns a matplotlib Figure drawn on the
Agg canvas (no display, no pyplot state). Curves are smoothed per run with a centred rolling mean over ``smooth``
consecutive records (as Santurkar et al. do for Fig. 4; capped at a fifth of the run's records) before averaging
over seeds. Diverged runs are drawn up to
their last finite record and marked × at the top of the axes at their divergence step/epoch; legends give the number
of runs per curve and how many of them diverged or are unfinished.
"""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.transforms import blended_transform_factory

from ..plotstyle import styled
from .load import AnalysisError, model_order, read_study, records_frame, runs_frame, select
from .metrics import METRICS, run_metrics

SMOOTH = 5            # probes (or epochs) per centred rolling mean
SMOOTH_STEPS = 25     # SGD steps per rolling mean of the per-step training loss
MAX_POINTS = 300      # x positions per curve after smoothing: bootstrapping every step of a long run is slow
ERRORBAR = ("ci", 95)
N_BOOT, BOOT_SEED = 1000, 0
DPI = 200
STEP, EPOCH = "SGD step", "epoch (passes over the training subset)"
GRAD_DIFF = "‖∇L(w+s·d) − ∇L(w)‖₂"


def _figure(ncols: int, width: float = 5.5, height: float = 4.0):
    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _legend_label(name: str, statuses: pd.Series) -> str:
    extra = [f"{(statuses == s).sum()} {s}{' ×' if s == 'diverged' else ''}"
             for s in ("diverged", "unfinished") if (statuses == s).any()]
    return f"{name} (n={len(statuses)}{'; ' + ', '.join(extra) if extra else ''})"


def curve_labels(runs: pd.DataFrame, by_lr: bool | None = None) -> pd.DataFrame:
    """``runs`` plus a ``label`` column naming its curve: the model (and lr, when the study has several)."""
    runs = runs.copy()
    if by_lr is None:
        by_lr = runs["lr"].nunique() > 1
    runs["group"] = [f"{m}, η={lr:g}" if by_lr else m for m, lr in zip(runs["model"], runs["lr"])]
    labels = {g: _legend_label(g, sub["status"]) for g, sub in runs.groupby("group", sort=False)}
    runs["label"] = runs["group"].map(labels)
    return runs


def _palette(runs: pd.DataFrame) -> dict:
    rank = {m: i for i, m in enumerate(model_order(runs["model"]))}
    order = list(dict.fromkeys(runs.sort_values(["model", "lr"], key=lambda c: c.map(rank) if c.name == "model"
                                                else c)["label"]))
    return dict(zip(order, sns.color_palette("colorblind", len(order))))


def _legend(fig: Figure, palette: dict, extra=()):
    handles = [Line2D([], [], color=c, lw=2, label=lab) for lab, c in palette.items()] + list(extra)
    fig.legend(handles=handles, loc="outside lower center", ncols=min(3, len(handles)), frameon=False)


def _rows(df, runs, kind, metric, x, smooth):
    """One metric's rows with a ``label`` column, smoothed per run along ``x`` and thinned to MAX_POINTS."""
    d = select(df, kind, metric).dropna(subset=["value", x])
    d = d.merge(runs[["run", "label"]], on="run").astype({x: float}).sort_values(["run", x])
    if d.empty:
        return d
    if smooth > 1:  # a short run gets a shorter window, so its curve keeps its shape
        d["value"] = d.groupby("run")["value"].transform(
            lambda v: v.rolling(min(smooth, max(1, len(v) // 5)), min_periods=1, center=True).mean())
    xs = np.sort(d[x].unique())
    keep = xs[:: max(1, math.ceil(len(xs) / MAX_POINTS))]
    return d[d[x].isin(keep)]


def _empty(ax, what: str):
    ax.text(0.5, 0.5, f"no {what} records", ha="center", va="center", transform=ax.transAxes)


def _mark_divergence(ax, runs, palette, x):
    col = "diverged_step" if x == "step" else "diverged_epoch"
    top = blended_transform_factory(ax.transData, ax.transAxes)
    for _, r in runs[runs["status"] == "diverged"].dropna(subset=[col]).iterrows():
        ax.plot([float(r[col])], [1.0], marker="x", ms=9, mew=2, color=palette[r["label"]], transform=top,
                clip_on=False, zorder=5)


def _mean_ci(ax, df, runs, palette, kind, metric, x, smooth, ylabel, title):
    ax.set_title(title)
    d = _rows(df, runs, kind, metric, x, smooth)
    if d.empty:
        return _empty(ax, f"{kind} {metric}")
    sns.lineplot(data=d, x=x, y="value", hue="label", hue_order=list(palette), palette=palette,
                 errorbar=ERRORBAR, n_boot=N_BOOT, seed=BOOT_SEED, ax=ax, legend=False)
    ax.set(xlabel=STEP if x == "step" else EPOCH, ylabel=ylabel, title=f"{title} [BN: {d['bn_mode'].iloc[0]}]")
    _mark_divergence(ax, runs, palette, x)
    return True


def _band(ax, df, runs, palette, lo, hi, smooth, ylabel, title):
    """Shade, per curve, between the seed-mean of ``lo`` and the seed-mean of ``hi`` at each probe step."""
    ax.set_title(title)
    parts = [_rows(df, runs, "probe", m, "step", smooth) for m in (lo, hi)]
    if parts[0].empty or parts[1].empty:
        return _empty(ax, f"probe {lo}/{hi}")
    mean = [p.groupby(["label", "step"])["value"].mean() for p in parts]
    both = pd.concat(mean, axis=1, keys=["lo", "hi"]).dropna().reset_index()
    for label, g in both.groupby("label", sort=False):
        c = palette[label]
        ax.fill_between(g["step"], g["lo"], g["hi"], color=c, alpha=0.25, lw=0)
        ax.plot(g["step"], g["lo"], color=c, lw=1.5)
        ax.plot(g["step"], g["hi"], color=c, lw=1.5)
    ax.set(xlabel=STEP, ylabel=ylabel, title=f"{title} [BN: {parts[0]['bn_mode'].iloc[0]}]")
    _mark_divergence(ax, runs, palette, "step")


@styled
def santurkar_fig4(df: pd.DataFrame, runs: pd.DataFrame, smooth: int = SMOOTH) -> Figure:
    """(a) loss landscape band, (b) gradient predictiveness band, (c) effective β (mean ± 95% CI) over steps."""
    runs = curve_labels(runs)
    palette = _palette(runs)
    fig, (a, b, c) = _figure(3)
    _band(a, df, runs, palette, "loss_min", "loss_max", smooth, "loss L(w+s·d) (cross-entropy)",
          "(a) loss landscape")
    _band(b, df, runs, palette, "grad_pred_min", "grad_pred_max", smooth, GRAD_DIFF, "(b) gradient predictiveness")
    _mean_ci(c, df, runs, palette, "probe", "effective_beta", "step", smooth,
             "max_s " + GRAD_DIFF + " / ‖s·d‖₂", "(c) “effective” β-smoothness")
    fig.suptitle(f"Along d = −∇L(w): bands span min..max over probe step sizes s (means over seeds); "
                 f"rolling mean over {smooth} probes")
    _legend(fig, palette)
    return fig


@styled
def sharpness(df: pd.DataFrame, runs: pd.DataFrame, smooth: int = 1) -> Figure:
    """Top Hessian eigenvalue per epoch with the 2/η edge-of-stability line (Cohen et al. 2021)."""
    runs = curve_labels(runs)
    palette = _palette(runs)
    fig, (ax,) = _figure(1, width=6.5, height=4.5)
    _mean_ci(ax, df, runs, palette, "smoothness", "sharpness", "epoch", smooth, "sharpness λ_max(∇²L)",
             "Sharpness vs the edge of stability")
    for lr in sorted(runs["lr"].dropna().unique()):
        ax.axhline(2 / lr, ls="--", color="0.3", lw=1.2)
        ax.annotate(f"2/η = {2 / lr:g}", (1.0, 2 / lr), xycoords=("axes fraction", "data"), ha="right",
                    va="bottom", color="0.3")
    _legend(fig, palette, [Line2D([], [], ls="--", color="0.3", label="2/η: edge of stability (Cohen et al. 2021)")])
    return fig


@styled
def seed_homework(df: pd.DataFrame, runs: pd.DataFrame, smooth_steps: int = SMOOTH_STEPS) -> Figure:
    """Training loss per step (rolling mean), test accuracy and local smoothness per epoch."""
    runs = curve_labels(runs)
    palette = _palette(runs)
    fig, (a, b, c) = _figure(3)
    title = f"(a) train loss, rolling mean ≤{smooth_steps} steps"
    if _mean_ci(a, df, runs, palette, "step", "loss", "step", smooth_steps, "training loss (cross-entropy, log scale)",
                title):
        a.set_yscale("log")
    _mean_ci(b, df, runs, palette, "eval", "test_accuracy", "epoch", 1, "test accuracy", "(b) test accuracy")
    _mean_ci(c, df, runs, palette, "smoothness", "local_smoothness", "epoch", 1,
             "‖∇f(w+u) − ∇f(w)‖₂ / ‖u‖₂", "(c) local smoothness, u = −η·g")
    _legend(fig, palette)
    return fig


@styled
def lr_sweep(df: pd.DataFrame, runs: pd.DataFrame) -> Figure | None:
    """Final test accuracy and median effective β vs learning rate (Santurkar Fig. 1 style); None if < 2 lrs."""
    if runs["lr"].nunique() < 2:
        return None
    runs = curve_labels(runs, by_lr=False)
    palette = _palette(runs)
    per_run = run_metrics(df).merge(runs[["run", "label"]], on="run")
    fig, axes = _figure(2)
    panels = [("final_test_accuracy", "final test accuracy"), ("effective_beta_median", "median effective β")]
    for ax, (name, ylabel) in zip(axes, panels):
        ok = per_run[per_run["status"] != "diverged"].dropna(subset=[name])
        if ok.empty:
            _empty(ax, name)
        else:
            sns.lineplot(data=ok, x="lr", y=name, hue="label", hue_order=list(palette), palette=palette,
                         errorbar=ERRORBAR, n_boot=N_BOOT, seed=BOOT_SEED, err_style="bars", marker="o",
                         ax=ax, legend=False)
        top = blended_transform_factory(ax.transData, ax.transAxes)
        for _, r in runs[runs["status"] == "diverged"].iterrows():
            ax.plot([r["lr"]], [1.0], marker="x", ms=9, mew=2, color=palette[r["label"]], transform=top,
                    clip_on=False, zorder=5)
        ax.set_xscale("log")
        ax.set(xlabel="learning rate η (log scale)", ylabel=ylabel)
    label = {m.name: m.label for m in METRICS}
    axes[0].set_title("(a) " + label["final_test_accuracy"])
    axes[1].set_title("(b) " + label["effective_beta_median"])
    marker = Line2D([], [], ls="", marker="x", color="0.3", mew=2, label="diverged run")
    _legend(fig, palette, [marker] if (runs["status"] == "diverged").any() else [])
    return fig


FIGURES = {"santurkar_fig4": santurkar_fig4, "sharpness": sharpness, "seed_homework": seed_homework,
           "lr_sweep": lr_sweep}


def save_figure(fig: Figure, out_dir, stem: str) -> list[Path]:
    """Write ``stem.png`` (dpi 200) and ``stem.pdf`` atomically: a temp file in ``out_dir``, then os.replace."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in ("png", "pdf"):
        fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{stem}.", suffix=f".{ext}.tmp")
        os.close(fd)
        try:
            # no creation date in the metadata: the same records give byte-identical files
            metadata = {"CreationDate": None} if ext == "pdf" else {"Software": None}
            fig.savefig(tmp, format=ext, dpi=DPI, bbox_inches="tight", metadata=metadata)
            os.replace(tmp, out_dir / f"{stem}.{ext}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        paths.append(out_dir / f"{stem}.{ext}")
    return paths


def plot_study(results_dir, out_dir=None, smooth: int = SMOOTH) -> list[Path]:
    """Make every applicable figure of a study; default ``out_dir`` is ``results_dir/figures``. Returns the paths."""
    study = read_study(results_dir)  # raises AnalysisError before anything is written
    df, runs = records_frame(study), runs_frame(study)
    if df.empty:
        raise AnalysisError(f"{results_dir}: no run has any records yet; nothing to plot")
    out_dir = Path(results_dir) / "figures" if out_dir is None else Path(out_dir)
    figures = {"santurkar_fig4": santurkar_fig4(df, runs, smooth=smooth), "sharpness": sharpness(df, runs),
               "seed_homework": seed_homework(df, runs), "lr_sweep": lr_sweep(df, runs)}
    paths = []
    for stem, fig in figures.items():
        if fig is not None:
            paths += save_figure(fig, out_dir, stem)
    return paths
