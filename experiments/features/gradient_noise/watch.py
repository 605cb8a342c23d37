"""`smoothness-lab watch RUN_OR_STUDY`: redraw the gradient-noise dashboard of each run while it trains and print
one line per run; it stops when every run has finished, or cleanly on Ctrl-C."""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import List, Optional

import click


def _runs(target: Path) -> List[Path]:
    from experiments.store import has_config
    if has_config(target):
        return [target]
    return sorted(p for p in target.iterdir() if p.is_dir() and has_config(p))


def _fmt(value) -> str:
    if value is None:
        return "∞"
    return f"{value:.3g}" if math.isfinite(value) else str(value)


def summary_line(run_dir: Path, records: List[dict]) -> str:
    """One line: where the run is, its loss, and its latest gradient-noise numbers."""
    from experiments.features.gradient_noise.compute import KIND
    from experiments.store import is_done
    last_step = next((r for r in reversed(records) if r.get("kind") == "step"), None)
    noise = next((r for r in reversed(records) if r.get("kind") in KIND.values()), None)
    state = "done" if is_done(run_dir) else "running"
    line = f"{run_dir.name}: {state}"
    if last_step is not None:
        line += f", step {last_step['step']} (epoch {last_step['epoch']}), loss {_fmt(last_step['loss'])}"
    if noise is not None:
        unit = "examples" if noise["kind"] == KIND["example"] else "minibatches"
        line += (f" | step {noise['step']} over {noise['n_units']} {unit}: α {_fmt(noise['alpha'])}, "
                 f"θ_norm {_fmt(noise['norm_test'])}, GSNR {_fmt(noise['gsnr'])}, "
                 f"B_simple {_fmt(noise['noise_scale'])}")
    else:
        line += " | no gradient-noise records yet (--gradient-noise-every)"
    return line


@click.command("watch")
@click.argument("target", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--interval", type=click.FloatRange(min=0.1), default=10.0, show_default=True,
              help="seconds between redraws")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="where the dashboards go [default: STUDY/figures, the folder above each run]")
@click.option("--once", is_flag=True, help="draw and print once, then exit")
@click.pass_context
def watch_command(ctx, target: Path, interval: float, out_dir: Optional[Path], once: bool):
    """Redraw the dashboard of a run (or of every run of a study) while it trains: the loss, the step quality α,
    the gradient tests, the GSNR, the noise scale and λ_max (dashboard-<run>.png), with one line per run. Stops when
    every run has finished, or on Ctrl-C."""
    from experiments.features.gradient_noise.figures import run_dashboard
    from experiments.store import is_done, read_records, records_path
    if not _runs(target):
        raise click.ClickException(f"{target}: neither a run folder (config.json) nor a study folder holding runs")
    try:
        while True:
            runs = _runs(target)   # a study's runs appear as they start
            for run in runs:
                records = read_records(records_path(run), torn_tail="skip") if records_path(run).exists() else []
                run_dashboard(run, records, out_dir or run.parent / "figures")
                click.echo(summary_line(run, records))
            if once or all(is_done(run) for run in runs):
                return
            time.sleep(interval)
    except KeyboardInterrupt:
        click.echo("watch: stopped (Ctrl-C); the dashboards stay as last drawn", err=True)
