"""Figures and a summary of the ``per_layer`` records of a study (runs made with ``--per-layer``).

- ``per_layer_lambda``: λ_max of each module's block of the Hessian (solid) and of the GGN (dashed) along training,
  one panel per layer position (conv1, conv2, fc, then the BatchNorm layers), every network in its colour (one thin
  line per seed, the mean over seeds in bold), and a last panel with the whole Hessian's most negative eigenvalue.
- ``per_layer_trace``: the same for the blocks' traces (Hutchinson), and tr(H_BB) − tr(G_BB), the trace of the
  block of H − G (the network's own second derivatives), in a row below.
- ``per_layer.md``: the numbers at the last epoch (mean ± sd over seeds, n) and the paired tests of
  ``per_layer_stats``.

Networks are compared by layer position (``layer``), not by module name: the ConvNet and the BN-ConvNet share
conv1, conv2 and fc; BatchNorm blocks (bn1, bn2) exist in one network only and are reported on their own.
Everything is deterministic: the same records give byte-identical files.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from experiments.analysis.plots import StudyWriter, has_kind
from experiments.atomic import atomic_write_text
from experiments.features.per_layer.compute import WHOLE
from experiments.plotstyle import styled
from experiments.store import records_path
from experiments.analysis.figures import EPOCH, MEAN_LW, SEED_ALPHA, SEED_LW, figure_grid, save_figure
from experiments.analysis.load import AnalysisError, model_order, read_study, run_fields
from experiments.analysis.tables import mean_sd
from experiments.analysis.metrics import finished_curves
from experiments.features.per_layer.stats import comparison_markdown, last_epoch

MATRIX_STYLE = {"hessian": "-", "ggn": "--"}
MATRIX_LABEL = {"hessian": "Hessian H (block)", "ggn": "GGN G (block)"}
_TYPE_ORDER = {"conv": 0, "fc": 1, "bn": 2, "norm": 3}


def layer_order(layers) -> list[str]:
    """conv1, conv2, ..., fc, bn1, bn2, ... (other norms last)."""
    def key(layer: str):
        kind = layer.rstrip("0123456789")
        number = layer[len(kind):]
        return _TYPE_ORDER.get(kind, 9), kind, int(number) if number else 0
    return sorted(set(layers) - {WHOLE}, key=key)


def per_layer_table(results_dir, notify=None) -> pd.DataFrame:
    """One row per per_layer record of the finished runs: run identity, epoch, module, layer, matrix, the numbers.
    ``notify(message)`` is told which runs are left out (unfinished or diverged)."""
    rows = []
    for run in read_study(results_dir, notify):
        fields = run_fields(run)
        seen = {}
        for r, line in zip(run.records, run.lines):
            if r.get("kind") != "per_layer":
                continue
            key = (r["epoch"], r["module"], r["matrix"])   # fields checked by the run store (the Record)
            if key in seen:
                problem = f"a second record of epoch {key[0]}, module {key[1]}, matrix {key[2]} (line {seen[key]})"
                raise AnalysisError(f"{records_path(run.path)}:{line}: bad per_layer record: {problem}. Fix or "
                                    f"remove the line (records are written by --per-layer)")
            seen[key] = line
            rows.append({**fields, "epoch": r["epoch"], "module": r["module"], "layer": r["layer"],
                         "matrix": r["matrix"], **{k: r.get(k) for k in ("lambda_max", "lambda_min", "trace",
                                                                         "trace_stderr", "converged")}})
    if not rows:
        raise AnalysisError(f"{results_dir}: no per_layer records; run the study with --per-layer (e.g. "
                            f"smoothness-lab run --study per-layer)")
    table = pd.DataFrame(rows)
    table = finished_curves(table, results_dir, "per_layer", notify)
    for column in ("lambda_max", "lambda_min", "trace", "trace_stderr"):
        table[column] = pd.to_numeric(table[column], errors="coerce")
    return table.sort_values(["model", "seed", "epoch", "layer", "matrix"], ignore_index=True)


def _palette(models) -> dict:
    order = model_order(models)
    return dict(zip(order, sns.color_palette("colorblind", len(order))))


def _curves(ax, rows: pd.DataFrame, value: str, color, ls) -> None:
    rows = rows.dropna(subset=[value])
    for _, run in rows.groupby("run"):
        ax.plot(run["epoch"], run[value], color=color, ls=ls, lw=SEED_LW, alpha=SEED_ALPHA)
    mean = rows.groupby("epoch")[value].mean()
    ax.plot(mean.index, mean.to_numpy(), color=color, ls=ls, lw=MEAN_LW, marker="o", ms=3)


def _legend(fig: Figure, table: pd.DataFrame, palette: dict, matrices: bool) -> None:
    handles = [Line2D([], [], color=c, lw=2, label=f"{m} (n={table[table['model'] == m]['run'].nunique()} seeds)")
               for m, c in palette.items()]
    if matrices:
        handles += [Line2D([], [], color="0.3", ls=ls, lw=2, label=MATRIX_LABEL[k]) for k, ls in MATRIX_STYLE.items()]
    handles.append(Line2D([], [], color="0.3", lw=MEAN_LW, label="bold: mean over seeds; thin: one seed"))
    fig.legend(handles=handles, loc="outside lower center", ncols=min(4, len(handles)), frameon=False)


def _block_panels(axes, table: pd.DataFrame, layers: list[str], palette: dict, value: str, ylabel: str) -> None:
    for ax, layer in zip(axes, layers):
        for model, color in palette.items():
            for matrix, ls in MATRIX_STYLE.items():
                rows = table[(table["model"] == model) & (table["layer"] == layer) & (table["matrix"] == matrix)]
                if not rows.empty:
                    _curves(ax, rows, value, color, ls)
        ax.set(title=layer, xlabel=EPOCH, ylabel=ylabel)


@styled
def lambda_figure(table: pd.DataFrame) -> Figure:
    """λ_max of every block of H and G per layer position, and λ_min of the whole H (panels in rows of 3)."""
    layers, palette = layer_order(table["layer"]), _palette(table["model"])
    ncols = 3
    nrows = -(-(len(layers) + 1) // ncols)
    fig, axes = figure_grid(ncols, nrows=nrows, width=4.6, height=3.6)
    axes = list(np.asarray(axes).reshape(-1))
    _block_panels(axes, table, layers, palette, "lambda_max", "λ_max of the block")
    ax = axes[len(layers)]
    whole = table[table["layer"] == WHOLE]
    for model, color in palette.items():
        _curves(ax, whole[whole["model"] == model], "lambda_min", color, "-")
    ax.axhline(0, color="0.6", lw=0.8)
    ax.set(title="whole network: most negative eigenvalue", xlabel=EPOCH, ylabel="λ_min(H)")
    for extra in axes[len(layers) + 1:]:
        extra.set_visible(False)
    fig.suptitle("Per-layer curvature along training (train-mode BN, the sharpness sample)")
    _legend(fig, table, palette, matrices=True)
    return fig


@styled
def trace_figure(table: pd.DataFrame) -> Figure:
    """Traces of every block of H and G per layer position; below, tr(H_BB) − tr(G_BB)."""
    blocks = table[table["layer"] != WHOLE]
    layers, palette = layer_order(blocks["layer"]), _palette(blocks["model"])
    fig, axes = figure_grid(len(layers), nrows=2, width=4.2, height=3.6)
    axes = np.asarray(axes).reshape(2, -1)
    _block_panels(axes[0], blocks, layers, palette, "trace", "trace of the block (Hutchinson)")
    wide = blocks.pivot_table(index=["model", "run", "epoch", "layer"], columns="matrix", values="trace").reset_index()
    for ax, layer in zip(axes[1], layers):
        for model, color in palette.items():
            rows = wide[(wide["model"] == model) & (wide["layer"] == layer)]
            if not rows.empty and {"hessian", "ggn"} <= set(rows.columns):
                _curves(ax, rows.assign(rest=rows["hessian"] - rows["ggn"]), "rest", color, "-")
        ax.axhline(0, color="0.6", lw=0.8)
        ax.set(title=f"{layer}: tr(H − G) of the block", xlabel=EPOCH, ylabel="tr(H_BB) − tr(G_BB)")
    fig.suptitle("Per-layer traces along training (Hutchinson, the same probes for H and G)")
    _legend(fig, blocks, palette, matrices=True)
    return fig



def summary_markdown(table: pd.DataFrame) -> str:
    """The last epoch's numbers per network and layer (mean ± sd over seeds, n), then the paired tests."""
    epoch = last_epoch(table)
    at = table[table["epoch"] == epoch]
    lines = ["# Per-layer curvature", "",
             f"Blocks of the train-mode Hessian H and of the GGN G on each module's parameters, on the sharpness "
             f"sample, at the last epoch ({epoch}): mean ± sd over seeds (n = runs). tr(H − G) = tr(H_BB) − "
             f"tr(G_BB), from the same Hutchinson probes: the block's curvature from the network's own second "
             f"derivatives. λ_min: the whole Hessian's most negative eigenvalue.", "",
             "| model | layer | n | λ_max(H) | λ_max(G) | tr(H) | tr(G) | tr(H − G) |",
             "|---|---|---|---|---|---|---|---|"]
    for model in model_order(at["model"]):
        for layer in layer_order(at["layer"]):
            rows = at[(at["model"] == model) & (at["layer"] == layer)]
            if rows.empty:
                continue
            h = rows[rows["matrix"] == "hessian"].set_index("run")
            g = rows[rows["matrix"] == "ggn"].set_index("run")
            lines.append(f"| {model} | {layer} | {h.index.nunique()} | {mean_sd(h['lambda_max'])} | "
                         f"{mean_sd(g['lambda_max'])} | {mean_sd(h['trace'])} | {mean_sd(g['trace'])} | "
                         f"{mean_sd(h['trace'] - g['trace'])} |")
        whole = at[(at["model"] == model) & (at["layer"] == WHOLE)]
        lines.append(f"| {model} | λ_min(H), whole | {len(whole)} | {mean_sd(whole['lambda_min'])} | | | | |")
    unconverged = table[table["converged"] == False]  # noqa: E712 (a column of booleans)
    if not unconverged.empty:
        lines += ["", f"{len(unconverged)} Lanczos run(s) stopped at the product cap before the tolerance."]
    paired = comparison_markdown(table)
    return "\n".join(lines) + "\n" + ("\n" + paired if paired else "")


def plot_per_layer(results_dir, out_dir=None, notify=None) -> list[Path]:
    """Write the per-layer figures (PNG + PDF) and per_layer.md; default ``out_dir`` is ``results_dir/figures``."""
    table = per_layer_table(results_dir, notify)   # raises AnalysisError before anything is written
    out_dir = Path(results_dir) / "figures" if out_dir is None else Path(out_dir)
    paths = save_figure(lambda_figure(table), out_dir, "per_layer_lambda")
    paths += save_figure(trace_figure(table), out_dir, "per_layer_trace")
    summary = Path(results_dir) / "per_layer.md"
    atomic_write_text(summary, summary_markdown(table))
    return paths + [summary]


PER_LAYER = StudyWriter("per_layer", has_kind("per_layer"), plot_per_layer)
