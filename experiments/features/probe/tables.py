"""Per-step-size view of the line probes: where along d = −g the effective β (a max over step sizes) comes from."""
from __future__ import annotations

import pandas as pd

from experiments.analysis.load import RunData, model_order, run_fields
from experiments.analysis.metrics import AVERAGED, WITH_UNFINISHED


def beta_by_step_size(study: list[RunData], include_unfinished: bool = False) -> pd.DataFrame:
    """Median over all probes (all seeds) of ‖∇L(w+s·d) − ∇L(w)‖ / ‖s·d‖ at each step size s, per model and lr.

    With the default direction d = −g, ‖s·d‖ = s·‖g‖ (``grad_norm`` in the record). Step sizes are reported in units
    of the learning rate. The runs are those the report averages (``metrics.averaged``): diverged runs never.
    """
    rows = []
    statuses = WITH_UNFINISHED if include_unfinished else AVERAGED
    for run in study:
        f = run_fields(run)
        if f["status"] not in statuses:
            continue
        for r in run.records:
            if r.get("kind") != "probe" or not r.get("grad_norm"):
                continue
            for s, g in zip(r["step_sizes"], r["grad_diff_norms"]):
                if g is not None:
                    rows.append({"model": f["model"], "lr": f["lr"], "s_over_lr": round(s / f["lr"], 3),
                                 "ratio": g / (s * r["grad_norm"])})
    if not rows:
        return pd.DataFrame(columns=["model", "lr", "s_over_lr", "median_ratio"])
    df = pd.DataFrame(rows)
    out = df.groupby(["model", "lr", "s_over_lr"], as_index=False)["ratio"].median()
    order = {m: i for i, m in enumerate(model_order(out["model"]))}
    out = out.rename(columns={"ratio": "median_ratio"})
    return out.sort_values(["lr", "model", "s_over_lr"], key=lambda c: c.map(order) if c.name == "model" else c,
                           ignore_index=True)


def render_by_step_size(table: pd.DataFrame) -> list[str]:
    if table.empty:
        return []
    lines = ["", "## Gradient change per unit distance, by probe step size", "",
             "Median over the probes of the averaged runs (all seeds pooled) of ‖∇L(w+s·d) − ∇L(w)‖₂ / ‖s·d‖₂ (BN "
             "mode of the probes). The effective β of a probe is the maximum of this row over s.", ""]
    for lr, at_lr in table.groupby("lr", sort=True):
        steps = sorted(at_lr["s_over_lr"].unique())
        lines += [f"η = {lr:g}:", "", "| model | " + " | ".join(f"s = {s:g}η" for s in steps) + " |",
                  "|---|" + "---|" * len(steps)]
        for model, g in at_lr.groupby("model", sort=False):
            by = dict(zip(g["s_over_lr"], g["median_ratio"]))
            lines.append(f"| {model} | " + " | ".join(f"{by[s]:.3g}" if s in by else "–" for s in steps) + " |")
        lines.append("")
    return lines


def report_section(study: list[RunData], include_unfinished: bool = False) -> list[str]:
    """The probe feature's section of report.md."""
    return render_by_step_size(beta_by_step_size(study, include_unfinished))
