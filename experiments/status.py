"""`smoothness-lab status`: what state each run of a study is in, from what its directory says. Reads only.

The states, checked in this order:
running      a live process holds the run's lock (``store.run_lock``)
corrupt      the directory cannot be trusted; the detail is ``<file>:<line>: <reason>``
truncated    finished, but records.jsonl holds fewer bytes than the run finished with
diverged     a ``diverged`` record (the run stopped at a non-finite loss)
done         the ``done`` marker
failed       the launcher logged an exception; a relaunch tries again from the last checkpoint
interrupted  started, neither finished nor failed, and no live process holds it
not started  expected by the study's ``study.json`` grids (or its directory holds nothing yet)

Details: docs/explanation/modules.md#status
"""
from __future__ import annotations

import dataclasses
import socket
from pathlib import Path
from typing import List, Optional, Tuple

import click

from experiments import store
from experiments.config import ConfigError, RunConfig, StudyConfig
from experiments.store import RunState, StoreError, is_locked, read_code
from experiments.study import identity_problem
from experiments.study_files import STUDY_JSON, read_json

STATES = RunState.ON_DISK
# what checking a corrupt study.json or config may raise: wrong types, a JSON array where an object belongs
_READ_ERRORS = (ValueError, TypeError, AttributeError, KeyError)


def _expected_runs(study_dir: Path) -> Tuple[List[str], List[str]]:
    """Run ids the study's grids expect, and warnings about grids that cannot be read."""
    path = study_dir / STUDY_JSON
    if not path.exists():
        return [], []
    try:
        grids = read_json(path).get("grids", [])
    except (OSError,) + _READ_ERRORS as exc:
        return [], [f"{path} is unreadable ({exc}); runs not started yet are not listed"]
    ids, warnings = [], []
    for i, grid in enumerate(grids if isinstance(grids, list) else []):
        try:
            study = StudyConfig.from_dict(grid)
            ids.extend(c.run_id for c in study.runs() if c.run_id not in ids)
        except (ConfigError,) + _READ_ERRORS as exc:
            warnings.append(f"{path}: grid {i + 1} is unreadable ({exc}); its runs not started yet are not listed")
    return ids, warnings


def _read_config(run_dir: Path) -> Tuple[Optional[dict], Optional[str]]:
    """(config, problem): the run's config.json checked as a RunConfig; problem is ``config.json: <reason>``."""
    if not store.config_path(run_dir).exists():
        return None, None
    try:
        data = store.read_config_file(store.config_path(run_dir)).data
        names = {f.name for f in dataclasses.fields(RunConfig)}
        RunConfig.from_dict({k: v for k, v in data.items() if k in names})
    except StoreError as exc:
        return None, f"{store.CONFIG}: {exc.problem}"
    except (ConfigError, TypeError) as exc:
        return None, f"{store.CONFIG}: {exc}"
    except _READ_ERRORS as exc:
        return None, f"{store.CONFIG}: {type(exc).__name__}: {exc}"
    problem = identity_problem(run_dir, data)   # the check every study command makes (experiments.study)
    return (None, problem) if problem else (data, None)


def _read_records(run_dir: Path, done: bool) -> Tuple[List[dict], Optional[str]]:
    """(records, problem). Only the last line of an unfinished run may be torn (the line being written when it was
    killed). Problem: ``records.jsonl:<line>: <reason>``."""
    try:
        return store.read_records(store.records_path(run_dir), torn_tail="error" if done else "skip"), None
    except StoreError as exc:
        return [], f"{store.RECORDS}{'' if exc.line is None else f':{exc.line}'}: {exc.problem}"


def _checkpoint(run_dir: Path, config: Optional[dict]) -> Optional[str]:
    """``epoch K of N`` of the run's last checkpoint, None without one."""
    epoch = (store.checkpoint_epochs(run_dir) or [None])[-1]
    epochs = config.get("epochs") if config else None
    return None if epoch is None else f"epoch {epoch}" + (f" of {epochs}" if isinstance(epochs, int) else "")


def _checkpoint_note(run_dir: Path, config: Optional[dict]) -> str:
    where = _checkpoint(run_dir, config)
    return f"resumes from its checkpoint after {where}" if where else "no checkpoint yet: a relaunch starts it over"


