"""The `smoothness-lab` command line (click). `smoothness-lab --help` lists the commands."""
from __future__ import annotations

import dataclasses
import math
import re
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import click

from experiments.config import ConfigError, RunConfig, StudyConfig, option_name
from experiments.executors.choice import ExecutorChoice
from experiments.study_files import read_json

# Help of RunConfig's own fields; the measurements' options bring theirs (experiments/features/)
_HELP = {
    "dataset": "dataset (fashion-mnist, mnist1d, synthetic, mnist, mnist-32x3, svhn, cifar10), imagefolder:PATH (a "
               "folder with train/ and test/ class folders) or MODULE:FACTORY returning (train, test) torch Datasets",
    "subset": "fraction of the training set used, drawn with the run's seed",
    "batch_size": "minibatch size (at most the training subset's size: a larger one is refused), or 'full': every "
                  "step on the whole training subset (gradient descent)",
    "epochs": "passes over the training subset (a pass is round(n / batch) steps; one step at full batch)",
    "sampling": "minibatches drawn with replacement (the seed's) or by shuffling each pass",
    "naive_init": "uniform(-1, 1) initialisation of MLP layers (seed 000)",
    "loss": "training loss: cross-entropy, or mse (Cohen et al.'s square loss on one-hot targets)",
    "optimizer": "torch's sgd, adam or adamw",
    "momentum": "SGD momentum (torch's heavy ball)",
    "nesterov": "Nesterov momentum (SGD)",
    "weight_decay": "weight decay (L2 in the gradient for sgd/adam, decoupled for adamw)",
    "adam_beta1": "Adam/AdamW beta1",
    "adam_beta2": "Adam/AdamW beta2",
    "adam_eps": "Adam/AdamW epsilon",
    "lr_schedule": "learning-rate schedule per step: constant, cosine (to 0 at the end) or step",
    "warmup_steps": "linear warmup over the first N steps (0 = none; shorter than the run)",
    "lr_decay_every": "step schedule: multiply the lr by --lr-decay-factor every N steps",
    "lr_decay_factor": "step schedule: the factor of each decay",
    "device": "auto (cuda if available), cpu or cuda",
    "tensorboard": "also write TensorBoard scalars to <run>/tb",
}
_CHOICES = {"sampling": ["replacement", "shuffle"], "optimizer": ["sgd", "adam", "adamw"],
            "lr_schedule": ["constant", "cosine", "step"], "loss": ["cross-entropy", "mse"]}
_BEFORE_MEASUREMENTS = tuple(_HELP)[:-2]   # the options --help lists before the measurements', then device, tensorboard


def tracking_fields() -> tuple:
    """The RunConfig options `run`, `sweep` and `train` take, in --help order: RunConfig's own (``_HELP``), then
    every registered measurement's (also those registered after this module was imported), then where it runs."""
    from experiments.features import options
    return _BEFORE_MEASUREMENTS + tuple(o.name for o in options()) + ("device", "tensorboard")
# A study holds at most this many runs (models x lrs x seeds): 10,000 runs of the main job's size are about
# 18 CPU-days; a larger grid is almost certainly a typo (--seeds 0-100000000) and would only hang while it is built.
MAX_RUNS = 10_000


class BatchSize(click.ParamType):
    """A positive integer, or "full" (stored as 0): full-batch gradient descent."""

    name = "N|full"

    def convert(self, value, param, ctx):
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        elif str(value).strip().lower() == "full":
            return 0
        else:
            try:
                number = int(str(value))
            except ValueError:
                self.fail(f"{value!r} is neither a positive integer nor 'full'", param, ctx)
        if number < 1:
            self.fail(f"{value!r} must be a positive integer or 'full' (the whole training subset)", param, ctx)
        return number


def _option_spec(name: str):
    """(click type, default, help, is a flag) of a RunConfig option: from ``_HELP`` or its measurement's Option."""
    from experiments.features import find_option
    option = find_option(name)
    if option is not None:
        kind = click.Choice(list(option.choices)) if option.choices else option.type
        return kind, option.default, option.help, option.type is bool
    default = next(f.default for f in dataclasses.fields(RunConfig) if f.name == name)
    if name in _CHOICES:
        kind = click.Choice(_CHOICES[name])
    elif name == "batch_size":
        kind = BatchSize()
    else:
        kind = {int: int, float: float, str: str, bool: bool}.get(type(default), str)
    return kind, default, _HELP[name], isinstance(default, bool)


