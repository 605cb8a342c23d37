"""Read a study's run directories into pandas tables.

A study directory holds one directory per run (``config.json`` + ``records.jsonl``, see ``results/README.md``).
``load`` melts every numeric field of every record into one long-form row; ``load_runs`` gives one row per run.
Unfinished and diverged runs are kept and flagged in ``status``; nothing is dropped silently.
"""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

LONG_COLUMNS = ["run", "model", "seed", "lr", "norm", "dataset", "status", "kind", "step", "epoch", "metric",
                "value", "bn_mode"]
RUN_COLUMNS = ["run", "model", "seed", "lr", "norm", "dataset", "status", "diverged_step", "diverged_epoch",
               "n_records", "path"]
_RECORD_KEYS = {"kind", "step", "epoch", "bn_mode"}
_EXPECTED = "run directories, each holding config.json and records.jsonl (see results/README.md)"


class AnalysisError(RuntimeError):
    """The results directory cannot be analysed; the message says what was wrong and what was expected."""


@dataclass
class RunData:
    """One run directory, parsed."""
    path: Path
    config: dict
    records: list = field(default_factory=list)
    done: bool = False

    @property
    def diverged(self) -> dict | None:
        return next((r for r in self.records if r.get("kind") == "diverged"), None)

    @property
    def status(self) -> str:
        # A diverged run may also write `done`; divergence is the more important fact.
        if self.diverged is not None:
            return "diverged"
        return "done" if self.done else "unfinished"


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise AnalysisError(f"{path}: cannot be read as JSON ({err}); expected the run's RunConfig object") from None
    if not isinstance(data, dict):
        raise AnalysisError(f"{path}: expected a JSON object (the run's RunConfig), got {type(data).__name__}")
    return data


def _read_records(path: Path, done: bool) -> list[dict]:
    """Parse records.jsonl; a corrupt last line of an unfinished run (killed mid-write) is skipped with a warning."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "kind" not in record:
                raise ValueError("not a JSON object with a 'kind' key")
        except ValueError as err:
            if i == last and not done:
                warnings.warn(f"{path}, line {i + 1}: skipping a truncated last record of an unfinished run "
                              f"(the line being written when the run stopped)", stacklevel=3)
                continue
            raise AnalysisError(f"{path}, line {i + 1}: corrupt record ({err}). Each line must be one JSON "
                                f"object; only the last line of an unfinished run may be truncated.") from None
        records.append(record)
    return records


def _run_dirs(root: Path) -> list[Path]:
    if not root.exists():
        raise AnalysisError(f"results directory {root} does not exist; expected a study directory of {_EXPECTED}")
    if not root.is_dir():
        raise AnalysisError(f"{root} is not a directory; expected a study directory of {_EXPECTED}")
    if (root / "config.json").is_file():
        return [root]
    entries = sorted(root.iterdir())
    if not entries:
        raise AnalysisError(f"results directory {root} is empty; expected {_EXPECTED}")
    runs = [d for d in entries if d.is_dir() and (d / "config.json").is_file()]
    if not runs:
        studies = [d.name for d in entries if d.is_dir() and any(
            (sub / "config.json").is_file() for sub in d.iterdir() if sub.is_dir())]
        hint = (f" It looks like a results root holding the studies {studies}: pass one of them."
                if studies else "")
        found = ", ".join(e.name for e in entries[:8]) + (", ..." if len(entries) > 8 else "")
        raise AnalysisError(f"{root} holds no run directories (found: {found}); expected {_EXPECTED}.{hint}")
    return runs


def read_study(results_dir) -> list[RunData]:
    """Parse every run directory of a study (or a single run directory)."""
    runs = []
    for d in _run_dirs(Path(results_dir)):
        done = (d / "done").exists()
        run = RunData(d, _read_json(d / "config.json"), _read_records(d / "records.jsonl", done), done)
        if not run.records:
            warnings.warn(f"{d}: run has no records yet (status {run.status}); it appears in load_runs only",
                          stacklevel=2)
        runs.append(run)
    return runs


def model_label(model: str, norm) -> str:
    """The name a study used for the model: ``convnet``, ``bn-convnet``, or ``convnet:noisy`` when the norm is not
    the model's default, so that norm variants of one network get curves and table columns of their own."""
    from ..models import MODELS
    spec = MODELS.get(model)
    return model if spec is None or norm in (None, spec.default_norm) else f"{model}:{norm}"


