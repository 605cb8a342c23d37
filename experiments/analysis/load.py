"""Read a study's run directories into pandas tables.

A study directory holds one directory per run (``config.json`` + ``records.jsonl``, see ``results/README.md``).
``load`` melts every numeric field of every record into one long-form row; ``load_runs`` gives one row per run.
Unfinished and diverged runs are kept and flagged in ``status``; nothing is dropped silently: a directory that holds
run files but no config.json stops the analysis with its name, and a malformed line stops it with ``file:line``.

``model`` is the group a run is averaged in: the model label (``convnet``, ``convnet:noisy``), followed by
``[variant]`` when the folder holds several configurations (``pairing``); ``options`` identifies the configuration
apart from model, seed and lr, so that runs of two models pair on (lr, seed, options).
"""
from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .errors import AnalysisError
from .pairing import group_label, options_key, variant_labels

LONG_COLUMNS = ["run", "model", "seed", "lr", "norm", "dataset", "loss", "variant", "options", "status", "kind", "step",
                "epoch", "metric", "value", "bn_mode"]
RUN_COLUMNS = ["run", "model", "seed", "lr", "norm", "dataset", "loss", "variant", "options", "status", "diverged_step",
               "diverged_epoch", "n_records", "path"]
_RECORD_KEYS = {"kind", "step", "epoch", "bn_mode"}
_EXPECTED = "run directories, each holding config.json and records.jsonl (see results/README.md)"
# Files that make a directory a run directory (results/README.md); one of them without config.json is a broken run.
_RUN_FILES = ("records.jsonl", "done", "timing.json", "checkpoints")
# Record fields of the schema (results/README.md) and the types they must have; other fields are free-form.
_NUMBERS = {"loss", "accuracy", "base_loss", "grad_norm", "loss_min", "loss_max", "grad_pred_min", "grad_pred_max",
            "effective_beta", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "local_smoothness",
            "sharpness", "sharpness_n_hvp"}
_NUMBER_LISTS = {"step_sizes", "losses", "grad_diff_norms"}
_COUNTS = {"step", "epoch"}


@dataclass
class RunData:
    """One run directory, parsed."""
    path: Path
    config: dict
    records: list = field(default_factory=list)
    done: bool = False
    lines: list = field(default_factory=list)   # the line of records.jsonl each record was read from
    variant: str = ""   # the options that set this run apart from other runs of the folder (pairing.variant_labels)

    @property
    def diverged(self) -> dict | None:
        return next((r for r in self.records if r.get("kind") == "diverged"), None)

    @property
    def status(self) -> str:
        # A diverged run may also write `done`; divergence is the more important fact.
        if self.diverged is not None:
            return "diverged"
        return "done" if self.done else "unfinished"


def _key_line(text: str, key: str) -> int:
    """The line of ``"key":`` in a JSON text (1 if not found): error messages point at file:line."""
    m = re.search(rf'^.*"{re.escape(key)}"\s*:', text, flags=re.MULTILINE)
    return text.count("\n", 0, m.start()) + 1 if m else 1


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check_config(path: Path, text: str, config: dict) -> None:
    """The fields the analysis groups and pairs on must have their RunConfig types."""
    problems = []
    for key in ("model", "seed", "lr"):
        if key not in config:
            problems.append((key, f'has no "{key}"'))
    if "model" in config and not isinstance(config["model"], str):
        problems.append(("model", f'"model" must be a model name (string), got {config["model"]!r}'))
    if config.get("norm") is not None and not isinstance(config["norm"], str):
        problems.append(("norm", f'"norm" must be a norm name (string) or null, got {config["norm"]!r}'))
    if "seed" in config and not _is_count(config["seed"]):
        problems.append(("seed", f'"seed" must be a non-negative integer, got {config["seed"]!r}'))
    lr = config.get("lr")
    if "lr" in config and not (_is_number(lr) and lr is not None and math.isfinite(lr) and lr > 0):
        problems.append(("lr", f'"lr" must be a positive number, got {lr!r}'))
    if problems:
        key, what = problems[0]
        raise AnalysisError(f"{path}:{_key_line(text, key)}: {what}; expected the run's RunConfig as written by "
                            f"the toolkit (fix the file or move the run directory out of the study)")


def _read_json(path: Path) -> dict:
    try:
        text = path.read_bytes().decode("utf-8")
        data = json.loads(text)
    except OSError as err:
        raise AnalysisError(f"{path}: cannot be read ({err.strerror or err}); check its permissions") from None
    except ValueError as err:  # UnicodeDecodeError and JSONDecodeError
        line = f":{err.lineno}" if hasattr(err, "lineno") else ""
        raise AnalysisError(f"{path}{line}: cannot be read as JSON ({err}); expected the run's RunConfig "
                            f"object") from None
    if not isinstance(data, dict):
        raise AnalysisError(f"{path}:1: expected a JSON object (the run's RunConfig), got {type(data).__name__}")
    _check_config(path, text, data)
    return data