def run_info(run_dir: Path) -> Tuple[str, str]:
    """(state, detail) of one run directory: the module docstring defines the states."""
    run_dir = Path(run_dir)
    event, rest = store.last_event(run_dir)
    if not run_dir.is_dir() or (event is None and not store.run_files(run_dir)):
        return RunState.NOT_STARTED, ""
    config, problem = _read_config(run_dir)
    if is_locked(run_dir):
        pid, host, job = store.event_fields(rest) if event == "start" else (None, None, None)
        by = " ".join(x for x in (f"pid {pid}" if pid else "", f"on {host}" if host else "",
                                  f"in SLURM job {job}" if job else "") if x) or "a live process"
        where = _checkpoint(run_dir, config)
        return RunState.RUNNING, f"by {by}; " + (f"last checkpoint after {where}" if where else "no checkpoint yet")
    done = store.is_done(run_dir)
    records, records_problem = _read_records(run_dir, done)
    if problem is None and config is None and (done or records or store.checkpoint_epochs(run_dir)):
        problem = f"{store.CONFIG}: missing, although the directory holds the run's records or checkpoints"
    problem = problem or records_problem
    if problem is None and done and not records:
        problem = f"{store.RECORDS}: no records, although the run is marked done"
    if problem is not None:
        return RunState.CORRUPT, problem
    finished = store.check_finished(run_dir) if done else None
    if finished is not None:
        return finished.state, finished.problem
    diverged = next((r for r in reversed(records) if r.get("kind") == "diverged"), None)
    if diverged is not None:
        return RunState.DIVERGED, f"at step {diverged.get('step')}: {diverged.get('reason', '')}".rstrip(": ") + \
            _code_note(run_dir)
    if done:
        ev = next((r for r in reversed(records) if r.get("kind") == "eval"), None)
        acc = ev.get("test_accuracy") if ev else None
        if isinstance(acc, (int, float)) and not isinstance(acc, bool):
            return RunState.DONE, f"test accuracy {acc:.3f} after {ev.get('epoch')} epochs" + _code_note(run_dir)
        return RunState.DONE, _code_note(run_dir).lstrip("; ")
    note = _checkpoint_note(run_dir, config)
    if event == "failed":
        return RunState.FAILED, f"{rest}; {note}" if rest else note
    if event == "interrupted":
        return RunState.INTERRUPTED, f"{note} (interrupted: Ctrl-C or SIGTERM)"
    if event == "start":
        _, host, job = store.event_fields(rest)
        if host and host != socket.gethostname():
            return RunState.INTERRUPTED, (f"{note} (last started on {host}{f' in SLURM job {job}' if job else ''}; if "
                                   f"its lock is not visible from this machine it may still be running there)")
        return RunState.INTERRUPTED, f"{note} (killed: its process is gone)"
    return RunState.INTERRUPTED, note


def _code_note(run_dir: Path) -> str:
    """"; code changed since this run (f.py)" when a user's factory file no longer has the sha256 it was run with."""
    from experiments.plugins import code_changes
    changed, missing = code_changes(read_code(run_dir))
    return ((f"; code changed since this run ({', '.join(changed)})" if changed else "")
            + (f"; its code {', '.join(missing)} is not on PYTHONPATH: unchecked" if missing else ""))


def features_written(run_dir: Path) -> List[str]:
    """The registered features (``experiments.features.FEATURES``, those registered from outside the package too)
    that wrote records in the run: each feature's record kinds (``Feature.kinds``) against the kinds present."""
    from experiments.features import FEATURES
    path = store.records_path(run_dir)
    try:
        kinds = {r.get("kind") for r in store.iter_records(path, torn_tail="skip")} if path.exists() else set()
    except StoreError:
        return []
    return [f.name for f in list(FEATURES.values()) if kinds & set(f.kinds)]


def _with_features(run_dir: Path, state: str, detail: str) -> Tuple[str, str]:
    names = features_written(run_dir) if state != RunState.NOT_STARTED else []
    note = f"features: {', '.join(names)}" if names else ""
    return state, "; ".join(x for x in (detail, note) if x)


def _study_rows(study_dir: Path) -> Tuple[List[tuple], List[str]]:
    found = sorted(p.name for p in study_dir.iterdir() if store.is_run_dir(p))
    expected, warnings = _expected_runs(study_dir)
    ids = found + [r for r in expected if r not in found]
    return [(r, *_with_features(study_dir / r, *run_info(study_dir / r))) for r in ids], warnings


def _print_study(rows: List[tuple]) -> None:
    width = max(len(r) for r, _, _ in rows)
    swidth = max(len(s) for _, s, _ in rows)
    for run_id, state, detail in rows:
        click.echo(f"{run_id:{width}s}  {state:{swidth}s}  {detail}".rstrip())
    counts = {s: sum(1 for _, st, _ in rows if st == s) for s in STATES}
    click.echo(f"{len(rows)} runs: " + ", ".join(f"{n} {s}" for s, n in counts.items()))


@click.command("status")
@click.argument("results_dir", type=click.Path(path_type=Path))
def status_command(results_dir: Path) -> None:
    """List the runs of a study folder (or of every study in a results folder) as done / diverged / running /
    interrupted / failed / corrupt / truncated / not started, with counts."""
    if not results_dir.is_dir():
        raise click.ClickException(f"{results_dir} is not a directory; give a study folder such as "
                                   f"results/fashion-mnist-bn")
    rows, warnings = _study_rows(results_dir)
    for w in warnings:
        click.echo(f"warning: {w}", err=True)
    if rows:
        _print_study(rows)
        return
    studies = sorted(p for p in results_dir.iterdir() if p.is_dir() and _study_rows(p)[0])
    if not studies:
        raise click.ClickException(f"{results_dir} holds no runs (no run directories and no study.json)")
    for i, study in enumerate(studies):
        rows, warnings = _study_rows(study)
        for w in warnings:
            click.echo(f"warning: {w}", err=True)
        click.echo(("\n" if i else "") + f"{study}:")
        _print_study(rows)
