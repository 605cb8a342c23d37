"""A study's runs as the table the sharpness-vs-generalisation analysis takes (``generalization``): one row per
finished run with its hyper-parameter axes, whether it reached the target training loss, the generalisation gap at
its last evaluation and the measures of its last ``generalization`` record; then the report and figures.

The gap is Jiang et al.'s: test error − training error (errors = 1 − accuracy, the training error on the whole
training subset), at the run's last evaluation, which is where a run with a target stopped.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from experiments.analysis.plots import StudyWriter, has_kind
from experiments.features.generalization.compute import FIELDS
from experiments.analysis.errors import AnalysisError
from experiments.features.generalization.figures import write_figures
from experiments.features.generalization.report import analyse, write_report
from experiments.analysis.load import read_study

AXES = ("lr", "batch_size", "weight_decay", "bn")
GAP_LABEL = "test error − training error"


def _last(records: list, kind: str) -> dict | None:
    return next((r for r in reversed(records) if r.get("kind") == kind), None)


def study_table(results_dir) -> pd.DataFrame:
    """One row per finished run with a ``generalization`` record (module docstring); unfinished and diverged runs
    are left out (named in the AnalysisError when nothing is left)."""
    rows, skipped = [], []
    for run in read_study(results_dir):
        c, gen, ev = run.config, _last(run.records, "generalization"), _last(run.records, "eval")
        if run.status != "done" or gen is None or ev is None:
            skipped.append(f"{run.path.name} ({run.status}{', no generalization record' if gen is None else ''})")
            continue
        target = _last(run.records, "target")
        rows.append({"run": run.path.name, "model": c["model"], "bn": c["model"].startswith("bn-"),
                     "lr": float(c["lr"]), "batch_size": int(c["batch_size"]),
                     "weight_decay": float(c.get("weight_decay", 0.0)), "seed": int(c["seed"]),
                     "reached": bool(target["reached"]) if target is not None else True,
                     "gap": ev["train_accuracy"] - ev["test_accuracy"],
                     "loss_gap": ev["test_loss"] - ev["train_loss"], "train_loss": ev["train_loss"],
                     "test_accuracy": ev["test_accuracy"], "step": gen["step"],
                     **{f: gen.get(f) for f in FIELDS}})
    if not rows:
        raise AnalysisError(f"{results_dir}: no finished run with a generalization record (run the study with "
                            f"--generalization-every, e.g. the 'generalization' preset); left out: "
                            f"{', '.join(skipped) or 'nothing'}")
    return pd.DataFrame(rows).sort_values(["model", "lr", "batch_size", "weight_decay", "seed"], ignore_index=True)


def write_generalization(results_dir, out_dir=None, n_resamples: int = 2000) -> list[Path]:
    """generalization.md / .csv in the study folder and the two figures in ``out_dir`` (default its figures/)."""
    results_dir = Path(results_dir)
    df = study_table(results_dir)
    axes = [a for a in AXES if df[a].nunique() > 1]
    if not axes:
        raise AnalysisError(f"{results_dir}: the runs do not vary any of {', '.join(AXES)}; Kendall's τ across "
                            f"hyper-parameters needs a grid (e.g. the 'generalization' preset)")
    measures = [f for f in FIELDS if df[f].notna().any()]
    lr = "lr" if "lr" in axes else None
    results = analyse(df, measures, axes, lr=lr, n_resamples=n_resamples)
    report = write_report(df, measures, axes, results_dir, gap_label=GAP_LABEL, lr=lr, n_resamples=n_resamples,
                          results=results)
    figures = write_figures(df, results, results_dir / "figures" if out_dir is None else Path(out_dir),
                            gap_label=GAP_LABEL)
    return [report, results_dir / "generalization.csv", *figures]


def _write(results_dir, out_dir=None, notify=None) -> list[Path]:
    return write_generalization(results_dir, out_dir)


GENERALIZATION = StudyWriter("generalization", has_kind("generalization"), _write)
