"""`smoothness-lab per-layer RESULTS_DIR`: the per-layer figures and per_layer.md of a finished study."""
from __future__ import annotations

import click

from experiments.commands import notify, out_option, results_dir_argument, write_and_list


@click.command("per-layer")
@results_dir_argument
@out_option
@click.pass_context
def per_layer_command(ctx, results_dir, out_dir):
    """Draw the per-layer curvature of a study run with --per-layer: λ_max and trace of each module's block of the
    Hessian and the GGN along training, the Hessian's λ_min (PNG + PDF), and per_layer.md with paired tests of
    BN − no BN per layer at the last epoch."""
    from experiments.features.per_layer.figures import plot_per_layer
    write_and_list(ctx, lambda: plot_per_layer(results_dir, out_dir, notify=notify))
