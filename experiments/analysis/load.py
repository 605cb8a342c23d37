"""Read a study's run directories into pandas tables.

A study directory holds one directory per run (``config.json`` + ``records.jsonl``, see ``results/README.md``), read
through ``experiments.store`` (the one reader of run directories); its StoreErrors become AnalysisErrors here.
``load`` melts every numeric field of every record into one long-form row; ``load_runs`` gives one row per run.
Unfinished and diverged runs are kept and flagged in ``status``; nothing is dropped silently: a directory that holds
run files but no config.json stops the analysis with its name, a malformed line stops it with ``file:line``, and a
folder that is not the run its name says (a copy) or a finished run whose records were cut is left out and named
(``experiments.study``). `read_study` is the one loader every study command uses.

``model`` is the group a run is averaged in: the model label (``convnet``, ``convnet:noisy``), followed by
``[variant]`` when the folder holds several configurations (``pairing``); ``options`` identifies the configuration
apart from model, seed and lr, so that runs of two models pair on (lr, seed, options).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from experiments import store
from experiments.store import StoreError
from experiments.analysis.errors import AnalysisError
from experiments.analysis.pairing import group_label, options_key, variant_labels

LONG_COLUMNS = ["run", "model", "seed", "lr", "norm", "dataset", "loss", "variant", "options", "status", "kind", "step",
                "epoch", "metric", "value", "bn_mode"]
RUN_COLUMNS = ["run", "model", "seed", "lr", "norm", "dataset", "loss", "variant", "options", "status", "diverged_step",
               "diverged_epoch", "n_records", "path"]
_RECORD_KEYS = {"kind", "step", "epoch", "bn_mode"}
_EXPECTED = f"run directories, each holding {store.CONFIG} and {store.RECORDS} (see results/README.md)"


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


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check_config(file: store.ConfigFile) -> None:
    """The fields the analysis groups and pairs on must have their RunConfig types (the rest of the file is not
    checked: runs an older version wrote are still averaged)."""
    config, problems = file.data, []
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
        raise AnalysisError(f"{file.path}:{file.line_of(key)}: {what}; expected the run's RunConfig as written by "
                            f"the toolkit (fix the file or move the run directory out of the study)")


def _read_config(run_dir: Path) -> dict:
    try:
        file = store.read_config_file(store.config_path(run_dir))
    except StoreError as err:
        if err.unreadable:
            raise AnalysisError(f"{err.path}: {err.problem}; check its permissions") from None
        line = "" if err.line is None else f":{err.line}"
        raise AnalysisError(f"{err.path}{line}: cannot be read as JSON ({err.problem}); expected the run's "
                            f"RunConfig object") from None
    _check_config(file)
    return file.data


def _read_records(run_dir: Path, done: bool) -> tuple[list[dict], list[int]]:
    """(records, their line numbers); a torn last line of an unfinished run (killed mid-write) is skipped with a
    warning. Any other bad line (not UTF-8, not JSON, not an object, a field of the wrong type) raises AnalysisError
    naming ``file:line``."""
    try:
        numbered = list(store.iter_numbered_records(store.records_path(run_dir),
                                                    torn_tail="error" if done else "warn"))
    except StoreError as err:
        if err.unreadable:
            raise AnalysisError(f"{err.path}: {err.problem}; check its permissions") from None
        raise AnalysisError(f"{err.path}:{err.line}: corrupt record: {err.problem}. Each line must be one JSON "
                            f"object of results/README.md's schema; only the last line of an unfinished run may be "
                            f"truncated.") from None
    return [r for _, r in numbered], [n for n, _ in numbered]


def _run_dirs(root: Path) -> list[Path]:
    if not root.exists():
        raise AnalysisError(f"results directory {root} does not exist; expected a study directory of {_EXPECTED}")
    if not root.is_dir():
        raise AnalysisError(f"{root} is not a directory; expected a study directory of {_EXPECTED}")
    if store.has_config(root):
        return [root]
    entries = sorted(root.iterdir())
    if not entries:
        raise AnalysisError(f"results directory {root} is empty; expected {_EXPECTED}")
    present = {d: store.run_files(d) for d in entries if store.is_run_dir(d)}
    runs = [d for d in present if store.has_config(d)]
    broken = {d: [f for f in files if f in store.PROGRESS_FILES] for d, files in present.items() if d not in runs}
    broken = {d: files for d, files in broken.items() if files}
    if broken:
        names = ", ".join(f"{d.name} (holds {', '.join(files)})" for d, files in broken.items())
        raise AnalysisError(f"{root}: run director{'y' if len(broken) == 1 else 'ies'} without {store.CONFIG}: "
                            f"{names}. Without its config a run's model, lr and seed are unknown, so it can be "
                            f"neither averaged nor left out silently: restore {store.CONFIG} or move the directory "
                            f"out of the study folder")
    starting = [d.name for d in present if d not in runs and d not in broken]
    if starting:
        warnings.warn(f"{root}: {', '.join(starting)} hold only a run.log (no config.json, no records): runs that "
                      f"failed before they started, or are starting now; not analysed", stacklevel=3)
    if not runs:
        studies = [d.name for d in entries if d.is_dir() and any(store.has_config(sub) for sub in d.iterdir())]
        hint = (f" It looks like a results root holding the studies {studies}: pass one of them."
                if studies else "")
        found = ", ".join(e.name for e in entries[:8]) + (", ..." if len(entries) > 8 else "")
        raise AnalysisError(f"{root} holds no run directories (found: {found}); expected {_EXPECTED}.{hint}")
    return runs


def read_study(results_dir, notify=None) -> list[RunData]:
    """Parse every run directory of a study (or a single run directory): the one reading of a study that every
    study command uses. Left out, each named through ``notify(message)`` (default: a warning): folders that do not
    hold the run their name says (a copied run folder: `experiments.study.identity_problem`) and finished runs
    whose records were cut or changed since they finished (`experiments.study.records_problem`)."""
    from experiments.study import identity_problem, records_problem
    say = notify if notify is not None else (lambda message: warnings.warn(message, stacklevel=3))
    runs = []
    for d in _run_dirs(Path(results_dir)):
        config = _read_config(d)
        problem = identity_problem(d, config)
        done = store.is_done(d)
        if problem is None and done:
            problem = records_problem(d)
        if problem is not None:
            say(f"left out {d.name}: {problem}")
            continue
        records, lines = _read_records(d, done)
        run = RunData(d, config, records, done, lines=lines)
        if not run.records:
            say(f"{d}: run has no records yet (status {run.status}); it appears in load_runs only")
        runs.append(run)
    if not runs:
        raise AnalysisError(f"{results_dir}: every run directory was left out (see the messages above); nothing to "
                            f"analyse")
    for run, variant in zip(runs, variant_labels([r.config for r in runs])):
        run.variant = variant
    return runs


def model_label(model: str, norm) -> str:
    """The name a study used for the model: ``convnet``, ``bn-convnet``, or ``convnet:noisy`` when the norm is not
    the model's default, so that norm variants of one network get curves and table columns of their own."""
    from experiments.models import MODELS
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


def network_family(label: str) -> str:
    """The network a group label names, without its BN prefix, norm, variant or lr label: ``bn-convnet [epochs=2]``,
    ``convnet:noisy, η=0.1`` -> ``convnet``."""
    return label.split(" [")[0].split(", η=")[0].removeprefix("bn-").split(":")[0]


def family_pairs(models) -> list[tuple[str, str]]:
    """(first, other) for every model after the first of its network family, in ``model_order``: the comparisons
    of a study (convnet vs bn-convnet, mlp vs bn-mlp; never bn-mlp vs convnet)."""
    families: dict[str, list[str]] = {}
    for m in model_order(models):
        families.setdefault(network_family(m), []).append(m)
    return [(group[0], other) for group in families.values() for other in group[1:]]


def bn_mode_of(df: pd.DataFrame, kind: str, metric: str) -> str:
    modes = select(df, kind, metric)["bn_mode"].dropna().unique()
    return "/".join(sorted(modes)) or "n/a"
