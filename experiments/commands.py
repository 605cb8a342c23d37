"""What the commands that read a finished study share (each feature's command: `smoothness-lab spectrum`,
`per-layer`, `generalization RESULTS_DIR`): the RESULTS_DIR argument, --out, and one way to report an analysis error
in one line and list the files written."""
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


def notify(message: str) -> None:
    click.echo(message, err=True)