def _run_fields(run: RunData) -> dict:
    c = run.config
    lr = c.get("lr")
    return {"run": c.get("run_id") or run.path.name, "model": model_label(str(c.get("model", "?")), c.get("norm")),
            "seed": c.get("seed"), "lr": float(lr) if lr is not None else math.nan,
            "norm": str(c.get("norm") if c.get("norm") is not None else "none"),
            "dataset": str(c.get("dataset", "?")), "status": run.status}


def _is_number(v) -> bool:
    # null stands for a non-finite number in the records; lists and strings are not melted.
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


def _frame(rows: list, columns: list[str]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=columns)
    for col in ("seed", "step", "epoch", "diverged_step", "diverged_epoch", "n_records"):
        if col in df:
            df[col] = df[col].astype("Int64")
    for col in ("lr", "value"):
        if col in df:
            df[col] = df[col].astype(float)
    return df


def runs_frame(runs: list[RunData]) -> pd.DataFrame:
    rows = []
    for run in runs:
        div = run.diverged or {}
        rows.append({**_run_fields(run), "diverged_step": div.get("step"), "diverged_epoch": div.get("epoch"),
                     "n_records": len(run.records), "path": str(run.path)})
    return _frame(rows, RUN_COLUMNS).sort_values(["model", "lr", "seed", "run"], ignore_index=True)


def records_frame(runs: list[RunData]) -> pd.DataFrame:
    rows = []
    for run in runs:
        f = _run_fields(run)
        head = (f["run"], f["model"], f["seed"], f["lr"], f["norm"], f["dataset"], f["status"])
        for r in run.records:
            for key, value in r.items():
                if key not in _RECORD_KEYS and _is_number(value):
                    rows.append(head + (r["kind"], r.get("step"), r.get("epoch"), key,
                                        math.nan if value is None else float(value), r.get("bn_mode")))
    return _frame(rows, LONG_COLUMNS)


def load(results_dir) -> pd.DataFrame:
    """Long-form table of a study: one row per numeric field per record (columns ``LONG_COLUMNS``).

    ``status`` is ``done``, ``diverged`` (a ``diverged`` record exists, whether or not ``done`` does) or
    ``unfinished``. Nulls (non-finite numbers) become NaN. Raises AnalysisError on unreadable input.
    """
    return records_frame(read_study(results_dir))


def load_runs(results_dir) -> pd.DataFrame:
    """One row per run: identity, status, divergence step/epoch (if any), number of records, directory."""
    return runs_frame(read_study(results_dir))


def select(df: pd.DataFrame, kind: str, metric: str, bn_mode: str | None = None) -> pd.DataFrame:
    """Rows of one metric of one record kind, in one BatchNorm mode.

    With ``bn_mode=None``: the only mode present, or ``batch`` (the loss SGD optimises) when records carry several.
    """
    rows = df[(df["kind"] == kind) & (df["metric"] == metric)]
    if bn_mode is None:
        modes = sorted(rows["bn_mode"].dropna().unique())
        bn_mode = modes[0] if len(modes) == 1 else ("batch" if "batch" in modes else None)
    if bn_mode is not None:
        rows = rows[rows["bn_mode"] == bn_mode]
    return rows


def model_order(models) -> list[str]:
    """Models sorted with each no-norm baseline just before its "bn-" variant: convnet, bn-convnet, mlp, ..."""
    return sorted(set(models), key=lambda m: (m.removeprefix("bn-"), m.startswith("bn-")))


def bn_mode_of(df: pd.DataFrame, kind: str, metric: str) -> str:
    modes = select(df, kind, metric)["bn_mode"].dropna().unique()
    return "/".join(sorted(modes)) or "n/a"
