"""The commands that read a finished study and write its figures and tables: `smoothness-lab spectrum`,
`per-layer` and `generalization RESULTS_DIR`. Each writes through ``experiments.analysis`` and lists what it wrote."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import click

results_dir_argument = click.argument("results_dir", type=click.Path(path_type=Path))
out_option = click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                          help="where the figures go [default: RESULTS_DIR/figures]")


def write_and_list(ctx, write: Callable[[], Sequence[Path]]) -> None:
    """Run ``write`` (it returns the paths it wrote): an analysis error becomes one line, and the paths are listed
    unless --quiet."""
    from experiments.analysis.errors import AnalysisError
    try:
        paths = write()
    except AnalysisError as exc:
        raise click.ClickException(str(exc)) from None
    if not (ctx.obj or {}).get("quiet"):
        for p in paths:
            click.echo(str(p))


def _notify(message: str) -> None:
    click.echo(message, err=True)


@click.command("spectrum")
@results_dir_argument
@out_option
@click.pass_context
def spectrum_command(ctx, results_dir, out_dir):
    """Draw the Hessian spectrum of a study run with --spectrum-every: log-density ConvNet vs BN-ConvNet at a few
    epochs, batch vs running BN statistics, gradient concentration along training (PNG + PDF), and spectrum.md."""
    from experiments.analysis.spectrum_figures import plot_spectrum
    write_and_list(ctx, lambda: plot_spectrum(results_dir, out_dir, notify=_notify))


@click.command("per-layer")
@results_dir_argument
@out_option
@click.pass_context
def per_layer_command(ctx, results_dir, out_dir):
    """Draw the per-layer curvature of a study run with --per-layer: λ_max and trace of each module's block of the
    Hessian and the GGN along training, the Hessian's λ_min (PNG + PDF), and per_layer.md with paired tests of
    BN − no BN per layer at the last epoch."""
    from experiments.analysis.per_layer_figures import plot_per_layer
    write_and_list(ctx, lambda: plot_per_layer(results_dir, out_dir, notify=_notify))


@click.command("generalization")
@results_dir_argument
@out_option
@click.option("--resamples", type=click.IntRange(min=100), default=2000, show_default=True,
              help="bootstrap resamples of the runs for the intervals")
@click.pass_context
def generalization_command(ctx, results_dir, out_dir, resamples):
    """Which sharpness, flatness and norm measures predict the generalisation gap across a study's runs (run with
    --generalization-every, e.g. `smoothness-lab run --study generalization`): generalization.md/.csv with
    Kendall's τ over all runs, Ψ over the hyper-parameter axes, τ within each learning rate, and two figures."""
    from experiments.analysis.generalization_study import write_generalization
    write_and_list(ctx, lambda: write_generalization(results_dir, out_dir, n_resamples=resamples))
