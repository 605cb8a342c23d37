"""`smoothness-lab generalization RESULTS_DIR`: sharpness vs generalisation of a study (Kendall's τ and Jiang et al.'s
granulated Ψ per measure, with bootstrap intervals; figures)."""
from __future__ import annotations

from pathlib import Path

import click


@click.command("generalization")
@click.argument("results_dir", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="where the figures go [default: RESULTS_DIR/figures]")
@click.option("--resamples", type=click.IntRange(min=100), default=2000, show_default=True,
              help="bootstrap resamples of the runs for the intervals")
@click.pass_context
def generalization_command(ctx, results_dir, out_dir, resamples):
    """Which sharpness, flatness and norm measures predict the generalisation gap across a study's runs (run with
    --generalization-every, e.g. `smoothness-lab run --study generalization`): generalization.md/.csv with
    Kendall's τ over all runs, Ψ over the hyper-parameter axes, τ within each learning rate, and two figures."""
    from .analysis.errors import AnalysisError
    from .analysis.generalization_study import write_generalization
    try:
        paths = write_generalization(results_dir, out_dir, n_resamples=resamples)
    except AnalysisError as exc:
        raise click.ClickException(str(exc)) from None
    if not (ctx.obj or {}).get("quiet"):
        for p in paths:
            click.echo(str(p))
