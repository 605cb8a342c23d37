"""Summary tables of a study: per-run numbers first, then mean ± sd over seeds, then BN vs no-BN tests.

Per (model, lr) and metric: ``n`` runs averaged, their mean and sd (ddof=1). Diverged runs are counted, never
averaged; unfinished runs are counted and, unless ``include_unfinished``, not averaged either (their "final" values
are not final). Comparison (a, b): Δ = mean_b − mean_a, Welch's t-test (``scipy.stats.ttest_ind(equal_var=False)``)
and Hedges' g = J·(mean_b − mean_a)/s_pooled with s_pooled² = ((n_a−1)s_a² + (n_b−1)s_b²)/(n_a+n_b−2) and
J = 1 − 3/(4(n_a+n_b) − 9).
"""
from __future__ import annotations

import math
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from .load import AnalysisError, model_order, read_study, records_frame, runs_frame
from .metrics import METRICS, metric_bn_mode, run_metrics
from .probes import beta_by_step_size, render_by_step_size

SUMMARY_COLUMNS = ["lr", "metric", "label", "bn_mode", "model", "n", "mean", "sd", "diverged", "unfinished",
                   "compared_to", "diff", "p_welch", "hedges_g"]
READING_GUIDE = ("Each cell is mean ± sd over seeds (n = runs averaged; a run's number is computed first, then "
                 "averaged). Δ = b − a; p from Welch's t-test; effect size Hedges' g (pooled-sd Cohen's d with the "
                 "small-sample correction). Diverged runs are counted, never averaged.")


def comparison_pairs(models, compare=None) -> list[tuple[str, str]]:
    """``[compare]`` if given, else (X, "bn-X") for every model X whose "bn-" counterpart is in the study."""
    models = list(models)
    if compare is not None:
        missing = [m for m in compare if m not in models]
        if len(compare) != 2 or missing:
            raise AnalysisError(f"compare={tuple(compare)!r}: expected two of the study's models {models}")
        return [tuple(compare)]
    return [(m, f"bn-{m}") for m in models if f"bn-{m}" in models]


def hedges_g(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = len(a), len(b)
    if na < 2 or nb < 2:
        return math.nan
    pooled = math.sqrt(((na - 1) * np.var(a, ddof=1) + (nb - 1) * np.var(b, ddof=1)) / (na + nb - 2))
    if pooled == 0:
        return math.nan
    return (1 - 3 / (4 * (na + nb) - 9)) * (np.mean(b) - np.mean(a)) / pooled


def welch_p(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2 or len(b) < 2:
        return math.nan
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")  # zero variance in both groups: p is NaN, not an error
        return float(stats.ttest_ind(b, a, equal_var=False).pvalue)


def summary_table(df: pd.DataFrame, compare=None, include_unfinished: bool = False) -> pd.DataFrame:
    """One row per (lr, metric, model): n, mean, sd, diverged/unfinished counts (``SUMMARY_COLUMNS``).

    Comparison columns (compared_to, diff, p_welch, hedges_g) are filled on the row of model b of each pair.
    """
    per_run = run_metrics(df)
    averaged = per_run["status"].isin(["done", "unfinished"] if include_unfinished else ["done"])
    models = model_order(per_run["model"])
    pairs = comparison_pairs(models, compare)
    rows = []
    for lr in sorted(per_run["lr"].unique()):
        at_lr = per_run[per_run["lr"] == lr]
        for m in METRICS:
            values = {}
            for model in models:
                runs = at_lr[at_lr["model"] == model]
                v = runs.loc[averaged[runs.index], m.name].dropna().to_numpy()
                values[model] = v
                rows.append({"lr": lr, "metric": m.name, "label": m.label, "bn_mode": metric_bn_mode(df, m),
                             "model": model, "n": len(v), "mean": v.mean() if len(v) else math.nan,
                             "sd": v.std(ddof=1) if len(v) > 1 else math.nan,
                             "diverged": int((runs["status"] == "diverged").sum()),
                             "unfinished": int((runs["status"] == "unfinished").sum())})
            for a, b in pairs:
                if a in values and b in values:
                    row = next(r for r in reversed(rows) if r["model"] == b)
                    row.update(compared_to=a, diff=row["mean"] - np.mean(values[a]) if len(values[a]) else math.nan,
                               p_welch=welch_p(values[a], values[b]), hedges_g=hedges_g(values[a], values[b]))
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def _fmt(x, digits=4) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}g}"


