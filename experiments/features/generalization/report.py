"""Tables and the markdown report of sharpness versus generalisation (statistics in ``generalization``).

    results = analyse(df, ["worst_case_sharpness", "lambda_max"], axes=["lr", "batch_size", "bn"])
    summary_table(results)            # one row per measure: τ, Ψ, their intervals, ψ_i, τ within each lr, n

Intervals: a cluster bootstrap over configurations with the seeds resampled within each (``kendall`` module doc);
the report adds τ over configuration means and a paired comparison of every measure with the highest τ.
    write_report(df, measures, axes, "results/gen", gap_label="test error − train error")  # generalization.md/.csv

Within-lr rows follow Andriushchenko et al. (2023): τ over the runs at one learning rate, and Ψ over the other axes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from experiments.atomic import atomic_write_text
from experiments.features.generalization.kendall import (BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, CONFIDENCE, MIN_RUNS,
                                                         Bootstrap, Granulated, Tau, bootstrap, compare,
                                                         configuration_mean_tau, granulated_tau, kendall_tau,
                                                         usable_runs)
from experiments.analysis.tables import fmt as format_number, md_table as markdown_table

WITHIN_LR_COLUMNS = ["measure", "lr", "n", "n_not_reached", "tau", "tau_low", "tau_high", "psi", "note"]


@dataclass(frozen=True)
class MeasureResult:
    tau: Tau
    granulated: Granulated
    boot: Bootstrap
    within_lr: pd.DataFrame   # WITHIN_LR_COLUMNS, one row per learning rate (empty without an lr axis)


def within_lr(df: pd.DataFrame, measure: str, axes, lr: str = "lr", gap: str = "gap", seed: str | None = "seed",
              n_resamples: int = BOOTSTRAP_RESAMPLES, rng_seed: int = BOOTSTRAP_SEED) -> pd.DataFrame:
    """τ (with its bootstrap interval) and Ψ over ``axes`` minus ``lr``, at each learning rate separately.

    A learning rate with fewer than ``MIN_RUNS`` usable runs gets NaN and a note instead of an error.
    """
    usable_runs(df, measure, gap, list(axes) + [lr], seed, min_runs=0)  # bad columns raise here, not per lr
    others = [a for a in axes if a != lr]
    rows = []
    for value in sorted(df[lr].unique()):
        at = df[df[lr] == value]
        row = {"measure": measure, "lr": value, "n_not_reached": int((~at["reached"]).sum()), "note": ""}
        row["n"] = len(usable_runs(at, measure, gap, min_runs=0)[0])
        if row["n"] < MIN_RUNS:
            rows.append({**row, "tau": math.nan, "tau_low": math.nan, "tau_high": math.nan, "psi": math.nan,
                         "note": f"fewer than {MIN_RUNS} usable runs"})
            continue
        boot = bootstrap(at, measure, [], gap, seed, n_resamples, rng_seed, cluster=others)
        psi = granulated_tau(at, measure, others, gap, seed).value if others else math.nan
        rows.append({**row, "tau": kendall_tau(at, measure, gap).value, "tau_low": boot.tau.low,
                     "tau_high": boot.tau.high, "psi": psi})
    return pd.DataFrame(rows, columns=WITHIN_LR_COLUMNS)


def analyse(df: pd.DataFrame, measures, axes, gap: str = "gap", seed: str | None = "seed", lr: str | None = "lr",
            n_resamples: int = BOOTSTRAP_RESAMPLES, rng_seed: int = BOOTSTRAP_SEED) -> dict[str, MeasureResult]:
    """Every coefficient of every measure; ``lr=None`` (or an lr not among ``axes``) skips the within-lr rows."""
    axes, out = list(axes), {}
    for m in measures:
        wl = (within_lr(df, m, axes, lr, gap, seed, n_resamples, rng_seed) if lr in axes
              else pd.DataFrame(columns=WITHIN_LR_COLUMNS))
        out[m] = MeasureResult(kendall_tau(df, m, gap), granulated_tau(df, m, axes, gap, seed),
                               bootstrap(df, m, axes, gap, seed, n_resamples, rng_seed), wl)
    return out


def summary_table(results: dict[str, MeasureResult]) -> pd.DataFrame:
    """One row per measure: n used / not reached / missing, τ [CI] and p, Ψ [CI], ψ_<axis>, tau_lr=<value>."""
    rows = []
    for m, r in results.items():
        row = {"measure": m, "n_used": r.tau.n, "n_not_reached": r.tau.n_not_reached, "n_missing": r.tau.n_missing,
               "tau": r.tau.value, "tau_low": r.boot.tau.low, "tau_high": r.boot.tau.high, "tau_p": r.tau.p,
               "psi": r.granulated.value, "psi_low": r.boot.psi.low, "psi_high": r.boot.psi.high}
        row.update({f"psi_{a.axis}": a.value for a in r.granulated.axes})
        row.update({f"tau_lr={w['lr']:g}": w["tau"] for _, w in r.within_lr.iterrows()})
        rows.append(row)
    return pd.DataFrame(rows)


def axis_table(results: dict[str, MeasureResult]) -> pd.DataFrame:
    """One row per (measure, axis): ψ_i, its interval, cells used and skipped."""
    return pd.DataFrame([{"measure": m, "axis": a.axis, "psi": a.value, "psi_low": r.boot.axes[a.axis].low,
                          "psi_high": r.boot.axes[a.axis].high, "cells": a.cells,
                          "skipped_single_value": a.skipped_single_value, "skipped_undefined": a.skipped_undefined}
                         for m, r in results.items() for a in r.granulated.axes])


# -- markdown -----------------------------------------------------------------------------------------------------

def _ci(low, high) -> str:
    return "–" if math.isnan(low) else f"[{format_number(low, 3)}, {format_number(high, 3)}]"


def _run_line(r, axes, gap, seed) -> str:
    where = ", ".join(f"{a}={r[a]:g}" if isinstance(r[a], float) else f"{a}={r[a]}" for a in axes)
    where += f", seed {r[seed]}" if seed is not None else ""
    return f"- `{r['run']}` ({where}; gap {format_number(float(r[gap]))})"


def _comparison_lines(df, results, axes, gap, seed) -> list[str]:
    if len(results) < 2:
        return []
    best = max(results, key=lambda m: results[m].tau.value)
    n_resamples = next(iter(results.values())).boot.tau.n_resamples
    body = []
    for m in results:
        if m == best:
            continue
        d = compare(df, best, m, axes, gap, seed, n_resamples)
        tau_in = d.tau_interval.low <= 0 <= d.tau_interval.high
        body.append([m, format_number(d.tau, 3), _ci(d.tau_interval.low, d.tau_interval.high),
                     "yes" if tau_in else "no", format_number(d.psi, 3),
                     _ci(d.psi_interval.low, d.psi_interval.high), str(d.n)])
    return ["", f"## Paired comparison with the highest τ ({best})", "",
            f"τ_{best} − τ_m and Ψ_{best} − Ψ_m, with {CONFIDENCE:.0%} intervals from the same cluster resamples for "
            "both measures (over configurations, seeds within). An interval that holds 0 means the data do not "
            f"rank {best} above that measure.", ""] + markdown_table(
        ["measure m", "Δτ", "Δτ 95% CI", "0 in Δτ CI", "ΔΨ", "ΔΨ 95% CI", "n"], body)


def render_markdown(df: pd.DataFrame, results: dict[str, MeasureResult], axes, gap: str = "gap",
                    gap_label: str = "test loss − train loss", lr: str | None = "lr",
                    seed: str | None = "seed") -> str:
    axes = list(axes)
    first = next(iter(results.values()))
    boot = first.boot.tau
    used = df[df["reached"]]
    n_configs = used.groupby(axes, dropna=False).ngroups
    per_config = used.groupby(axes, dropna=False).size()
    seeds_line = (f"{per_config.iloc[0]} seeds each" if per_config.nunique() == 1
                  else f"{per_config.min()} to {per_config.max()} seeds")
    not_reached = df[~df["reached"]]
    lines = [
        "# Sharpness versus generalisation", "",
        f"Gap (`{gap}`): **{gap_label}**. {len(df)} runs: {int(df['reached'].sum())} reached the target training "
        f"loss and enter the coefficients; {len(not_reached)} did not (listed below, never used).", "",
        "- **τ**: Kendall's τ-b between the measure and the gap over the runs that reached the target (Jiang et al. "
        "2020, *Fantastic Generalization Measures and Where to Find Them*). +1: the measure orders the runs as their "
        "gap does; −1: in reverse; 0: no relation.",
        "- **Ψ**: Jiang et al.'s granulated τ. For axis i, ψ_i is the mean τ over the cells in which only θ_i varies "
        "(all other axes and the seed fixed); Ψ is the mean of ψ_i over the axes (" + ", ".join(axes) + "). A "
        "measure can reach a high τ only because it and the gap both follow one axis; Ψ asks whether it follows "
        "the gap when one hyper-parameter changes at a time.",
        f"- **Intervals**: {CONFIDENCE:.0%} percentile cluster bootstrap ({boot.n_resamples} study-wide resamples, "
        f"fixed seed). The unit is the configuration ({n_configs} here: one combination of "
        + ", ".join(axes) + f"; {seeds_line}), not the run: each resample draws the configurations with replacement "
        "and then, for each drawn configuration, its seeds with replacement. Drawing seeds within a configuration "
        "puts the seed-to-seed noise of Ψ's cells into the Ψ interval. τ and Ψ are recomputed on the same resamples.",
        "- **τ over configuration means**: τ after averaging measure and gap over the seeds of each configuration; "
        "where it orders the measures differently from τ, the order rests on seed noise.",
    ]
    if lr in axes:
        lines.append("- **Within a fixed learning rate** (Andriushchenko et al. 2023, *A Modern Look at the "
                     "Relationship between Sharpness and Generalization*): a measure that tracks the gap only across "
                     "learning rates shows τ ≈ 0 (or < 0) here.")
    lr_cols = [c for c in summary_table(results).columns if c.startswith("tau_lr=")]
    body = [[m, f"{r.tau.n} (+{r.tau.n_missing} missing)" if r.tau.n_missing else str(r.tau.n),
             format_number(r.tau.value, 3), _ci(r.boot.tau.low, r.boot.tau.high),
             format_number(configuration_mean_tau(df, m, axes, gap).value, 3),
             format_number(r.granulated.value, 3), _ci(r.boot.psi.low, r.boot.psi.high),
             *(format_number(a.value, 3) for a in r.granulated.axes),
             *(format_number(w, 3) for w in r.within_lr["tau"])] for m, r in results.items()]
    lines += ["", "## τ and Ψ per measure", ""] + markdown_table(
        ["measure", "n", "τ", "τ 95% CI", "τ over configuration means", "Ψ", "Ψ 95% CI", *(f"ψ {a}" for a in axes),
         *(f"τ at η={c.split('=', 1)[1]}" for c in lr_cols)], body)
    lines += _comparison_lines(df, results, axes, gap, seed)
    body = [[m, a.axis, format_number(a.value, 3), _ci(r.boot.axes[a.axis].low, r.boot.axes[a.axis].high),
             str(a.cells), str(a.skipped_single_value), str(a.skipped_undefined)]
            for m, r in results.items() for a in r.granulated.axes]
    lines += ["", "## ψ_i per axis", "", "Cells are (other axes, seed) combinations; a cell is skipped when the axis "
              "takes a single value in it, or when τ is undefined there (measure or gap constant).", ""]
    lines += markdown_table(["measure", "axis", "ψ_i", "95% CI", "cells used", "skipped: one value",
                             "skipped: τ undefined"], body)
    if lr in axes:
        body = [[m, f"{w['lr']:g}", str(w["n"]), str(w["n_not_reached"]), format_number(w["tau"], 3),
                 _ci(w["tau_low"], w["tau_high"]), format_number(w["psi"], 3), w["note"]]
                for m, r in results.items() for _, w in r.within_lr.iterrows()]
        lines += ["", "## Within a fixed learning rate", ""]
        lines += markdown_table(["measure", "η", "n", "not reached", "τ", "τ 95% CI",
                                 "Ψ over " + ", ".join(a for a in axes if a != lr), "note"], body)
    lines += ["", "## Runs that did not reach the target", ""]
    lines += [_run_line(r, axes, gap, seed) for _, r in not_reached.iterrows()] or ["None."]
    missing = [(m, usable_runs(df, m, gap, min_runs=0)[2]["run"]) for m in results]
    if any(len(runs) for _, runs in missing):
        lines += ["", "## Reached the target but a value is missing", ""]
        lines += [f"- {m}: " + ", ".join(f"`{r}`" for r in runs) for m, runs in missing if len(runs)]
    return "\n".join(lines) + "\n"


def write_report(df: pd.DataFrame, measures, axes, out_dir, gap: str = "gap",
                 gap_label: str = "test loss − train loss", seed: str | None = "seed", lr: str | None = "lr",
                 n_resamples: int = BOOTSTRAP_RESAMPLES, rng_seed: int = BOOTSTRAP_SEED,
                 results: dict[str, MeasureResult] | None = None) -> Path:
    """Write generalization.md and generalization.csv (``summary_table``) to ``out_dir``; return the .md path.
    ``results``: the ``analyse`` output for these arguments, when the caller has it already (figures need it too)."""
    if results is None:
        results = analyse(df, measures, axes, gap, seed, lr, n_resamples, rng_seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "generalization.csv", summary_table(results).to_csv(index=False))
    atomic_write_text(out_dir / "generalization.md", render_markdown(df, results, axes, gap, gap_label, lr, seed))
    return out_dir / "generalization.md"
