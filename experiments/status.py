"""`smoothness-lab status`: which runs of a study are done, diverged, failed, running (or interrupted), not started.

Reads only. A run's state comes from its directory (results/README.md): ``done`` marks a finished run, a
``diverged`` record a diverged one; without ``done``, the last line of ``run.log`` written by the launcher tells a
run that failed with an exception from one that is running or was interrupted (killed, Ctrl-C: relaunching the
sweep resumes it from its last checkpoint). The detail column tells these two apart where it can: a running run
holds a lock on its run.log (``launchers.run_lock``; visible on the machine that runs it). Runs the study's
``study.json`` grids expect but that have no directory yet are ``not started``.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import List, Optional, Tuple

import click

from .config import ConfigError, RunConfig, StudyConfig
from .launchers import is_locked

STATES = ("done", "diverged", "failed", "running-or-interrupted", "not started")
_EVENT = re.compile(r"^\S+ \S+ [A-Z]+ (start|finish|failed|interrupted)\b(.*)$")


def _expected_runs(study_dir: Path) -> Tuple[List[str], List[str]]:
    """Run ids the study's grids expect, and warnings about grids that cannot be read."""
    path = study_dir / "study.json"
    if not path.exists():
        return [], []
    try:
        grids = json.loads(path.read_text()).get("grids", [])
    except (OSError, ValueError, AttributeError) as exc:
        return [], [f"{path} is unreadable ({exc}); runs not started yet are not listed"]
    ids, warnings = [], []
    for i, grid in enumerate(grids):
        try:
            study = StudyConfig(name=grid["name"], models=tuple(grid["models"]), lrs=tuple(grid["lrs"]),
                                seeds=tuple(grid["seeds"]), base=RunConfig.from_dict(grid["base"]))
            ids.extend(c.run_id for c in study.runs() if c.run_id not in ids)
        except (ConfigError, KeyError, TypeError, ValueError) as exc:
            warnings.append(f"{path}: grid {i + 1} is unreadable ({exc}); its runs not started yet are not listed")
    return ids, warnings


def _last_event(run_dir: Path) -> Tuple[Optional[str], str]:
    """The launcher's last start / finish / failed / interrupted line in run.log: (event, rest of the line)."""
    try:
        lines = (run_dir / "run.log").read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None, ""
    for line in reversed(lines):
        m = _EVENT.match(line)
        if m:
            return m.group(1), m.group(2).strip(" :")
    return None, ""


def _records_tail(run_dir: Path) -> List[dict]:
    """The last records of a run (a torn last line, from a kill, is ignored)."""
    try:
        with open(run_dir / "records.jsonl", "rb") as f:
            size = f.seek(0, 2)
            f.seek(max(0, size - 262144))
            lines = f.read().splitlines()
    except OSError:
        return []
    out = []
    for line in lines[-200:]:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _epochs(run_dir: Path) -> Optional[int]:
    try:
        return int(json.loads((run_dir / "config.json").read_text())["epochs"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def run_info(run_dir: Path) -> Tuple[str, str]:
    """(state, detail) of one run directory."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").exists() and _last_event(run_dir)[0] is None:
        return "not started", ""
    tail = _records_tail(run_dir)
    diverged = next((r for r in reversed(tail) if r.get("kind") == "diverged"), None)
    if diverged is not None:
        return "diverged", f"at step {diverged.get('step')}: {diverged.get('reason', '')}".rstrip(": ")
    if (run_dir / "done").exists():
        ev = next((r for r in reversed(tail) if r.get("kind") == "eval"), None)
        if ev is not None and isinstance(ev.get("test_accuracy"), (int, float)):
            return "done", f"test accuracy {ev['test_accuracy']:.3f} after {ev.get('epoch')} epochs"
        return "done", ""
    event, rest = _last_event(run_dir)
    if event == "failed":
        return "failed", rest
    ckpts = sorted((run_dir / "checkpoints").glob("epoch-*.pt")) if (run_dir / "checkpoints").is_dir() else []
    epochs = _epochs(run_dir)
    of = f" of {epochs}" if epochs is not None else ""
    last = int(ckpts[-1].stem.split("-")[1]) if ckpts else None
    detail = f"checkpoint after epoch {last}{of}" if last is not None else "no checkpoint yet"
    if is_locked(run_dir):
        pid = re.search(r"\bpid=(\d+)", rest)
        detail += f" (running{', pid ' + pid.group(1) if pid else ''})"
    elif event == "interrupted":
        detail += " (interrupted)"
    elif event == "start":
        detail += " (killed, or running on another machine)"
    return "running-or-interrupted", detail


def run_state(run_dir: Path) -> str:
    return run_info(run_dir)[0]


def study_status(study_dir: Path) -> List[tuple]:
    """[(run_id, state, detail)] for every run directory and every run the study's grids expect."""
    rows, _ = _study_rows(Path(study_dir))
    if not rows:
        raise click.ClickException(f"{study_dir} holds no runs (no <run>/config.json and no study.json)")
    return rows


def _study_rows(study_dir: Path) -> Tuple[List[tuple], List[str]]:
    found = sorted(p.name for p in study_dir.iterdir()
                   if p.is_dir() and ((p / "config.json").exists() or (p / "run.log").exists()))
    expected, warnings = _expected_runs(study_dir)
    ids = found + [r for r in expected if r not in found]
    return [(r, *run_info(study_dir / r)) for r in ids], warnings


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
    """List the runs of a study folder (or of every study in a results folder) as done / diverged / failed /
    running-or-interrupted / not started, with counts."""
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
        raise click.ClickException(f"{results_dir} holds no runs (no <run>/config.json and no study.json)")
    for i, study in enumerate(studies):
        rows, warnings = _study_rows(study)
        for w in warnings:
            click.echo(f"warning: {w}", err=True)
        click.echo(("\n" if i else "") + f"{study}:")
        _print_study(rows)
