"""Figures of a study: every seed drawn as a thin line, the mean over the runs the report averages drawn bold.

Every figure function takes ``(df, runs)`` from ``load`` / ``load_runs`` and returns a matplotlib Figure on the Agg
canvas, byte-reproducible. Diverged and unfinished runs are drawn thin and enter no mean, as in the report; a 95%
band is drawn only where at least ``stats.BAND_MIN_N`` runs are averaged.

Details: docs/explanation/modules.md#analysis-figures
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import NullLocator
from matplotlib.transforms import blended_transform_factory

from experiments.atomic import atomic_write
from experiments.plotstyle import styled
from experiments.analysis.load import model_order, select
from experiments.analysis.metrics import METRICS, averaged, loss_name, run_metrics
from experiments.analysis.stats import BAND_MIN_N, t_halfwidth

SMOOTH = 5            # probes (or epochs) per centred rolling mean
SMOOTH_STEPS = 25     # SGD steps per rolling mean of the per-step training loss
MAX_POINTS = 300      # x positions per curve after smoothing
DPI = 200
SEED_LW, SEED_ALPHA, MEAN_LW = 0.8, 0.45, 2.2
STEP, EPOCH = "SGD step", "epoch (passes over the training subset)"
GRAD_DIFF = "‖∇L(w+s·d) − ∇L(w)‖₂"


def figure_grid(ncols: int, nrows: int = 1, width: float = 5.5, height: float = 4.0):
    """A Figure on the Agg canvas (no pyplot state) and its ``nrows x ncols`` axes as a flat list."""
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    return fig, list(axes)


def _legend_label(name: str, statuses: pd.Series) -> str:
    extra = [f"{(statuses == s).sum()} {s}{' ×' if s == 'diverged' else ''}"
             for s in ("diverged", "unfinished") if (statuses == s).any()]
    return f"{name} (n={len(statuses)}{'; ' + ', '.join(extra) if extra else ''})"


def curve_labels(runs: pd.DataFrame, by_lr: bool | None = None, include_unfinished: bool = False) -> pd.DataFrame:
    """``runs`` plus ``label`` (its curve: the model, and lr when the study has several) and ``averaged``."""
    runs = runs.copy()
    if by_lr is None:
        by_lr = runs["lr"].nunique() > 1
    runs["group"] = [f"{m}, η={lr:g}" if by_lr else m for m, lr in zip(runs["model"], runs["lr"])]
    labels = {g: _legend_label(g, sub["status"]) for g, sub in runs.groupby("group", sort=False)}
    runs["label"] = runs["group"].map(labels)
    runs["averaged"] = averaged(runs["status"], include_unfinished)
    return runs


def run_palette(runs: pd.DataFrame) -> dict:
    rank = {m: i for i, m in enumerate(model_order(runs["model"]))}
    order = list(dict.fromkeys(runs.sort_values(["model", "lr"], key=lambda c: c.map(rank) if c.name == "model"
                                                else c)["label"]))
    return dict(zip(order, sns.color_palette("colorblind", len(order))))


def legend(fig: Figure, palette: dict, runs: pd.DataFrame, band: bool, extra=(), per_run: str = "line",
           band_label: str | None = None):
    """Curve colours, then what thin/bold/shading/markers mean; ``per_run`` is "line" or "dot" (lr sweep);
    ``band_label`` replaces the t-interval wording of the shading entry where a figure shades something else."""
    mean = "mean of finished runs" + (" and unfinished ones" if runs.loc[runs["status"] == "unfinished",
                                                                         "averaged"].any() else "")
    handles = [Line2D([], [], color=c, lw=MEAN_LW, label=lab) for lab, c in palette.items()]
    if per_run == "dot":
        handles += [Line2D([], [], ls="", marker="o", ms=4, alpha=0.6, color="0.35", label="dot: one run (seed)"),
                    Line2D([], [], color="0.35", lw=MEAN_LW, marker="o", label=f"bold: {mean}")]
    else:
        handles += [Line2D([], [], color="0.35", lw=SEED_LW, alpha=0.8, label="thin: one run (seed)"),
                    Line2D([], [], color="0.35", lw=MEAN_LW, label=f"bold: {mean}")]
    if band and per_run == "dot":
        handles.append(Line2D([], [], color="0.35", marker="|", ms=10, mew=1.5, lw=1.5,
                              label=f"error bar: 95% t-interval of the mean (n ≥ {BAND_MIN_N})"))
    elif band:
        handles.append(Patch(color="0.35", alpha=0.2, label=band_label or
                             f"shading: 95% t-interval of the mean (n ≥ {BAND_MIN_N})"))
    if (runs["status"] == "diverged").any():
        handles.append(Line2D([], [], ls="", marker="x", color="0.35", mew=2, label="diverged (not averaged)"))
    unfinished = runs["status"] == "unfinished"
    if unfinished.any():
        averaged_too = runs.loc[unfinished, "averaged"].all()
        handles.append(Line2D([], [], ls="--" if per_run == "line" else "", lw=SEED_LW, color="0.35",
                              marker="" if per_run == "line" else "o", mfc="none", mew=1.5,
                              label="unfinished" + ("" if averaged_too else " (not averaged)")))
    handles += list(extra)
    fig.legend(handles=handles, loc="outside lower center", ncols=min(3, len(handles)), frameon=False)


def _rows(df, runs, kind, metric, x, smooth):
    """One metric's rows with ``label`` and ``averaged`` columns, smoothed per run along ``x``, thinned."""
    d = select(df, kind, metric).dropna(subset=["value", x])
    d = d.merge(runs[["run", "label", "averaged"]], on="run").astype({x: float}).sort_values(["run", x])
    if d.empty:
        return d
    if smooth > 1:  # a short run gets a shorter window, so its curve keeps its shape
        d["value"] = d.groupby("run")["value"].transform(
            lambda v: v.rolling(min(smooth, max(1, len(v) // 5)), min_periods=1, center=True).mean())
    xs = np.sort(d[x].unique())
    keep = xs[:: max(1, math.ceil(len(xs) / MAX_POINTS))]
    return d[d[x].isin(keep)]


def empty_panel(ax, what: str):
    ax.text(0.5, 0.5, f"no {what} records", ha="center", va="center", transform=ax.transAxes)


def _mark_divergence(ax, runs, palette, x):
    col = "diverged_step" if x == "step" else "diverged_epoch"
    top = blended_transform_factory(ax.transData, ax.transAxes)
    for _, r in runs[runs["status"] == "diverged"].dropna(subset=[col]).iterrows():
        ax.plot([float(r[col])], [1.0], marker="x", ms=9, mew=2, color=palette[r["label"]], transform=top,
                clip_on=False, zorder=5)


def _seed_lines(ax, d, runs, palette, x, y="value"):
    status = dict(zip(runs["run"], runs["status"]))
    for (label, run), g in d.groupby(["label", "run"], sort=True):
        ax.plot(g[x], g[y], color=palette[label], lw=SEED_LW, alpha=SEED_ALPHA,
                ls="--" if status[run] == "unfinished" else "-")


def _mean(d, x, y="value") -> pd.DataFrame:
    """Per (label, x) over the averaged runs: mean, sd, n and the t-interval half-width (NaN below BAND_MIN_N)."""
    g = d[d["averaged"]].groupby(["label", x])[y].agg(["mean", "std", "count"]).reset_index()
    g["half"] = t_halfwidth(g["std"], g["count"])
    return g


def _mean_lines(ax, d, palette, x) -> bool:
    """Bold means (and bands where n allows); returns whether any band was drawn."""
    banded = False
    for label, g in _mean(d, x).groupby("label", sort=False):
        c = palette[label]
        ax.plot(g[x], g["mean"], color=c, lw=MEAN_LW)
        ok = g["half"].notna().to_numpy()
        if ok.any():
            banded = True
            ax.fill_between(g[x], g["mean"] - g["half"], g["mean"] + g["half"], where=ok, color=c, alpha=0.2,
                            lw=0)
    return banded


def seeds_and_mean(ax, df, runs, palette, kind, metric, x, smooth, ylabel, title):
    """One panel: thin per-run lines, bold mean of the averaged runs, × at divergences. None if no records."""
    ax.set_title(title)
    d = _rows(df, runs, kind, metric, x, smooth)
    if d.empty:
        empty_panel(ax, f"{kind} {metric}")
        return None
    _seed_lines(ax, d, runs, palette, x)
    banded = _mean_lines(ax, d, palette, x)
    ax.set(xlabel=STEP if x == "step" else EPOCH, ylabel=ylabel, title=f"{title} [BN: {d['bn_mode'].iloc[0]}]")
    _mark_divergence(ax, runs, palette, x)
    return banded


def band(ax, df, runs, palette, lo, hi, smooth, ylabel, title):
    """Per curve: thin per-run lines of ``lo`` and ``hi``, shaded between their means over the averaged runs."""
    ax.set_title(title)
    parts = [_rows(df, runs, "probe", m, "step", smooth) for m in (lo, hi)]
    if parts[0].empty or parts[1].empty:
        return empty_panel(ax, f"probe {lo}/{hi}")
    for p in parts:
        _seed_lines(ax, p, runs, palette, "step")
    mean = [_mean(p, "step").set_index(["label", "step"])["mean"] for p in parts]
    both = pd.concat(mean, axis=1, keys=["lo", "hi"]).dropna().reset_index()
    for label, g in both.groupby("label", sort=False):
        c = palette[label]
        ax.fill_between(g["step"], g["lo"], g["hi"], color=c, alpha=0.25, lw=0)
        ax.plot(g["step"], g["lo"], color=c, lw=MEAN_LW)
        ax.plot(g["step"], g["hi"], color=c, lw=MEAN_LW)
    ax.set(xlabel=STEP, ylabel=ylabel, title=f"{title} [BN: {parts[0]['bn_mode'].iloc[0]}]")
    _mark_divergence(ax, runs, palette, "step")


@styled
def seed_homework(df: pd.DataFrame, runs: pd.DataFrame, smooth_steps: int = SMOOTH_STEPS,
                  include_unfinished: bool = False) -> Figure:
    """Training loss per step (rolling mean); test loss, test accuracy and local smoothness per epoch."""
    runs = curve_labels(runs, include_unfinished=include_unfinished)
    palette = run_palette(runs)
    fig, (a, b, c, d) = figure_grid(2, nrows=2)
    banded = [
        seeds_and_mean(a, df, runs, palette, "step", "loss", "step", smooth_steps,
                        f"training loss ({loss_name(df)}, log scale)",
                        f"(a) train loss, rolling mean ≤{smooth_steps} steps"),
        seeds_and_mean(b, df, runs, palette, "eval", "test_loss", "epoch", 1,
                        f"test loss ({loss_name(df)}, log scale)", "(b) test loss"),
        seeds_and_mean(c, df, runs, palette, "eval", "test_accuracy", "epoch", 1, "test accuracy",
                        "(c) test accuracy"),
        seeds_and_mean(d, df, runs, palette, "smoothness", "local_smoothness", "epoch", 1,
                        "‖∇f(w+u) − ∇f(w)‖₂ / ‖u‖₂", "(d) local smoothness, u = −η·g")]
    for ax, drawn in ((a, banded[0]), (b, banded[1])):
        if drawn is not None:
            ax.set_yscale("log")
    legend(fig, palette, runs, any(banded))
    return fig


def _dodge(labels: list) -> dict:
    """A small multiplicative x offset per curve on the log-lr axis, so that the seeds of two models do not overlap."""
    k = len(labels)
    return {lab: 10 ** (0.025 * (i - (k - 1) / 2)) for i, lab in enumerate(labels)}


def several_lrs(df: pd.DataFrame, runs: pd.DataFrame) -> bool:
    """Whether the study has at least two learning rates: ``lr_sweep`` applies."""
    return runs["lr"].nunique() >= 2


@styled
def lr_sweep(df: pd.DataFrame, runs: pd.DataFrame, include_unfinished: bool = False) -> Figure | None:
    """Final test accuracy, final test loss and median effective β vs learning rate, one dot per finished run and a
    bold mean, plus the divergence rate (Santurkar Fig. 1 style); None if the study has fewer than 2 lrs."""
    if not several_lrs(df, runs):
        return None
    runs = curve_labels(runs, by_lr=False, include_unfinished=include_unfinished)
    palette = run_palette(runs)
    dodge = _dodge(list(palette))
    per_run = run_metrics(df).merge(runs[["run", "label", "averaged"]], on="run")
    fig, axes = figure_grid(2, nrows=2)
    label = {m.name: m.label_for(df) for m in METRICS}
    diverged_at = runs[runs["status"] == "diverged"].groupby("label")["lr"].agg(set).to_dict()
    panels = [("final_test_accuracy", "final test accuracy", False),
              ("final_test_loss", "final test loss (log scale)", True),
              ("effective_beta_median", "median effective β", False)]
    banded = False
    for ax, letter, (name, ylabel, log) in zip(axes, "abc", panels):
        ok = per_run[per_run["averaged"]].dropna(subset=[name])
        if ok.empty:
            empty_panel(ax, name)
        for lab, g in ok.groupby("label", sort=False):
            c, x = palette[lab], g["lr"] * dodge[lab]
            ax.plot(x, g[name], ls="", marker="o", ms=4, alpha=0.6, color=c)
            m = g.groupby("lr")[name].agg(["mean", "std", "count"]).reset_index()
            half = t_halfwidth(m["std"], m["count"])
            ax.plot(m["lr"] * dodge[lab], m["mean"], color=c, lw=MEAN_LW, marker="o", ms=7)
            survivors = m["lr"].isin(diverged_at.get(lab, ()))
            ax.plot(m.loc[survivors, "lr"] * dodge[lab], m.loc[survivors, "mean"], ls="", marker="o", ms=7,
                    mfc="white", mew=2, color=c, zorder=4)
            if np.isfinite(half).any():
                banded = True
                ax.errorbar(m["lr"] * dodge[lab], m["mean"], yerr=half, ls="", color=c, capsize=4, lw=1.5)
        _mark_excluded(ax, runs, palette, dodge)
        if log and not ok.empty:
            ax.set_yscale("log")
        ax.set(ylabel=ylabel, title=f"({letter}) {label[name]}")
    ax = axes[3]
    for lab, g in runs.groupby("label", sort=False):
        known = g[g["status"].isin(["done", "diverged"])]
        rate = known.groupby("lr")["status"].agg(lambda s: (s == "diverged").mean()).reset_index()
        ax.plot(rate["lr"] * dodge[lab], rate["status"], color=palette[lab], lw=MEAN_LW, marker="o", ms=7)
    ax.set(ylabel="diverged / (done + diverged)", ylim=(-0.05, 1.05), title="(d) divergence rate")
    lrs = sorted(runs["lr"].unique())
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xticks(lrs, [f"{lr:g}" for lr in lrs])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("learning rate η (log scale)")
    hollow = [Line2D([], [], ls="", marker="o", ms=7, mfc="white", mew=2, color="0.35",
                     label="hollow: mean over survivors (other runs diverged)")] if diverged_at else []
    legend(fig, palette, runs, banded, hollow, per_run="dot")
    return fig


def _mark_excluded(ax, runs, palette, dodge):
    """× per diverged run and ○ per unfinished run that is not averaged, at the top of the axes at its lr."""
    top = blended_transform_factory(ax.transData, ax.transAxes)
    for _, r in runs[~runs["averaged"]].iterrows():
        diverged = r["status"] == "diverged"
        ax.plot([r["lr"] * dodge[r["label"]]], [1.0], marker="x" if diverged else "o", ms=9 if diverged else 7,
                mew=2 if diverged else 1.5, mfc="none", color=palette[r["label"]], transform=top, clip_on=False,
                zorder=5)


def save_figure(fig: Figure, out_dir, stem: str) -> list[Path]:
    """Write ``stem.png`` (dpi 200) and ``stem.pdf`` atomically (``experiments.atomic``: temp file, fsync, rename;
    the file mode follows the umask)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in ("png", "pdf"):
        # no creation date in the metadata: the same records give byte-identical files
        metadata = {"CreationDate": None} if ext == "pdf" else {"Software": None}
        with atomic_write(out_dir / f"{stem}.{ext}", "wb") as f:
            fig.savefig(f, format=ext, dpi=DPI, bbox_inches="tight", metadata=metadata)
        paths.append(out_dir / f"{stem}.{ext}")
    return paths
