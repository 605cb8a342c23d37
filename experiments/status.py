"""`smoothness-lab status`: which runs of a study are done, diverged, interrupted (or running), not started."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List

import click

from .config import RunConfig, StudyConfig

STATES = ("done", "diverged", "running-or-interrupted", "not started")


def _expected_runs(study_dir: Path) -> List[str]:
    path = study_dir / "study.json"
    if not path.exists():
        return []
    ids = []
    for grid in json.loads(path.read_text()).get("grids", []):
        study = StudyConfig(name=grid["name"], models=tuple(grid["models"]), lrs=tuple(grid["lrs"]),
                            seeds=tuple(grid["seeds"]), base=RunConfig.from_dict(grid["base"]))
        ids.extend(c.run_id for c in study.runs() if c.run_id not in ids)
    return ids


def run_state(run_dir: Path) -> str:
    records = run_dir / "records.jsonl"
    if records.exists():
        with open(records, "rb") as f:
            if b'"kind": "diverged"' in f.read():
                return "diverged"
    if (run_dir / "done").exists():
        return "done"
    return "running-or-interrupted" if (run_dir / "config.json").exists() else "not started"


def study_status(study_dir: Path) -> List[tuple]:
    """[(run_id, state)] for every run directory and every run the study's grids expect."""
    study_dir = Path(study_dir)
    if not study_dir.is_dir():
        raise click.ClickException(f"{study_dir} is not a directory; give a study folder such as "
                                   f"results/fashion-mnist-bn")
    found = sorted(p.name for p in study_dir.iterdir() if (p / "config.json").exists())
    ids = found + [r for r in _expected_runs(study_dir) if r not in found]
    if not ids:
        raise click.ClickException(f"{study_dir} holds no runs (no <run>/config.json and no study.json)")
    return [(r, run_state(study_dir / r)) for r in ids]


@click.command("status")
@click.argument("results_dir", type=click.Path(path_type=Path))
def status_command(results_dir: Path) -> None:
    """List the runs of a study folder as done / diverged / running-or-interrupted / not started."""
    rows = study_status(results_dir)
    width = max(len(r) for r, _ in rows)
    for run_id, state in rows:
        click.echo(f"{run_id:{width}s}  {state}")
    counts = {s: sum(1 for _, st in rows if st == s) for s in STATES}
    click.echo(", ".join(f"{n} {s}" for s, n in counts.items()))
