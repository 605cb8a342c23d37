"""`smoothness-lab generalization RESULTS_DIR`: Kendall's τ and Ψ of every measure with the generalisation gap."""
from __future__ import annotations

import click

from experiments.commands import notify, out_option, results_dir_argument, write_and_list


@click.command("generalization")
@results_dir_argument
@out_option
@click.option("--resamples", type=click.IntRange(min=100), default=2000, show_default=True,
              help="cluster-bootstrap resamples for the intervals (configurations drawn with replacement, then "
                   "the seeds within each)")
@click.pass_context
def generalization_command(ctx, results_dir, out_dir, resamples):
    """Which sharpness, flatness and norm measures predict the generalisation gap across a study's runs (run with
    --generalization-every, e.g. `smoothness-lab run --study generalization`): generalization.md/.csv with
    Kendall's τ over all runs, Ψ over the hyper-parameter axes, τ within each learning rate, and two figures."""
    from experiments.features.generalization.table import write_generalization
    write_and_list(ctx, lambda: write_generalization(results_dir, out_dir, n_resamples=resamples, notify=notify))