def tracking_options(defaults_from_study: bool):
    """One click option per RunConfig option (STYLE.md), measurements' included. In `run`/`sweep` they override the
    study's values. The options are made when the command is decorated: a measurement registered later (after
    `experiments.cli` was imported) adds its options to the commands through `add_measurement_options`."""
    def decorate(fn):
        for name in reversed(tracking_fields()):
            fn = _click_option(name, defaults_from_study)(fn)
        fn.tracking_defaults_from_study = defaults_from_study
        return fn
    return decorate


def _click_option(name: str, defaults_from_study: bool):
    kind, default, help_text, flag = _option_spec(name)
    flag_name = "--" + name.replace("_", "-")
    decl = [f"{flag_name}/--no-{name.replace('_', '-')}"] if flag else [flag_name]
    if defaults_from_study:
        return click.option(*decl, name, type=kind, default=None,
                            help=f"{help_text} [default: the study's; {default!r} in fashion-mnist-bn]")
    return click.option(*decl, name, type=kind, default=default, show_default=True, help=help_text)


class TrackingCommand(click.Command):
    """A command with `tracking_options`: before it parses its arguments (or prints --help) it adds the options of
    measurements registered after it was built, so that registering a measurement is all it takes."""

    def parse_args(self, ctx, args):
        registered = set(tracking_fields())
        # options added for a measurement that has been unregistered since are dropped again
        self.params = [p for p in self.params if not getattr(p, "added_later", False) or p.name in registered]
        have = {p.name for p in self.params}
        from_study = self.callback.tracking_defaults_from_study
        for name in tracking_fields():
            if name not in have:
                _click_option(name, from_study)(self)  # appends a click.Option to self.params
                self.params[-1].added_later = True
        return super().parse_args(ctx, args)


def factory_options(fn):
    """--model-arg and --dataset-arg (experiments.plugins): arguments of a MODULE:FACTORY model or dataset."""
    fn = click.option("--dataset-arg", "dataset_arg", multiple=True, metavar="KEY=VALUE",
                      help="an argument of a MODULE:FACTORY or imagefolder dataset (imagefolder: size=32, "
                           "standardise=false); VALUE is JSON where it parses, else a string; repeat for several")(fn)
    return click.option("--model-arg", "model_arg", multiple=True, metavar="KEY=VALUE",
                        help="an argument of a MODULE:FACTORY model, e.g. width=16; VALUE is JSON where it parses, "
                             "else a string; repeat for several")(fn)


def _factory_args(options: dict) -> dict:
    """Pop --model-arg / --dataset-arg from a command's options as RunConfig overrides (None: not given)."""
    from experiments.plugins import PluginError, parse_args
    out = {}
    for option, field in (("model_arg", "model_args"), ("dataset_arg", "dataset_args")):
        values = options.pop(option, ())
        try:
            out[field] = parse_args(values, option_name(option)) if values else None
        except PluginError as exc:
            raise ConfigError(str(exc)) from None
    return out