def _check_record(record) -> str | None:
    """What is wrong with one parsed record line, or None."""
    if not isinstance(record, dict):
        return f"expected one JSON object per line, got a JSON {type(record).__name__}"
    if not isinstance(record.get("kind"), str):
        return "expected a \"kind\" key naming the record kind (step, probe, eval, smoothness, diverged)"
    for key, value in record.items():
        if key in _COUNTS and not (value is None or _is_count(value)):
            return f"field \"{key}\" must be a non-negative integer, got {value!r}"
        if key in _NUMBERS and not _is_number(value):
            return f"field \"{key}\" must be a number or null, got {value!r}"
        if key in _NUMBER_LISTS and not (isinstance(value, list) and all(_is_number(v) for v in value)):
            return f"field \"{key}\" must be a list of numbers, got {value!r}"
        if key == "bn_mode" and not (value is None or isinstance(value, str)):
            return f"field \"bn_mode\" must be a string, got {value!r}"
    return None


def _read_records(path: Path, done: bool) -> tuple[list[dict], list[int]]:
    """(records, their line numbers): parse records.jsonl; a torn last line of an unfinished run (killed mid-write) is skipped with a warning.

    Any other bad line (not UTF-8, not JSON, not an object, a field of the wrong type) raises AnalysisError naming
    ``file:line``.
    """
    if not path.exists():
        return [], []
    try:
        lines = path.read_bytes().split(b"\n")
    except OSError as err:
        raise AnalysisError(f"{path}: cannot be read ({err.strerror or err}); check its permissions") from None
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    records, numbers = [], []
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
            problem = _check_record(record)
        except UnicodeDecodeError as err:
            problem = f"not UTF-8 text (byte 0x{raw[err.start]:02x} at column {err.start + 1})"
        except ValueError as err:
            problem = f"not valid JSON ({err})"
        if problem is None:
            records.append(record)
            numbers.append(i + 1)
            continue
        if i == last and not done:
            warnings.warn(f"{path}:{i + 1}: skipping a truncated last record of an unfinished run "
                          f"(the line being written when the run stopped)", stacklevel=3)
            continue
        raise AnalysisError(f"{path}:{i + 1}: corrupt record: {problem}. Each line must be one JSON object of "
                            f"results/README.md's schema; only the last line of an unfinished run may be "
                            f"truncated.")
    return records, numbers


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
    broken = [d for d in entries if d.is_dir() and d not in runs and any((d / f).exists() for f in _RUN_FILES)]
    if broken:
        names = ", ".join(f"{d.name} (holds {', '.join(f for f in _RUN_FILES if (d / f).exists())})"
                          for d in broken)
        raise AnalysisError(f"{root}: run director{'y' if len(broken) == 1 else 'ies'} without config.json: "
                            f"{names}. Without its config a run's model, lr and seed are unknown, so it can be "
                            f"neither averaged nor left out silently: restore config.json or move the directory "
                            f"out of the study folder")
    starting = [d.name for d in entries if d.is_dir() and d not in runs and (d / "run.log").exists()]
    if starting:
        warnings.warn(f"{root}: {', '.join(starting)} hold only a run.log (no config.json, no records): runs that "
                      f"failed before they started, or are starting now; not analysed", stacklevel=3)
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
        records, lines = _read_records(d / "records.jsonl", done)
        run = RunData(d, _read_json(d / "config.json"), records, done, lines=lines)
        if not run.records:
            warnings.warn(f"{d}: run has no records yet (status {run.status}); it appears in load_runs only",
                          stacklevel=2)
        runs.append(run)
    for run, variant in zip(runs, variant_labels([r.config for r in runs])):
        run.variant = variant
    return runs


def model_label(model: str, norm) -> str:
    """The name a study used for the model: ``convnet``, ``bn-convnet``, or ``convnet:noisy`` when the norm is not
    the model's default, so that norm variants of one network get curves and table columns of their own."""
    from ..models import MODELS
    spec = MODELS.get(model)
    return model if spec is None or norm in (None, spec.default_norm) else f"{model}:{norm}"


def run_fields(run: RunData) -> dict:
    """A run's columns of ``runs_frame`` (and of every long-form row): run, model (its group), seed, lr, ..."""
    c = run.config
    return {"run": c.get("run_id") or run.path.name,
            "model": group_label(model_label(c["model"], c.get("norm")), run.variant), "seed": c["seed"],
            "lr": float(c["lr"]), "norm": str(c.get("norm") if c.get("norm") is not None else "none"),
            "dataset": str(c.get("dataset", "?")), "loss": str(c.get("loss") or "cross-entropy"),
            "variant": run.variant, "options": options_key(c), "status": run.status}


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
        rows.append({**run_fields(run), "diverged_step": div.get("step"), "diverged_epoch": div.get("epoch"),
                     "n_records": len(run.records), "path": str(run.path)})
    return _frame(rows, RUN_COLUMNS).sort_values(["model", "lr", "seed", "run"], ignore_index=True)


def records_frame(runs: list[RunData]) -> pd.DataFrame:
    rows = []
    for run in runs:
        f = run_fields(run)
        head = tuple(f[c] for c in LONG_COLUMNS[:LONG_COLUMNS.index("status") + 1])
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
