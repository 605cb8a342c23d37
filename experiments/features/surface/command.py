"""`smoothness-lab surface RUN_DIR...`: Li et al. loss surfaces and init → final interpolations of stored runs."""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Optional, Tuple

import click
from click.core import ParameterSource

from experiments.executors.choice import ExecutorChoice
from experiments.features.surface.grid import IGNORE, NORMALIZE, SurfaceSpec

_DEFAULT_RANGE = {"surface": (-1.0, 1.0), "interpolation": (-0.5, 1.5)}


def _parse_range(value: Optional[str], interpolate: bool) -> Tuple[float, float]:
    if value is None:
        return _DEFAULT_RANGE["interpolation" if interpolate else "surface"]
    lo, sep, hi = value.partition(":")
    try:
        if not sep:
            raise ValueError
        lo_f, hi_f = float(lo), float(hi)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not LOW:HIGH, e.g. -1:1", param_hint="--range") from None
    if not (math.isfinite(lo_f) and math.isfinite(hi_f) and lo_f < hi_f):
        raise click.BadParameter(f"{value!r}: LOW and HIGH must be finite with LOW < HIGH", param_hint="--range")
    return lo_f, hi_f


def _check_levels(figures: bool, vmin: float, vmax: float, vlevel: float) -> None:
    """Before any point is computed: the figure drawn at the end must be drawable."""
    if not figures:
        return
    from experiments.analysis import AnalysisError
    from experiments.features.surface.figures import check_levels
    try:
        check_levels(vmin, vmax, vlevel)
    except AnalysisError as exc:
        raise click.UsageError(str(exc)) from None


@click.command("surface", short_help="Loss surfaces (Li et al. 2018) of finished runs.")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--epoch", default="final", show_default=True,
              help="weights to centre on: init, final, or a checkpoint epoch the run still has")
@click.option("--dim", type=click.IntRange(1, 2), default=2, show_default=True, help="1-D curve or 2-D surface")
@click.option("--grid", type=click.IntRange(min=2), default=51, show_default=True, help="points per axis")
@click.option("--range", "range_", default=None, metavar="LOW:HIGH",
              help="coefficients along each direction [default: -1:1; -0.5:1.5 with --interpolate]")
@click.option("--samples", type=click.IntRange(min=0), default=1000, show_default=True,
              help="training images (a fixed sample of the run's subset; 0 = all of it)")
@click.option("--bn-mode", type=click.Choice(["running", "batch"]), default="running", show_default=True,
              help="running: eval-mode BatchNorm (Li et al.); batch: train-mode, batch statistics")
@click.option("--bn-stats", type=click.Choice(["keep", "recompute"]), default="keep", show_default=True,
              help="running mode: keep the stored statistics at every point (Li et al.) or re-estimate them on "
                   "the images at every point (one more forward pass)")
@click.option("--direction-seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="seed of the random directions (the same for every run)")
@click.option("--normalize", type=click.Choice(NORMALIZE), default="filter", show_default=True,
              help="direction normalisation (Li et al.: filter)")
@click.option("--ignore", type=click.Choice(IGNORE), default="biasbn", show_default=True,
              help="biasbn: no perturbation of biases and BN parameters (Li et al.)")
@click.option("--interpolate", is_flag=True,
              help="instead of random directions: the 1-D linear interpolation from init to final weights")
@click.option("--executor", type=ExecutorChoice(), default="process", show_default=True,
              help="how grid rows are fanned out")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="parallel workers [default: the cores (1 on CUDA or serial)]")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True, help="torch threads per worker")
@click.option("--ray-address", default=None, help="join this Ray cluster instead of starting a local one")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="auto (cuda if available), cpu or cuda")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None, help="folder holding the dataset files")
@click.option("--figures/--no-figures", default=True, show_default=True, help="draw the figure when done")
@click.option("--figures-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="where the figure goes [default: <study>/figures, the first run's parent]")
@click.option("--vmin", type=float, default=0.1, show_default=True, help="lowest contour level")
@click.option("--vmax", type=float, default=10.0, show_default=True, help="contour levels stop below this")
@click.option("--vlevel", type=float, default=0.5, show_default=True, help="spacing of contour levels")
@click.pass_context
def surface_command(ctx, run_dirs, epoch, dim, grid, range_, samples, bn_mode, bn_stats, direction_seed, normalize,
                    ignore, interpolate, executor, workers, threads, ray_address, device, data_dir, figures,
                    figures_dir, vmin, vmax, vlevel):
    """Loss surfaces (Li et al. 2018) of the runs in RUN_DIRS (run directories, or study directories standing for
    all their runs), stored in <run>/surfaces/*.npz. Resumable: the same command continues an interrupted
    computation and fills only the missing points; on a finished one it only redraws the figure."""
    from experiments.config import ConfigError
    from experiments.data import DataError
    from experiments.features.surface.grid import SurfaceError, compute_surfaces, expand_run_dirs
    quiet = (ctx.obj or {}).get("quiet", False)
    lo, hi = _parse_range(range_, interpolate)
    _check_levels(figures, vmin, vmax, vlevel)
    try:
        if interpolate:
            explicit = [f"--{n}" for n in ("dim", "epoch", "direction-seed", "normalize", "ignore")
                        if ctx.get_parameter_source(n.replace("-", "_")) is not ParameterSource.DEFAULT]
            if explicit:
                raise ConfigError(f"--interpolate is the 1-D segment from init to final weights; {', '.join(explicit)} "
                                  f"do not apply to it: leave them out")
            spec = SurfaceSpec(kind="interpolation", epoch="init:final", dim=1, grid=grid, lo=lo, hi=hi,
                               samples=samples, bn_mode=bn_mode, bn_stats=bn_stats, direction_seed=0,
                               normalize="none", ignore="none")
        else:
            spec = SurfaceSpec(epoch=epoch, dim=dim, grid=grid, lo=lo, hi=hi, samples=samples, bn_mode=bn_mode,
                               bn_stats=bn_stats, direction_seed=direction_seed, normalize=normalize, ignore=ignore)
        runs = expand_run_dirs(run_dirs)
        if not quiet:
            click.echo(f"{len(runs)} run(s), {spec.grid ** spec.dim} points each -> <run>/surfaces/{spec.stem}.npz "
                       f"[{executor}]")
        stored = compute_surfaces(runs, spec, executor=executor, workers=workers, threads=threads, device=device,
                                  data_dir=None if data_dir is None else str(data_dir), ray_address=ray_address,
                                  quiet=quiet)
    except (ConfigError, SurfaceError, DataError) as exc:
        raise click.ClickException(str(exc))
    except KeyboardInterrupt:
        click.echo("\ninterrupted: finished rows are stored; run the same command again to compute only the "
                   "missing points", err=True)
        sys.exit(130)
    if figures:
        from experiments.analysis import AnalysisError
        from experiments.features.surface.figures import plot_surfaces
        try:
            paths = plot_surfaces(stored, figures_dir or runs[0].parent / "figures", vmin=vmin, vmax=vmax,
                                  vlevel=vlevel)
        except AnalysisError as exc:
            raise click.ClickException(str(exc))
        if not quiet:
            click.echo("figure: " + ", ".join(str(p) for p in paths))
    elif not quiet:
        for s in stored:
            click.echo(str(s.path))