def launch_options(fn):
    opts = [
        click.option("--results-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("results"),
                     show_default=True, help="where study directories are created"),
        click.option("--data-dir", type=click.Path(path_type=Path), default=None,
                     help="folder holding the dataset files (else $SMOOTHNESS_DATA, ./data, system paths)"),
        click.option("--executor", type=ExecutorChoice(), default="process", show_default=True,
                     help="how runs are fanned out"),
        click.option("--workers", type=click.IntRange(min=1), default=None,
                     help="parallel runs [default: min(cores, runs); 1 for serial]"),
        click.option("--threads", type=click.IntRange(min=1), default=None,
                     help="torch threads per run, the same under every executor so that records do not depend on it "
                          "[default: 1]"),
        click.option("--ray-address", default=None, help="join this Ray cluster instead of starting a local one"),
        click.option("--slurm-cluster", type=click.Choice(["slurm", "local"]), default=None,
                     help="--executor slurm: submit to SLURM (sbatch), or run the jobs on this machine through "
                          "submitit's local executor [default: slurm]"),
        click.option("--slurm-partition", default=None, help="--executor slurm: the partition of every job"),
        click.option("--slurm-time", type=click.IntRange(min=1), default=None,
                     help="--executor slurm: time limit per job in minutes; a run cut off resumes from its last "
                          "checkpoint in a requeued job [default: 240]"),
        click.option("--slurm-gpus", type=click.IntRange(min=0), default=None,
                     help="--executor slurm: GPUs per run [default: 0]"),
        click.option("--slurm-cpus", type=click.IntRange(min=1), default=None,
                     help="--executor slurm: CPUs per run [default: --threads]"),
        click.option("--slurm-mem-gb", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="--executor slurm: memory per run in GB [default: the partition's]"),
        click.option("--slurm-sbatch", multiple=True, metavar="KEY=VALUE",
                     help="--executor slurm: a further sbatch option, e.g. account=mylab or constraint=a100 "
                          "(repeat the option for several)"),
        click.option("--resume", is_flag=True, help="continue interrupted runs from their last checkpoint"),
        click.option("--figures/--no-figures", default=True, show_default=True,
                     help="write figures and report.md when the runs end"),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


_INT = re.compile(r"-?\d+")
_RANGE = re.compile(r"(-?\d+)-(-?\d+)")


def _parse_list(value: Optional[str], kind, option: str):
    """A comma-separated option value as a list (int lists also take ranges such as 0-4). Every error names the
    option; learning rates must be positive, seeds non-negative, models (``model[:norm]``) in the registries, and
    a list holds at most MAX_RUNS values (checked before a range is expanded)."""
    if value is None:
        return None
    if not value.strip():
        raise click.BadParameter("the list is empty; the grid needs at least one value", param_hint=option)
    items = []
    for part in value.split(","):
        part = part.strip()
        if not part:
            raise click.BadParameter(f"empty item in {value!r}; write a comma-separated list", param_hint=option)
        if kind is int:
            items.extend(_parse_int_item(part, option, len(items)))
            continue
        try:
            item = kind(part)
        except ValueError:
            raise click.BadParameter(f"{part!r} is not a valid {kind.__name__}", param_hint=option) from None
        if kind is float and not (math.isfinite(item) and item > 0):
            raise click.BadParameter(f"{part!r} is not a positive number", param_hint=option)
        items.append(item)
    if len(items) > MAX_RUNS:
        raise click.BadParameter(f"{len(items):,} values; a study holds at most {MAX_RUNS:,} runs",
                                 param_hint=option)
    if option.startswith("--models"):
        from experiments.models import MODELS
        from experiments.normalization import NORMS
        from experiments.plugins import PluginError, check_syntax, is_user_model
        for spec in items:
            if is_user_model(spec):  # MODULE:FACTORY (experiments.plugins): imported by the checks before launch
                try:
                    check_syntax(spec, option)
                except PluginError as exc:
                    raise click.BadParameter(str(exc), param_hint=option) from None
                continue
            model, _, norm = spec.partition(":")
            if model not in MODELS:
                raise click.BadParameter(f"unknown model {model!r}; choose from: {', '.join(MODELS)}, or "
                                         f"MODULE:FACTORY", param_hint=option)
            if ":" in spec and norm not in NORMS:
                raise click.BadParameter(f"unknown norm {norm!r} in {spec!r}; choose from: {', '.join(NORMS)}",
                                         param_hint=option)
    return items


def _parse_int_item(part: str, option: str, before: int) -> range:
    """One item of a seed list: N or LOW-HIGH (inclusive), non-negative; ``before`` values precede it."""
    if _INT.fullmatch(part):
        lo = hi = int(part)
    elif _RANGE.fullmatch(part):
        lo, hi = (int(x) for x in _RANGE.fullmatch(part).groups())
    else:
        raise click.BadParameter(f"{part!r} is neither a non-negative integer nor a range LOW-HIGH such as 0-4",
                                 param_hint=option)
    if lo < 0 or hi < 0:
        what = f"{part!r} holds a negative number" if lo == hi else \
            f"{part!r} is not a range LOW-HIGH of non-negative integers such as 0-4"
        raise click.BadParameter(f"{what} (seeds are non-negative)", param_hint=option)
    if hi < lo:
        raise click.BadParameter(f"range {part!r} is empty (write LOW-HIGH with LOW <= HIGH)", param_hint=option)
    if before + hi - lo + 1 > MAX_RUNS:
        gives = f"gives {hi - lo + 1:,} values" if not before else f"brings the list to {before + hi - lo + 1:,} values"
        raise click.BadParameter(f"{part!r} {gives}; a study holds at most {MAX_RUNS:,} runs: split the grid into "
                                 f"several studies", param_hint=option)
    return range(lo, hi + 1)


def check_folder_name(name, option: str) -> str:
    """A study name is one folder under --results-dir: not empty, not . or .., no path separator (so that results
    never land outside --results-dir or in its root)."""
    if (not isinstance(name, str) or not name.strip() or name in (".", "..") or "/" in name or "\\" in name
            or "\0" in name):
        raise ConfigError(f"{option} must be a plain folder name (it names the folder under --results-dir: no '/', "
                          f"not empty, '.' or '..'), got {name!r}")
    return name


def _fail(message: str) -> None:
    raise click.ClickException(message)


def _study_from(base_study: StudyConfig, name: Optional[str], models, lrs, seeds, overrides: dict) -> StudyConfig:
    n = len(models or base_study.models) * len(lrs or base_study.lrs) * len(seeds or base_study.seeds)
    n *= math.prod(len(v) for k, v in base_study.axes if overrides.get(k) is None)
    if n > MAX_RUNS:
        raise ConfigError(f"the grid has {n:,} runs (models x lrs x seeds); a study holds at most {MAX_RUNS:,}: "
                          f"split it into several studies")
    given = {k: v for k, v in overrides.items() if v is not None}
    from experiments.plugins import is_user_model
    user = [m for m in models or base_study.models if is_user_model(m)]
    if given.get("model_args") and user:  # the base validates with a model that takes them (runs() sets each model)
        given["model"], given["norm"] = user[0], None
    base = dataclasses.replace(base_study.base, **given)
    axes = tuple((k, v) for k, v in base_study.axes if k not in given)  # an option given on the command line wins
    return StudyConfig(name=name or base_study.name, models=tuple(models or base_study.models),
                       lrs=tuple(lrs or base_study.lrs), seeds=tuple(seeds or base_study.seeds),
                       base=dataclasses.replace(base, study=name or base_study.name), axes=axes)


def _check_data(study: StudyConfig, data_dir) -> None:
    from experiments.plugins import check_runs   # load the data, build each model once and probe it
    check_runs(study.runs(), None if data_dir is None else str(data_dir))


def _steps_per_run(study: StudyConfig, data_dir) -> dict:
    """Every run's number of SGD steps; raises ConfigError for options that do not fit its training subset."""
    from experiments.plugins import load_run_dataset
    out = {}
    for cfg in study.runs():
        n = load_run_dataset(cfg, None if data_dir is None else str(data_dir)).x_train.shape[0]
        cfg.check_training_set(n)
        out[cfg.run_id] = cfg.total_steps(n)
    return out


def _write_study_json(study_dir: Path, study: StudyConfig) -> None:
    """study.json lists every grid ever launched into this folder (so `status` knows which runs to expect);
    a new grid is appended, an old one is never dropped. Grids are compared as configs, so the same grid written
    before a RunConfig field existed is not appended again."""
    from experiments.store import atomic_write_json
    path = study_dir / "study.json"
    grids = read_json(path).get("grids", []) if path.exists() else []

    def same(grid) -> bool:
        try:
            return StudyConfig.from_dict(grid) == study
        except (ConfigError, KeyError, TypeError, ValueError):   # unreadable grids are kept, and compared raw
            return grid == study.to_dict()

    if not any(same(g) for g in grids):
        grids.append(study.to_dict())
    atomic_write_json(path, {"name": study.name, "grids": grids})


def _write_launch_json(study_dir: Path, seconds: float, executor: str, workers, threads, n_runs: int,
                       counts: dict) -> None:
    """Append how long this launch took and on what (the numbers behind the README's time budget); earlier
    launches are kept, so relaunching a finished study never hides how long it took to compute. Called only for
    launches that ran something: a relaunch that skips every run (`make run` on a fresh clone) leaves the
    committed file as it is."""
    import os
    import platform

    import torch

    from experiments.executors import default_workers
    from experiments.launchers import default_threads
    from experiments.store import atomic_write_json
    path = study_dir / "launch.json"
    try:
        launches = read_json(path).get("launches", []) if path.exists() else []
    except (OSError, ValueError, AttributeError):
        launches = []
    launches.append({
        "wall_seconds": round(seconds, 1), "executor": executor,
        "workers": workers or default_workers(executor, n_runs), "threads": threads or default_threads(),
        "cpu_count": os.cpu_count(), "machine": platform.machine(), "torch": torch.__version__,
        "cuda": torch.cuda.is_available(), "runs": counts, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    atomic_write_json(path, {"launches": launches})


def _warn_left_behind(runs: Sequence[RunConfig], study_dir: Path) -> None:
    """Say which interrupted runs this launch leaves as they are because their options differ."""
    from experiments.config import option_name
    from experiments.launchers import left_behind
    for run_dir, old, cfg, fields in left_behind(runs, study_dir):
        changes = ", ".join(f"{option_name(k)} {getattr(old, k)!r} -> {getattr(cfg, k)!r}" for k in fields)
        click.echo(f"warning: the options differ from those of the interrupted run {run_dir} ({changes}); "
                   f"{cfg.run_id} is a new run and starts from scratch, and {run_dir.name} is left as it is "
                   f"(to continue it instead, rerun with its options and --resume)", err=True)


def _warn_code_changed(runs: Sequence[RunConfig], study_dir: Path) -> None:
    """Say which finished runs of a user's factory are kept although its source file changed since (plugins.py)."""
    from experiments.plugins import code_changes
    from experiments.store import read_code
    for cfg in runs:
        changed, _ = code_changes(read_code(study_dir / cfg.run_id))
        if changed and (study_dir / cfg.run_id / "done").exists():
            click.echo(f"warning: code changed since this run: {', '.join(changed)} differs from the file "
                       f"{cfg.run_id} was trained with; it is kept as it is (move it away to train it again)",
                       err=True)


def _slurm_options(executor: str, slurm: dict):
    """The --slurm-* options as SlurmOptions; None when none is given and the executor is not slurm."""
    if executor != "slurm" and all(v in (None, ()) for v in slurm.values()):
        return None
    from experiments.executors.slurm import SlurmOptions, parse_sbatch
    given = {k: v for k, v in dict(cluster=slurm["slurm_cluster"], partition=slurm["slurm_partition"],
                                   time_min=slurm["slurm_time"], gpus=slurm["slurm_gpus"], cpus=slurm["slurm_cpus"],
                                   mem_gb=slurm["slurm_mem_gb"]).items() if v is not None}
    return SlurmOptions(**given, sbatch=parse_sbatch(slurm["slurm_sbatch"]))


def run_study(study: StudyConfig, *, results_dir: Path, data_dir, executor: str, workers, threads, ray_address,
              resume: bool, figures: bool, quiet: bool, slurm=None) -> None:
    from experiments.data import DataError
    from experiments.launchers import check_launch, launch
    from experiments.store import StoreError, check_writable
    study_dir = results_dir / study.name
    try:  # every check that can fail comes before the first write
        runs = study.runs()
        check_launch(runs, study_dir, executor=executor, ray_address=ray_address, slurm=slurm, resume=resume)
        _check_data(study, data_dir)
        steps = _steps_per_run(study, data_dir)
        check_writable(study_dir)
        _write_study_json(study_dir, study)
    except (ConfigError, StoreError, DataError) as exc:
        _fail(str(exc))
    _warn_left_behind(runs, study_dir)
    _warn_code_changed(runs, study_dir)
    if not quiet:
        click.echo(f"{len(runs)} runs ({', '.join(study.models)} x lr {list(study.lrs)} x seeds "
                   f"{list(study.seeds)}) -> {study_dir} [{executor}]")
    started = time.perf_counter()
    try:
        results = launch(runs, study_dir, executor=executor, workers=workers, threads=threads, resume=resume,
                         data_dir=None if data_dir is None else str(data_dir), ray_address=ray_address,
                         slurm=slurm, quiet=quiet, steps_per_run=steps)
    except (ConfigError, StoreError) as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        again = "the same command" if resume else "with --resume"
        click.echo(f"\ninterrupted: finished runs are kept; relaunch {again} to resume the others "
                   f"(smoothness-lab status {study_dir})", err=True)
        sys.exit(130)
    counts = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    if any(r.status not in ("skipped", "busy") for r in results):   # else nothing ran: the log stays as it was
        _write_launch_json(study_dir, time.perf_counter() - started, executor, workers, threads, len(runs), counts)
    if not quiet:
        click.echo("runs: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    failed = [r for r in results if r.status == "failed"]
    for r in failed:
        click.echo(f"FAILED {r.run_id}: {r.error} (log: {study_dir / r.run_id / 'run.log'})", err=True)
    busy = [r for r in results if r.status == "busy"]
    for r in busy:
        click.echo(f"BUSY {r.run_id}: {r.error}", err=True)
    if busy:
        click.echo(f"{len(busy)} run(s) are being trained by another launch into {study_dir}; when it ends, "
                   f"relaunch to finish the study (`smoothness-lab status {study_dir}` shows where they are)",
                   err=True)
    if figures and any(r.status in ("done", "diverged", "skipped") for r in results):
        _analyse(study_dir, quiet)
    if failed or busy:   # the study is not complete: a script waiting on this command must not go on
        sys.exit(1)


def _analyse(study_dir: Path, quiet: bool) -> None:
    from experiments import analysis
    try:
        paths = analysis.plot_study(study_dir)
        report = analysis.write_report(study_dir)
    except analysis.AnalysisError as exc:
        _fail(str(exc))
    if not quiet:
        click.echo(f"figures: {study_dir / 'figures'} ({len(paths)} files); report: {report}")


class FeatureGroup(click.Group):
    """The command group: its own commands, then every registered feature's (``experiments.features``), looked up
    when the command line is parsed, so that a feature registered after this module was imported adds its commands
    (as `TrackingCommand` adds its measurement's options)."""

    def _feature_commands(self) -> dict:
        from experiments.features import FEATURES, resolve
        commands = {}
        for feature in list(FEATURES.values()):
            for ref in feature.commands:
                command = resolve(ref)
                commands.setdefault(command.name, command)
        return commands

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(self._feature_commands()))

    def get_command(self, ctx, name):
        return super().get_command(ctx, name) or self._feature_commands().get(name)


@click.group(cls=FeatureGroup, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--quiet", "-q", is_flag=True, help="no progress bars or summaries")
@click.pass_context
def main(ctx, quiet):
    """smoothness-lab: how smooth is the loss landscape along SGD, and what does BatchNorm do to it?"""
    from smoothness.allocator import tune_cpu_allocator
    tune_cpu_allocator()   # CPU products without a page fault per page (smoothness.allocator); workers do it too
    ctx.obj = {"quiet": quiet}


@main.command(cls=TrackingCommand)
@click.option("--study", "study_name", default="fashion-mnist-bn", show_default=True,
              help="a preset study (see `smoothness-lab studies`)")
@click.option("--models", default=None, help="override the study's models, e.g. convnet,bn-convnet,convnet:noisy")
@click.option("--lrs", default=None, help="override the study's learning rates, e.g. 0.01,0.04")
@click.option("--seeds", default=None, help="override the study's seeds, e.g. 0-2 or 0,3,7")
@launch_options
@tracking_options(defaults_from_study=True)
@factory_options
@click.pass_context
def run(ctx, study_name, models, lrs, seeds, results_dir, data_dir, executor, workers, threads, ray_address,
        resume, figures, **options):
    """The main job: train every model x lr x seed of a study, track smoothness, then draw figures and report."""
    from experiments.presets import get_preset
    slurm = {k: options.pop(k) for k in list(options) if k.startswith("slurm_")}
    try:
        options.update(_factory_args(options))
        study = _study_from(get_preset(study_name), None, _parse_list(models, str, "--models"),
                            _parse_list(lrs, float, "--lrs"), _parse_list(seeds, int, "--seeds"), options)
        slurm = _slurm_options(executor, slurm)
    except ConfigError as exc:
        _fail(str(exc))
    run_study(study, results_dir=results_dir, data_dir=data_dir, executor=executor, workers=workers,
              threads=threads, ray_address=ray_address, resume=resume, figures=figures, quiet=ctx.obj["quiet"],
              slurm=slurm)


@main.command(cls=TrackingCommand)
@click.option("--models", default="convnet,bn-convnet", show_default=True,
              help="comma-separated models[:norm] or MODULE:FACTORY import strings (MODULE not a built-in model)")
@click.option("--lrs", default="0.04", show_default=True, help="comma-separated learning rates")
@click.option("--seeds", default="0-2", show_default=True, help="seeds: a range 0-4 or a list 0,1,2")
@click.option("--sweep-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="JSON file with keys models, lrs, seeds and any option (overrides the list options)")
@click.option("--name", default="sweep", show_default=True, help="study name: results go to RESULTS_DIR/NAME")
@launch_options
@tracking_options(defaults_from_study=True)
@factory_options
@click.pass_context
def sweep(ctx, models, lrs, seeds, sweep_file, name, results_dir, data_dir, executor, workers, threads,
          ray_address, resume, figures, **overrides):
    """A learning-rate x model x seed grid; relaunching skips finished runs and resumes interrupted ones."""
    slurm = {k: overrides.pop(k) for k in list(overrides) if k.startswith("slurm_")}
    try:
        overrides.update(_factory_args(overrides))
    except ConfigError as exc:
        _fail(str(exc))
    models_l = _parse_list(models, str, "--models")
    lrs_l = _parse_list(lrs, float, "--lrs")
    seeds_l = _parse_list(seeds, int, "--seeds")
    if sweep_file is not None:
        try:
            spec = read_json(sweep_file)
        except (OSError, ValueError) as exc:
            _fail(f"{sweep_file} is not valid JSON: {exc}")
        if not isinstance(spec, dict):
            _fail(f"{sweep_file} must hold a JSON object with keys models, lrs, seeds, name and options")

        def listed(key, kind, current):
            if key not in spec:
                return current
            value = spec.pop(key)
            value = value if isinstance(value, list) else [value]
            return _parse_list(",".join(str(v) for v in value), kind, f"--{key} ({key!r} in {sweep_file})")

        models_l = listed("models", str, models_l)
        lrs_l = listed("lrs", float, lrs_l)
        seeds_l = listed("seeds", int, seeds_l)
        name = spec.pop("name", name)
        unknown = sorted(set(spec) - set(tracking_fields()) - {"model_args", "dataset_args"})
        if unknown:
            _fail(f"{sweep_file}: unknown keys {unknown}; allowed: models, lrs, seeds, name, "
                  f"{', '.join(tracking_fields())}, model_args, dataset_args")
        overrides.update(spec)
    try:
        check_folder_name(name, "--name")
        if not models_l or not lrs_l or not seeds_l:
            raise ConfigError("the grid is empty: give at least one model, lr and seed")
        study = _study_from(StudyConfig(), name, models_l, lrs_l, seeds_l, overrides)
        study.runs()  # every run's config is checked before anything is written
        slurm = _slurm_options(executor, slurm)
    except (ConfigError, TypeError) as exc:
        _fail(str(exc))
    run_study(study, results_dir=results_dir, data_dir=data_dir, executor=executor, workers=workers,
              threads=threads, ray_address=ray_address, resume=True, figures=figures, quiet=ctx.obj["quiet"],
              slurm=slurm)


@main.command(cls=TrackingCommand)
@click.option("--model", default="convnet", show_default=True,
              help="a model from the registry, or MODULE:FACTORY (a factory on PYTHONPATH returning an nn.Module)")
@click.option("--norm", default=None, help="none, torch, scratch, scratch-fn, noisy, l1, l2, linf [default: the model's]")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--lr", default=0.04, show_default=True, type=float)
@click.option("--study", "study_name", default="train", show_default=True, help="results go to RESULTS_DIR/STUDY")
@click.option("--results-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("results"),
              show_default=True)
@click.option("--data-dir", type=click.Path(path_type=Path), default=None, help="folder holding the dataset files")
@click.option("--resume", is_flag=True, help="continue an interrupted run from its last checkpoint")
@tracking_options(defaults_from_study=False)
@factory_options
@click.pass_context
def train(ctx, model, norm, seed, lr, study_name, results_dir, data_dir, resume, **options):
    """Train one model with one seed (no figures); prints where the records are."""
    from experiments.data import DataError
    from experiments.launchers import check_launch, execute
    from experiments.store import StoreError, check_writable
    try:  # every check that can fail comes before the first write
        check_folder_name(study_name, "--study")
        options.update({k: v for k, v in _factory_args(options).items() if v is not None})
        cfg = RunConfig(model=model, norm=norm, seed=seed, lr=lr, study=study_name, **options)
        check_launch([cfg], results_dir / study_name, executor="serial", resume=resume)
        _check_data(StudyConfig(models=(model,), seeds=(seed,), base=cfg), data_dir)
        steps = _steps_per_run(StudyConfig(models=(model,), seeds=(seed,), lrs=(lr,), base=cfg), data_dir)
        study_dir = check_writable(results_dir / study_name)
    except (ConfigError, StoreError, DataError) as exc:
        _fail(str(exc))
    _warn_left_behind([cfg], study_dir)
    _warn_code_changed([cfg], study_dir)
    from experiments.launchers import DirectQueue, ProgressDisplay, default_threads
    display = ProgressDisplay([cfg], steps, ctx.obj["quiet"])
    try:
        result = execute(cfg.to_dict(), str(study_dir), resume, None if data_dir is None else str(data_dir),
                         default_threads(), progress_queue=DirectQueue(display))
    finally:
        display.close()
    if result.status in ("failed", "busy"):
        _fail(f"{result.error} (log: {study_dir / cfg.run_id / 'run.log'})")
    if not ctx.obj["quiet"]:
        click.echo(f"{result.status}: {study_dir / cfg.run_id}")


@main.command()
@click.argument("results_dir", type=click.Path(path_type=Path))
@click.pass_context
def plot(ctx, results_dir):
    """Draw the figures of a study directory into RESULTS_DIR/figures (PNG and PDF)."""
    from experiments import analysis
    try:
        paths = analysis.plot_study(results_dir, notify=lambda message: click.echo(message, err=True))
    except analysis.AnalysisError as exc:
        _fail(str(exc))
    if not ctx.obj["quiet"]:
        for p in paths:
            click.echo(str(p))


@main.command()
@click.argument("results_dir", type=click.Path(path_type=Path))
@click.option("--compare", default=None, metavar="A,B",
              help="the two models to pair by seed, B - A (e.g. small_resnet:resnet_plain,small_resnet:resnet_bn) "
                   "[default: every X with its bn-X]")
@click.pass_context
def report(ctx, results_dir, compare):
    """Write report.md and report.csv: metrics over seeds, divergence rates, BN vs no BN paired by seed."""
    from experiments import analysis
    try:
        if compare is not None and len(compare.split(",")) != 2:
            raise analysis.AnalysisError(f"--compare takes two models A,B, got {compare!r}")
        path = analysis.write_report(results_dir, compare=None if compare is None else tuple(compare.split(",")))
    except analysis.AnalysisError as exc:
        _fail(str(exc))
    if not ctx.obj["quiet"]:
        click.echo(path.read_text())


@main.command()
def studies():
    """List the preset studies."""
    from experiments.presets import DESCRIPTIONS, PRESETS
    width = max(map(len, PRESETS))
    for name, study in PRESETS.items():
        click.echo(f"{name:{width}s} {len(study.runs()):3d} runs  {DESCRIPTIONS[name]}")


def _register_commands() -> None:
    from experiments.features.base import RegistryError, load_plugins
    from experiments.status import status_command
    main.add_command(status_command)
    try:
        load_plugins()   # features from outside the package: $SMOOTHNESS_LAB_FEATURES, entry points
    except RegistryError as exc:
        raise SystemExit(f"Error: {exc}") from None


_register_commands()

if __name__ == "__main__":
    main()
