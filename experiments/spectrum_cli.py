"""`smoothness-lab spectrum RESULTS_DIR`: the Hessian-spectrum figures and summary of a study."""
from __future__ import annotations

from pathlib import Path

import click


@click.command("spectrum")
@click.argument("results_dir", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="where the figures go [default: RESULTS_DIR/figures]")
@click.pass_context
def spectrum_command(ctx, results_dir, out_dir):
    """Draw the Hessian spectrum of a study run with --spectrum-every: log-density ConvNet vs BN-ConvNet at a few
    epochs, batch vs running BN statistics, gradient concentration along training (PNG + PDF), and spectrum.md."""
    from .analysis.load import AnalysisError
    from .analysis.spectrum_figures import plot_spectrum
    try:
        paths = plot_spectrum(results_dir, out_dir, notify=lambda message: click.echo(message, err=True))
    except AnalysisError as exc:
        raise click.ClickException(str(exc)) from None
    if not (ctx.obj or {}).get("quiet"):
        for p in paths:
            click.echo(str(p))
