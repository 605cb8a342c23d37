"""`smoothness-lab per-layer RESULTS_DIR`: the per-layer curvature figures and per_layer.md of a study."""
from __future__ import annotations

from pathlib import Path

import click


@click.command("per-layer")
@click.argument("results_dir", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="where the figures go [default: RESULTS_DIR/figures]")
@click.pass_context
def per_layer_command(ctx, results_dir, out_dir):
    """Draw the per-layer curvature of a study run with --per-layer: λ_max and trace of each module's block of the
    Hessian and the GGN along training, the Hessian's λ_min (PNG + PDF), and per_layer.md with paired tests of
    BN − no BN per layer at the last epoch."""
    from .analysis.load import AnalysisError
    from .analysis.per_layer_figures import plot_per_layer
    try:
        paths = plot_per_layer(results_dir, out_dir, notify=lambda message: click.echo(message, err=True))
    except AnalysisError as exc:
        raise click.ClickException(str(exc)) from None
    if not (ctx.obj or {}).get("quiet"):
        for p in paths:
            click.echo(str(p))
