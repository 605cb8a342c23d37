"""Figures and a summary of the ``spectrum`` records of a study (runs made with ``--spectrum-every E``).

- ``spectrum_density``: log-density of the train-mode Hessian, one panel per epoch (first, middle, last measured),
  every network (one thin line per seed), as in Ghorbani et al. (2019, Fig. 2): outliers show as isolated bumps
  right of the bulk.
- ``spectrum_bn_modes``: for every network with a normalisation layer, the same network's density with batch
  statistics vs running (population) statistics (their population-statistics experiment, §5).
- ``spectrum_concentration``: gradient concentration (fraction of ‖g‖² in the top-k eigenspace) and λ_max along
  training: one thin line per seed, the mean over seeds in bold and its 95% t-interval where n allows (as the
  other figures).
- ``spectrum.md``: the numbers behind them, mean ± sd over seeds with n, and paired tests between networks and
  between BN modes (``spectrum_stats``).

Densities are Gaussian-smoothed with σ = (width of the panel's spectrum) / ``SIGMA_DIVISOR`` and drawn on a log scale
clipped at ``FLOOR`` (see ``smoothness.density`` on both choices). Everything is deterministic: the same records give
byte-identical files.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from experiments.analysis.plots import StudyWriter, has_kind
from experiments.atomic import atomic_write_text
from experiments.plotstyle import styled
from experiments.features.spectrum.compute import density_of
from experiments.store import records_path
from experiments.analysis.figures import EPOCH, MEAN_LW, SEED_ALPHA, SEED_LW, figure_grid, save_figure
from experiments.analysis.load import AnalysisError, model_order, read_study, run_fields
from experiments.analysis.tables import mean_sd
from experiments.analysis.metrics import finished_curves
from experiments.features.spectrum.stats import comparison_markdown
from experiments.analysis.stats import t_halfwidth

SIGMA_DIVISOR = 200   # σ = width / 200: narrower than the gap of a visible outlier, wider than the bulk's node spacing
FLOOR = 1e-7          # below the weight/σ of one eigenvalue in 30,000 over a width of 30 (~1e-5)
GRID = 1500
MODE_STYLE = {"batch": "-", "running": "--"}
MODE_LABEL = {"batch": "batch statistics (train mode)", "running": "running statistics (eval mode)"}


def _spectrum_records(run) -> list[dict]:
    """The run's spectrum records (their fields checked by the run store); a repeated one stops the analysis at
    file:line."""
    path, seen, out = records_path(run.path), {}, []
    for r, line in zip(run.records, run.lines):
        if r.get("kind") != "spectrum":
            continue
        # the fields were checked by the run store against the spectrum's Record; here: no record twice
        if (r["epoch"], r["bn_mode"]) in seen:
            problem = (f"a second record of epoch {r['epoch']}, bn_mode {r['bn_mode']} (the first is on line "
                       f"{seen[r['epoch'], r['bn_mode']]}); it would be averaged twice")
            raise AnalysisError(f"{path}:{line}: bad spectrum record: {problem}. Fix or remove the line (records "
                                f"are written by --spectrum-every, one per epoch and BN mode)")
        seen[r["epoch"], r["bn_mode"]] = line
        out.append(r)
    return out


def spectrum_table(results_dir, notify=None) -> pd.DataFrame:
    """One row per spectrum record: run identity, epoch, bn_mode, scalars, and the record itself.
    ``notify(message)`` is told which runs are left out (unfinished or diverged)."""
    rows = []
    for run in read_study(results_dir, notify):
        fields = run_fields(run)
        for r in _spectrum_records(run):
            rows.append({**fields, "epoch": int(r["epoch"]), "bn_mode": r["bn_mode"],
                         "lambda_max": r.get("lambda_max"), "lambda_k": r.get("lambda_k"),
                         "top_k": r.get("top_k"), "gradient_concentration": r.get("gradient_concentration"),
                         "mean_eigenvalue": r.get("mean_eigenvalue"), "record": r})
    if not rows:
        raise AnalysisError(f"{results_dir}: no spectrum records; run the study with --spectrum-every E (e.g. 5) "
                            f"to record the Hessian spectrum at initialisation and every E epochs")
    # curves are networks (and learning rates when the study has several): only runs that differ in the seed alone
    # are averaged, and only finished ones (as in the report)
    table = finished_curves(pd.DataFrame(rows), results_dir, "spectrum", notify,
                            note=" (their spectra are not averaged)")
    table["rms_eigenvalue"] = [float(np.sqrt(density_of(r).moment(2))) for r in table["record"]]
    return table.sort_values(["model", "seed", "epoch", "bn_mode"], ignore_index=True)


def chosen_epochs(table: pd.DataFrame, n: int = 3) -> list[int]:
    """First, middle and last epoch that every network measured in batch mode (or all epochs, if fewer)."""
    batch = table[table["bn_mode"] == "batch"]
    common = sorted(set.intersection(*(set(g["epoch"]) for _, g in batch.groupby("model"))))
    if len(common) <= n:
        return common
    return [common[0], common[len(common) // 2], common[-1]]


def _palette(models) -> dict:
    order = model_order(models)
    return dict(zip(order, sns.color_palette("colorblind", len(order))))


def _grid(records) -> tuple[np.ndarray, float]:
    nodes = np.concatenate([np.concatenate([np.asarray(x, dtype=float) for x in r["nodes"]]) for r in records])
    lo, hi = float(nodes.min()), float(nodes.max())
    sigma = max(hi - lo, 1e-12) / SIGMA_DIVISOR
    return np.linspace(lo - 6 * sigma, hi + 6 * sigma, GRID), sigma


def _draw_densities(ax, rows: pd.DataFrame, color_of, style_of) -> None:
    grid, sigma = _grid(list(rows["record"]))
    for _, row in rows.iterrows():
        d = np.maximum(density_of(row["record"]).density(grid, sigma), FLOOR)
        ax.plot(grid, d, color=color_of(row), ls=style_of(row), lw=1.1, alpha=0.85)
    ax.set_yscale("log")
    ax.set_ylim(FLOOR / 2, None)
    ax.set(xlabel="eigenvalue λ of ∇²L", ylabel="density (log scale)")
    ax.text(0.98, 0.97, f"σ = {sigma:.3g}", ha="right", va="top", transform=ax.transAxes, fontsize="small")


def _legend_counts(table: pd.DataFrame, palette: dict) -> list:
    handles = []
    for model, color in palette.items():
        n = table[table["model"] == model]["run"].nunique()
        handles.append(Line2D([], [], color=color, lw=2, label=f"{model} (n={n} seeds)"))
    return handles


@styled
def density_figure(table: pd.DataFrame) -> Figure:
    """Log-density of the batch-mode Hessian, every network, at the chosen epochs."""
    batch = table[table["bn_mode"] == "batch"]
    epochs = chosen_epochs(table)
    palette = _palette(batch["model"])
    fig, axes = figure_grid(len(epochs), width=5.0, height=4.2)
    for ax, epoch in zip(axes, epochs):
        _draw_densities(ax, batch[batch["epoch"] == epoch], lambda r: palette[r["model"]], lambda r: "-")
        ax.set_title(f"epoch {epoch}")
    fig.suptitle("Hessian eigenvalue density (train mode, batch statistics; one line per seed)")
    fig.legend(handles=_legend_counts(batch, palette), loc="outside lower center", ncols=len(palette),
               frameon=False)
    return fig


@styled
def bn_modes_figure(table: pd.DataFrame) -> Figure | None:
    """For each network measured in both modes: batch vs running statistics at the chosen epochs."""
    models = [m for m in model_order(table["model"]) if {"batch", "running"} <= set(table[table["model"] == m]
                                                                                      ["bn_mode"])]
    if not models:
        return None
    epochs = chosen_epochs(table)
    palette = _palette(table["model"])
    fig = Figure(figsize=(5.0 * len(epochs), 4.0 * len(models)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(models), len(epochs), squeeze=False)
    for i, model in enumerate(models):
        for ax, epoch in zip(axes[i], epochs):
            rows = table[(table["model"] == model) & (table["epoch"] == epoch)]
            _draw_densities(ax, rows, lambda r: palette[r["model"]], lambda r: MODE_STYLE[r["bn_mode"]])
            ax.set_title(f"{model}, epoch {epoch}")
    fig.suptitle("Same network, two losses: BatchNorm with batch vs population (running) statistics")
    handles = [Line2D([], [], color="0.2", ls=MODE_STYLE[m], lw=2, label=MODE_LABEL[m]) for m in MODE_STYLE]
    fig.legend(handles=handles, loc="outside lower center", ncols=2, frameon=False)
    return fig


@styled
def concentration_figure(table: pd.DataFrame) -> Figure:
    """Gradient concentration in the top-k eigenspace and λ_max per epoch, both BN modes: thin line per seed, bold
    mean, 95% t-band where n allows."""
    d = table.copy()
    d["curve"] = [f"{m}, {b}" for m, b in zip(d["model"], d["bn_mode"])]
    palette = _palette(d["model"])
    order = [f"{m}, {b}" for m in palette for b in MODE_STYLE if ((d["model"] == m) & (d["bn_mode"] == b)).any()]
    fig, axes = figure_grid(2, width=6.0, height=4.4)
    k = ", ".join(str(int(v)) for v in sorted(d["top_k"].dropna().unique()))
    for ax, (metric, ylabel) in zip(axes, [("gradient_concentration", f"‖P_k g‖² / ‖g‖², k = {k}"),
                                           ("lambda_max", "λ_max(∇²L)")]):
        for curve in order:
            g = d[(d["curve"] == curve)].dropna(subset=[metric])
            color, ls = palette[g["model"].iloc[0]] if len(g) else "0.5", MODE_STYLE[curve.rsplit(", ", 1)[1]]
            for _, run in g.groupby("run"):
                ax.plot(run["epoch"], run[metric], color=color, ls=ls, lw=SEED_LW, alpha=SEED_ALPHA)
            m = g.groupby("epoch")[metric].agg(["mean", "std", "count"]).reset_index()
            half = t_halfwidth(m["std"], m["count"])
            ax.plot(m["epoch"], m["mean"], color=color, ls=ls, lw=MEAN_LW, marker="o", ms=4)
            ok = ~np.isnan(half)
            if ok.any():
                ax.fill_between(m["epoch"], m["mean"] - half, m["mean"] + half, where=ok, color=color, alpha=0.15,
                                lw=0)
        ax.set(xlabel=EPOCH, ylabel=ylabel)
    axes[0].set_title("(a) gradient concentration in the top-k eigenspace")
    axes[0].set_ylim(-0.02, 1.02)
    axes[1].set_title("(b) top Hessian eigenvalue")
    handles = [Line2D([], [], color=palette[c.rsplit(", ", 1)[0]], ls=MODE_STYLE[c.rsplit(", ", 1)[1]], lw=2,
                      label=f"{c} (n={d[d['curve'] == c]['run'].nunique()})") for c in order]
    handles.append(Line2D([], [], color="0.35", lw=MEAN_LW, label="bold: mean over seeds, band: 95% t-interval"))
    fig.legend(handles=handles, loc="outside lower center", ncols=min(3, len(handles)), frameon=False)
    return fig



def summary_markdown(table: pd.DataFrame) -> str:
    """Per network, BN mode and epoch: mean ± sd over seeds (n = seeds) of the spectrum's numbers."""
    ks = ", ".join(str(int(k)) for k in sorted(table["top_k"].dropna().unique()))
    lines = ["# Hessian spectrum summary", "",
             f"Per network, BN mode and epoch: mean ± sd over seeds (n = runs). λ_max and λ_k: top and k-th "
             f"eigenvalue (Lanczos; k = {ks}); rms = sqrt(tr(H²)/n) and mean = tr(H)/n from the quadrature "
             "(the bulk's scale); concentration = fraction of ‖g‖² in the top-k eigenspace.", "",
             "| model | BN mode | epoch | n | λ_max | λ_k | λ_max / λ_k | λ_max / rms | mean eigenvalue | "
             "concentration |", "|---|---|---|---|---|---|---|---|---|---|"]
    for model in model_order(table["model"]):
        for bn_mode in MODE_STYLE:
            sub = table[(table["model"] == model) & (table["bn_mode"] == bn_mode)]
            for epoch, g in sub.groupby("epoch"):
                cells = [g["lambda_max"], g["lambda_k"], g["lambda_max"] / g["lambda_k"],
                         g["lambda_max"] / g["rms_eigenvalue"], g["mean_eigenvalue"], g["gradient_concentration"]]
                lines.append(f"| {model} | {bn_mode} | {epoch} | {len(g)} | "
                             + " | ".join(mean_sd(c, "n/a") for c in cells) + " |")
    paired = comparison_markdown(table)
    return "\n".join(lines) + "\n" + ("\n" + paired if paired else "")


def plot_spectrum(results_dir, out_dir=None, notify=None) -> list[Path]:
    """Write the spectrum figures (PNG + PDF) and spectrum.md; default ``out_dir`` is ``results_dir/figures``."""
    table = spectrum_table(results_dir, notify)   # raises AnalysisError before anything is written
    out_dir = Path(results_dir) / "figures" if out_dir is None else Path(out_dir)
    paths = []
    for stem, fig in (("spectrum_density", density_figure(table)), ("spectrum_bn_modes", bn_modes_figure(table)),
                      ("spectrum_concentration", concentration_figure(table))):
        if fig is not None:
            paths += save_figure(fig, out_dir, stem)
    summary = Path(results_dir) / "spectrum.md"
    atomic_write_text(summary, summary_markdown(table))
    return paths + [summary]


SPECTRUM = StudyWriter("spectrum", has_kind("spectrum"), plot_spectrum)
