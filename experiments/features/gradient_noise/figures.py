"""A Cockpit-style dashboard of one run on one page: the training loss, the step quality α, the three gradient tests,
the GSNR, the noise scale and λ_max along training. `plot` draws one per run with gradient-noise records
(``figures/dashboard-<run>.png``); `smoothness-lab watch` redraws it while the run writes."""
from __future__ import annotations

from pathlib import Path
from typing import List, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from experiments.analysis.figures import figure_grid, save_figure
from experiments.analysis.plots import StudyWriter
from experiments.features.gradient_noise.compute import KIND
from experiments.plotstyle import styled

UNIT_STYLE = {"gradient_noise": ("C0", "minibatch units"), "gradient_noise_example": ("C1", "example units")}
TESTS = (("norm_test", "norm test θ", "-"), ("inner_product_test", "inner-product test", "--"),
         ("orthogonality_test", "orthogonality test ν", ":"))


def _frame(records: Sequence[dict], kind: str) -> pd.DataFrame:
    return pd.DataFrame([r for r in records if r.get("kind") == kind])


def _log_positive(ax, values) -> None:
    v = pd.Series(values, dtype=float).dropna()
    if len(v) and (v > 0).all():
        ax.set_yscale("log")


@styled
def dashboard(records: Sequence[dict], title: str) -> Figure:
    """The dashboard of one run's records (module docstring); panels without records say so."""
    fig, axes = figure_grid(3, nrows=2, width=4.6, height=3.4)
    loss, alpha, tests, gsnr, scale, curv = axes
    steps = _frame(records, "step")
    if len(steps):
        loss.plot(steps["step"], steps["loss"], lw=0.6, color="0.55", label="minibatch loss")
        loss.plot(steps["step"], steps["loss"].rolling(25, min_periods=1).mean(), color="k", lw=1.5,
                  label="rolling mean (25 steps)")
        _log_positive(loss, steps["loss"])
    loss.set(title="training loss", xlabel="SGD step")
    values = {ax: [] for ax in (alpha, tests, gsnr, scale)}
    for kind, (color, label) in UNIT_STYLE.items():
        d = _frame(records, kind)
        if d.empty:
            continue
        alpha.plot(d["step"], d["alpha"], "o", ms=3, color=color, label=label)
        values[alpha] += list(d["alpha"])
        for field, name, ls in TESTS:
            tests.plot(d["step"], d[field], ls=ls, color=color, label=f"{name}, {label}")
            values[tests] += list(d[field])
        gsnr.plot(d["step"], d["gsnr"], color=color, label=label)
        values[gsnr] += list(d["gsnr"])
        finite = d["noise_scale"].notna()
        scale.plot(d.loc[finite, "step"], d.loc[finite, "noise_scale"], color=color, marker=".", label=label)
        values[scale] += list(d.loc[finite, "noise_scale"]) or [np.nan]
        if (~finite).any():   # the noise drowns the signal: B_simple is infinite (stored as null), marked on top
            scale.plot(d.loc[~finite, "step"], np.ones(int((~finite).sum())), "x", color=color,
                       transform=scale.get_xaxis_transform(), clip_on=False,
                       label=f"∞: noise drowns the signal, {label}")
    alpha.axhline(0, color="0.3", lw=0.8)
    alpha.set_yscale("symlog", linthresh=1)   # linear on [-1, 1], where α is read; the rare far fits stay visible
    alpha.set(title="step quality α (0: line minimum; > 1: overshoot)", xlabel="SGD step",
              ylabel="α (symmetric log beyond ±1)")
    tests.axhline(1, color="0.3", lw=0.8)
    tests.set(title="gradient tests (< 1: the mean gradient suffices)", xlabel="SGD step")
    gsnr.set(title="mean gradient signal-to-noise ratio", xlabel="SGD step")
    scale.set(title="simple noise scale B_simple", xlabel="SGD step")
    for ax, v in values.items():
        if not v:
            ax.text(0.5, 0.5, "no gradient-noise records", ha="center", va="center", transform=ax.transAxes)
            continue
        if ax is not alpha:
            _log_positive(ax, v)
        ax.legend(fontsize="x-small")
    sharp = _frame(records, "sharpness")
    smooth = _frame(records, "smoothness")
    if len(sharp):
        curv.plot(sharp["step"], sharp["sharpness"], color="C3", label="λ_max (step-wise)")
        curv.plot(sharp["step"], sharp["stability_threshold"], "--", color="0.3", label="stability threshold")
    elif len(smooth) and "sharpness" in smooth and smooth["sharpness"].notna().any():
        curv.plot(smooth["step"], smooth["sharpness"], "o-", color="C3", label="λ_max (per pass)")
    else:
        curv.text(0.5, 0.5, "no λ_max records (--sharpness-every\nor --pass-sharpness)", ha="center", va="center",
                  transform=curv.transAxes)
    if curv.get_lines():
        curv.legend(fontsize="x-small")
    curv.set(title="sharpness λ_max of the train-mode Hessian", xlabel="SGD step")
    fig.suptitle(title)
    return fig


def has_gradient_noise(df, runs) -> bool:
    return bool(len(df)) and df["kind"].isin(list(KIND.values())).any()


def write_dashboards(results_dir, out_dir=None, notify=None) -> List[Path]:
    """``dashboard-<run>.png/.pdf`` for every run of a study with gradient-noise records."""
    from experiments.analysis.load import read_study
    out_dir = Path(results_dir) / "figures" if out_dir is None else Path(out_dir)
    paths: List[Path] = []
    for run in read_study(results_dir):
        if any(r.get("kind") in KIND.values() for r in run.records):
            paths += save_figure(dashboard(run.records, run.path.name), out_dir, f"dashboard-{run.path.name}")
    return paths


def run_dashboard(run_dir: Path, records: Sequence[dict], out_dir: Path) -> List[Path]:
    """The dashboard of one run's records (as `watch` read them while the run writes)."""
    return save_figure(dashboard(records, run_dir.name), out_dir, f"dashboard-{run_dir.name}")


DASHBOARDS = StudyWriter("dashboard", has_gradient_noise, write_dashboards)
