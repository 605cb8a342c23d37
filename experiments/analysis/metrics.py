"""Per-run summary numbers, the unit that report tables and the lr-sweep figure aggregate over seeds.

Each metric reduces one run's records to one number: ``last`` takes the value of the latest record (by step), so a
final non-finite value stays NaN; ``median`` and ``p90`` (linear interpolation, as ``numpy.percentile``) skip NaN.

Which runs enter a mean is decided once, by ``averaged``, for the report and the figures alike: finished runs, plus
unfinished ones only when asked. Diverged runs never: their divergence is reported as an outcome of its own.
"""
from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from experiments.features import Metric, loss_name, metrics
from experiments.analysis.errors import AnalysisError
from experiments.analysis.load import bn_mode_of, select

__all__ = ["Metric", "METRICS", "loss_name", "averaged", "metric_rows", "metric_bn_mode", "run_metrics"]


class _Registered(Sequence):
    """The report's metrics: those the registered measurements declare (experiments/features/), in registry
    order, read on every use, so a measurement registered later is in the next report."""

    def __getitem__(self, i):
        return metrics()[i]

    def __len__(self):
        return len(metrics())

    def __repr__(self):
        return f"METRICS{metrics()!r}"


METRICS = _Registered()
RUN_ID_COLUMNS = ["run", "model", "seed", "lr", "variant", "options", "status"]
AVERAGED, WITH_UNFINISHED = ("done",), ("done", "unfinished")


def averaged(status: pd.Series, include_unfinished: bool = False) -> pd.Series:
    """Which runs enter means (report cells, bold figure curves): done runs; unfinished ones too if asked."""
    return status.isin(WITH_UNFINISHED if include_unfinished else AVERAGED)


def metric_rows(df: pd.DataFrame, metric: Metric) -> pd.DataFrame:
    """The per-record values a metric reduces: columns run, step, value (derived fields computed per record)."""
    if "-" in metric.field:
        hi, lo = (select(df, metric.kind, f).set_index(["run", "step"])["value"]
                  for f in metric.field.split("-"))
        diff = (hi - lo).dropna()  # only records that carry both fields
        return diff.rename("value").reset_index()
    return select(df, metric.kind, metric.field)[["run", "step", "value"]]


def metric_bn_mode(df: pd.DataFrame, metric: Metric) -> str:
    return bn_mode_of(df, metric.kind, metric.field.split("-")[0])


def _reduce(rows: pd.DataFrame, how: str) -> pd.Series:
    ordered = rows.sort_values(["run", "step"], kind="stable")
    if how == "last":
        return ordered.drop_duplicates("run", keep="last").set_index("run")["value"]
    grouped = ordered.groupby("run")["value"]
    if how == "median":
        return grouped.median()
    if how == "p90":
        return grouped.quantile(0.9)
    raise ValueError(f"unknown reduction {how!r}")


def run_metrics(df: pd.DataFrame, metrics=METRICS) -> pd.DataFrame:
    """One row per run (``RUN_ID_COLUMNS`` + one column per metric name); NaN where a run lacks the records."""
    runs = df[RUN_ID_COLUMNS].drop_duplicates("run").set_index("run")
    for m in tuple(metrics):
        rows = metric_rows(df, m)
        if rows.empty:
            runs[m.name] = float("nan")
            continue
        runs[m.name] = _reduce(rows, m.reduce).reindex(runs.index).astype(float)
    return runs.reset_index().sort_values(["model", "lr", "seed", "run"], ignore_index=True)


def finished_curves(table: pd.DataFrame, results_dir, what: str, notify=None, note: str = "") -> pd.DataFrame:
    """The rows of ``table`` (one per record, columns run/status/model/lr) that curves average: finished runs only,
    the left-out ones named through ``notify(message)``; the model labelled with its lr when the study has several.
    ``what`` names the records in the error when nothing finished; ``note`` is added to the message."""
    dropped = table[~averaged(table["status"])].drop_duplicates("run")
    if notify is not None and not dropped.empty:
        notify(f"left out {len(dropped)} run(s) that did not finish{note}: "
               + ", ".join(f"{r} ({s})" for r, s in zip(dropped["run"], dropped["status"])))
    table = table[averaged(table["status"])].reset_index(drop=True)
    if table.empty:
        raise AnalysisError(f"{results_dir}: {what} records only in unfinished runs; finish them "
                            f"(smoothness-lab run --resume) first")
    if table["lr"].nunique() > 1:
        table["model"] = [f"{m}, η={lr:g}" for m, lr in zip(table["model"], table["lr"])]
    return table
