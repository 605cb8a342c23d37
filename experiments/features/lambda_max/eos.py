"""Edge of stability (Cohen et al. 2021, Figure 1): training loss and sharpness against the step, one colour per
learning rate, each with its stability threshold as a dashed line of the same colour; and the numbers that say
whether the sharpness settled at the threshold.

Input: the ``sharpness`` records a run writes every ``--sharpness-every`` steps (results/README.md): ``sharpness``
(λ_max of the loss Hessian), for Adam/AdamW also ``preconditioned_sharpness`` (λ_max(P⁻¹H)), and
``stability_threshold``: the optimizer's threshold at that step's learning rate (experiments.optim:
2/η for gradient descent, 38/η for Adam's preconditioned sharpness at β₁ = 0.9). The quantity compared with the
threshold is the preconditioned sharpness where a run records it, else the sharpness.

``eos_table`` measures, per run, progressive sharpening (the sharpness at the first measurement and the step at
which it first reaches the threshold) and the plateau: the fraction of the measurements from that step on that lie
within ±10% of the threshold (``BAND``). Cohen et al. report the sharpness "hovers right at, or just above" 2/η.

``smoothness-lab plot`` draws the figure (``eos``) and writes the table (``eos.md``).
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from experiments.analysis.plots import FigureWriter
from experiments.plotstyle import styled

BAND = 0.10          # "at the threshold" means within ±10% of it
EOS_KIND = "sharpness"
EOS_COLUMNS = ["run", "model", "seed", "lr", "status", "quantity", "threshold", "n_measurements",
               "initial_sharpness", "first_crossing_step", "n_after_crossing", "fraction_within_band",
               "median_ratio_after_crossing", "max_ratio"]


def _series(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    rows = df[(df["kind"] == EOS_KIND) & (df["metric"] == metric)]
    return rows[["run", "step", "value"]].astype({"step": int, "value": float})


def eos_measurements(df: pd.DataFrame) -> pd.DataFrame:
    """One row per sharpness measurement: run, step, value (the quantity compared with the threshold), threshold,
    quantity ("sharpness" or "preconditioned_sharpness"). Empty when no run measured sharpness every N steps."""
    thr = _series(df, "stability_threshold").rename(columns={"value": "threshold"})
    if thr.empty:
        return pd.DataFrame(columns=["run", "step", "value", "threshold", "quantity"])
    out = []
    pre = _series(df, "preconditioned_sharpness")
    plain = _series(df, "sharpness")
    for run, t in thr.groupby("run", sort=False):
        use = pre[pre["run"] == run]
        quantity = "preconditioned_sharpness" if not use.empty else "sharpness"
        if use.empty:
            use = plain[plain["run"] == run]
        merged = use.merge(t[["step", "threshold"]], on="step").sort_values("step")
        out.append(merged.assign(quantity=quantity))
    return pd.concat(out, ignore_index=True)


def eos_table(df: pd.DataFrame, runs: pd.DataFrame, band: float = BAND) -> pd.DataFrame:
    """Per run: progressive sharpening and the plateau at the threshold (module docstring). NaN where a run never
    reaches its threshold. A measurement whose value is missing (a non-finite sharpness) counts as outside."""
    m = eos_measurements(df)
    rows = []
    for run, g in m.groupby("run", sort=False):
        info = runs[runs["run"] == run].iloc[0]
        ratio = (g["value"] / g["threshold"]).to_numpy()
        crossed = np.flatnonzero(ratio >= 1.0)
        first = int(crossed[0]) if len(crossed) else None
        after = ratio[first:] if first is not None else np.array([])
        rows.append({
            "run": run, "model": info["model"], "seed": info["seed"], "lr": info["lr"], "status": info["status"],
            "quantity": g["quantity"].iloc[0], "threshold": float(g["threshold"].iloc[0]), "n_measurements": len(g),
            "initial_sharpness": float(g["value"].iloc[0]),
            "first_crossing_step": int(g["step"].iloc[first]) if first is not None else None,
            "n_after_crossing": len(after),
            "fraction_within_band": float(np.mean(np.abs(after - 1) <= band)) if len(after) else math.nan,
            "median_ratio_after_crossing": float(np.nanmedian(after)) if len(after) else math.nan,
            "max_ratio": float(np.nanmax(ratio)) if np.isfinite(ratio).any() else math.nan})
    table = pd.DataFrame(rows, columns=EOS_COLUMNS)
    table["first_crossing_step"] = table["first_crossing_step"].astype("Int64")
    return table.sort_values(["model", "lr", "seed"], ignore_index=True)


def eos_markdown(table: pd.DataFrame, band: float = BAND) -> str:
    """The report's section: one line per run, and how to read it."""
    if table.empty:
        return ""
    lines = [f"## Edge of stability\n",
             f"Sharpness measured every few steps against the optimizer's stability threshold (2/η for gradient "
             f"descent; (2+2β₁)/((1−β₁)η) for Adam's preconditioned sharpness). *Crossing*: the first measurement at "
             f"or above the threshold; *within ±{band:.0%}*: the fraction of the measurements from the crossing on "
             f"that lie within ±{band:.0%} of the threshold.\n",
             "| model | η | seed | threshold | initial | first crossing (step) | measurements after | "
             f"within ±{band:.0%} | median ratio after | max ratio | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in table.itertuples():
        cross = "never" if pd.isna(r.first_crossing_step) else str(int(r.first_crossing_step))
        frac = "–" if math.isnan(r.fraction_within_band) else f"{r.fraction_within_band:.2f}"
        med = "–" if math.isnan(r.median_ratio_after_crossing) else f"{r.median_ratio_after_crossing:.3f}"
        name = r.model + (" (P⁻¹H)" if r.quantity == "preconditioned_sharpness" else "")
        lines.append(f"| {name} | {r.lr:g} | {r.seed} | {r.threshold:.4g} | {r.initial_sharpness:.4g} | {cross} | "
                     f"{r.n_after_crossing} | {frac} | {med} | {r.max_ratio:.3g} | {r.status} |")
    return "\n".join(lines) + "\n"


def has_stepwise_sharpness(df: pd.DataFrame, runs: pd.DataFrame) -> bool:
    """Whether some run measured its sharpness every few steps (``sharpness`` records): the EoS figure applies."""
    return not eos_measurements(df).empty


@styled
def eos_figure(df: pd.DataFrame, runs: pd.DataFrame) -> Figure | None:
    """Cohen et al.'s Figure 1: per model (column), the training loss (top, log scale) and the sharpness (bottom)
    against the step; one colour per η, the run's threshold dashed in its colour, × where a run diverged.
    None when the study has no step-wise sharpness records."""
    import seaborn as sns

    m = eos_measurements(df)
    if m.empty:
        return None
    runs = runs[runs["run"].isin(m["run"])]
    models = sorted(runs["model"].unique())
    lrs = sorted(runs["lr"].unique())
    colour = dict(zip(lrs, sns.color_palette("colorblind", len(lrs))))
    fig = Figure(figsize=(max(8.0, 6.0 * len(models)), 7.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, len(models), squeeze=False, sharex="col")
    loss = df[(df["kind"] == "step") & (df["metric"] == "loss")]
    quantities = set(m["quantity"])
    for col, model in enumerate(models):
        top, bottom = axes[0, col], axes[1, col]
        for r in runs[runs["model"] == model].sort_values(["lr", "seed"]).itertuples():
            c = colour[r.lr]
            lr_loss = loss[loss["run"] == r.run].sort_values("step")
            top.plot(lr_loss["step"].astype(float), lr_loss["value"], color=c, lw=1.2)
            s = m[m["run"] == r.run]
            bottom.plot(s["step"], s["value"], color=c, lw=1.2, marker="o", ms=2.5)
            for t in sorted(set(s["threshold"].round(12))):
                bottom.axhline(t, color=c, ls="--", lw=1.0)
            if r.status == "diverged" and not pd.isna(r.diverged_step):
                for ax in (top, bottom):
                    ax.plot([float(r.diverged_step)], [1.0], marker="x", ms=9, mew=2, color=c, clip_on=False,
                            transform=ax.get_xaxis_transform())
        top.set_yscale("log")
        top.set(title=model, ylabel="step loss (before update)")
        which = " / ".join(sorted(quantities & set(m[m["run"].isin(runs[runs["model"] == model]["run"])]
                                                    ["quantity"])))
        bottom.set(xlabel="step", ylabel={"sharpness": "sharpness λ_max(H)",
                                           "preconditioned_sharpness": "preconditioned sharpness λ_max(P⁻¹H)"}
                   .get(which, which))
        top_thr = m["threshold"].max()
        bottom.set_ylim(0, max(1.15 * top_thr, 1.05 * float(np.nanmax(m["value"])) if len(m) else top_thr))
    handles = [Line2D([], [], color=colour[lr], lw=2, label=f"η = {lr:g}") for lr in lrs]
    handles.append(Line2D([], [], color="0.3", ls="--", label="stability threshold (2/η for GD)"))
    fig.legend(handles=handles, loc="outside lower center", ncols=min(5, len(handles)), frameon=False)
    fig.suptitle("Edge of stability (Cohen et al. 2021): sharpness rises to the threshold and hovers there")
    return fig


def _draw(df, runs, smooth, include_unfinished):
    return eos_figure(df, runs)


def _table(df, runs):
    return eos_markdown(eos_table(df, runs))


EOS = FigureWriter("eos", has_stepwise_sharpness, _draw, table=_table)
