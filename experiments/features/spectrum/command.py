"""`smoothness-lab spectrum RESULTS_DIR`: the spectrum figures and spectrum.md of a finished study."""
from __future__ import annotations

import click

from experiments.commands import notify, out_option, results_dir_argument, write_and_list


@click.command("spectrum")
@results_dir_argument
@out_option
@click.pass_context
def spectrum_command(ctx, results_dir, out_dir):
    """Draw the Hessian spectrum of a study run with --spectrum-every: log-density ConvNet vs BN-ConvNet at a few
    epochs, batch vs running BN statistics, gradient concentration along training (PNG + PDF), and spectrum.md."""
    from experiments.features.spectrum.figures import plot_spectrum
    write_and_list(ctx, lambda: plot_spectrum(results_dir, out_dir, notify=notify))