def _cell(row) -> str:
    if row["n"] == 0:
        return "– (n=0)"
    sd = f" ± {_fmt(row['sd'], 3)}" if row["n"] > 1 else ""
    return f"{_fmt(row['mean'])}{sd} (n={row['n']})"


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def render_markdown(results_dir, table: pd.DataFrame, runs: pd.DataFrame, include_unfinished: bool) -> str:
    counts = runs["status"].value_counts()
    status_line = ", ".join(f"{counts.get(s, 0)} {s}" for s in ("done", "diverged", "unfinished"))
    modes = table.drop_duplicates("metric")
    lines = [f"# Smoothness report: {Path(results_dir).resolve().name}", "",
             f"Study: `{Path(results_dir).as_posix()}`; {len(runs)} runs: {status_line}.", "",
             "BatchNorm mode of each metric (from the records): "
             + "; ".join(f"{r['metric']}: {r['bn_mode']}" for _, r in modes.iterrows()) + ".", "",
             f"Reading guide: {READING_GUIDE} Unfinished runs are "
             + ("averaged with their latest records." if include_unfinished else "counted, not averaged."), "",
             "## Runs per model", ""]
    per_group = [[m, f"{lr:g}", *(str((g["status"] == k).sum()) for k in ("done", "diverged", "unfinished"))]
                 for m in model_order(runs["model"]) for lr, g in runs[runs["model"] == m].groupby("lr")]
    lines += _md_table(["model", "η", "done", "diverged", "unfinished"], per_group)
    for lr, at_lr in table.groupby("lr", sort=True):
        models = list(dict.fromkeys(at_lr["model"]))
        comps = at_lr.dropna(subset=["compared_to"]).drop_duplicates(["model", "compared_to"])
        header = ["metric", "BN mode", *models]
        for _, c in comps.iterrows():
            header += [f"Δ ({c['model']} − {c['compared_to']})", "p (Welch)", "Hedges' g"]
        body = []
        for metric, g in at_lr.groupby("metric", sort=False):
            by_model = g.set_index("model")
            row = [g["label"].iloc[0], g["bn_mode"].iloc[0], *(_cell(by_model.loc[m]) for m in models)]
            for _, c in comps.iterrows():
                r = by_model.loc[c["model"]]
                row += [_fmt(r["diff"]), _fmt(r["p_welch"], 3), _fmt(r["hedges_g"], 3)]
            body.append(row)
        lines += ["", f"## η = {lr:g}", ""] + _md_table(header, body)
    flagged = runs[runs["status"] != "done"]
    if len(flagged):
        lines += ["", "## Runs not averaged" if not include_unfinished else "## Diverged and unfinished runs", ""]
        for _, r in flagged.iterrows():
            where = (f"diverged at step {r['diverged_step']} (epoch {r['diverged_epoch']})"
                     if r["status"] == "diverged" else f"unfinished, {r['n_records']} records so far")
            lines.append(f"- `{r['run']}` ({r['model']}, η={r['lr']:g}, seed {r['seed']}): {where}")
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    """Write through a temp file in the same directory, so a failure never leaves a partial file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_report(results_dir, out_dir=None, compare=None, include_unfinished: bool = False) -> Path:
    """Write report.md and report.csv (the ``summary_table``) to ``out_dir`` (default: results_dir)."""
    study = read_study(results_dir)  # raises AnalysisError before anything is written
    df, runs = records_frame(study), runs_frame(study)
    if df.empty:
        raise AnalysisError(f"{results_dir}: no run has any records yet; nothing to report")
    table = summary_table(df, compare=compare, include_unfinished=include_unfinished)
    out_dir = Path(results_dir) if out_dir is None else Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / "report.csv", table.to_csv(index=False))
    md = out_dir / "report.md"
    text = render_markdown(results_dir, table, runs, include_unfinished)
    text += "\n".join(render_by_step_size(beta_by_step_size(study)))
    write_atomic(md, text)
    return md
