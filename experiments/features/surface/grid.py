"""Loss surfaces of stored runs (Li et al. 2018) and their init → final interpolations (Goodfellow et al. 2015):
grid jobs, a resumable array store beside each run (``<run>/surfaces/<stem>.npz``), and a fan-out of grid rows
over worker processes or Ray. An interpolation evaluates (1 − α)·w_init + α·w_final with the buffers (BN running
statistics) of the final weights.

Details: docs/explanation/modules.md#surface-grid
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from smoothness import BN_MODES

from experiments import executors
from experiments.config import ConfigError, RunConfig
from experiments.store import (StoreError, config_path, has_config, load_weights, read_arrays, read_config, stored_form,
                    surface_file, write_arrays)
from experiments.store import weights_file as stored_weights_file

KINDS = ("surface", "interpolation")
NORMALIZE = ("filter", "layer", "none")
IGNORE = ("biasbn", "none")
SAMPLE_SEED = 0
MAX_COEFFICIENT = 1e3       # |LOW|, |HIGH| of --range, in units of the weights' norm (Li et al. plot within ±1)
BYTES_PER_POINT = 17        # losses and accuracies (float64) and done (bool)
MAX_ARRAY_BYTES = 2 ** 30   # the arrays of one surface are held in memory and rewritten after every unit
CHUNK = 1000          # images per forward pass
CELLS_1D = 4          # points per unit of a 1-D curve


class SurfaceError(RuntimeError):
    """A surface cannot be computed as asked; the message says why and what to do."""


@dataclass(frozen=True)
class SurfaceSpec:
    """Every option that changes a number of a surface (hashed into the file name)."""

    kind: str = "surface"          # "surface" (random directions) or "interpolation" (init -> final)
    epoch: str = "final"           # "init", "final" or a checkpoint epoch; "init:final" for an interpolation
    dim: int = 2
    grid: int = 51                 # points per axis
    lo: float = -1.0
    hi: float = 1.0
    samples: int = 1000            # training images (0 = the run's whole training subset)
    bn_mode: str = "running"
    bn_stats: str = "keep"
    direction_seed: int = 0
    normalize: str = "filter"
    ignore: str = "biasbn"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError(f"unknown surface kind {self.kind!r}; use one of {KINDS}")
        if self.kind == "interpolation" and (self.dim != 1 or self.epoch != "init:final"):
            raise ConfigError("an interpolation is 1-D from init to final (dim=1, epoch='init:final')")
        if self.kind == "surface":
            check_epoch(self.epoch)
        if self.dim not in (1, 2):
            raise ConfigError(f"--dim must be 1 or 2, got {self.dim}")
        if self.grid < 2:
            raise ConfigError(f"--grid must be at least 2 points per axis, got {self.grid}")
        if not (math.isfinite(self.lo) and math.isfinite(self.hi) and self.lo < self.hi):
            raise ConfigError(f"--range must be LOW:HIGH with finite LOW < HIGH, got {self.lo}:{self.hi}")
        if max(abs(self.lo), abs(self.hi)) > MAX_COEFFICIENT:
            raise ConfigError(f"--range {self.lo:g}:{self.hi:g} is beyond ±{MAX_COEFFICIENT:g} (the coefficients are "
                              f"in units of the weights' norm; Li et al. use -1:1): give a range within it")
        needed = BYTES_PER_POINT * self.grid ** self.dim
        if needed > MAX_ARRAY_BYTES:
            raise ConfigError(f"--grid {self.grid} --dim {self.dim} would need {needed / 2 ** 30:.3g} GiB of memory "
                              f"for its arrays ({BYTES_PER_POINT} bytes per point); the limit is "
                              f"{MAX_ARRAY_BYTES / 2 ** 30:g} GiB: use a smaller --grid")
        if self.samples < 0:
            raise ConfigError(f"--samples must be >= 0 (0 = the whole training subset), got {self.samples}")
        if self.bn_mode not in BN_MODES:
            raise ConfigError(f"--bn-mode must be {' or '.join(BN_MODES)}, got {self.bn_mode!r}")
        if self.bn_stats not in ("keep", "recompute"):
            raise ConfigError(f"--bn-stats must be keep or recompute, got {self.bn_stats!r}")
        if self.bn_mode == "batch" and self.bn_stats != "keep":
            raise ConfigError("--bn-stats recompute applies only to --bn-mode running (batch mode already "
                              "normalises every point with its own batch statistics)")
        if self.normalize not in NORMALIZE or self.ignore not in IGNORE:
            raise ConfigError(f"--normalize must be one of {NORMALIZE} and --ignore one of {IGNORE}")

    @property
    def coords(self) -> Tuple[np.ndarray, ...]:
        axis = np.linspace(self.lo, self.hi, self.grid)
        return (axis,) * self.dim

    @property
    def shape(self) -> Tuple[int, ...]:
        return (self.grid,) * self.dim

    @property
    def hash(self) -> str:
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:10]

    @property
    def stem(self) -> str:
        if self.kind == "interpolation":
            return f"interpolation-{self.bn_mode}-{self.bn_stats}-{self.hash}"
        return f"surface-{self.dim}d-{self.epoch}-{self.bn_mode}-{self.bn_stats}-{self.hash}"


def check_epoch(epoch: str) -> str:
    if epoch in ("init", "final") or re.fullmatch(r"[0-9]+", epoch):   # str.isdigit also accepts "²"
        return epoch
    raise ConfigError(f"--epoch must be init, final or a checkpoint epoch (a non-negative integer), got {epoch!r}")


def surface_path(run_dir: Path, spec: SurfaceSpec) -> Path:
    return surface_file(run_dir, spec.stem)


# -- the stored arrays ---------------------------------------------------------------------------------------------
@dataclass
class StoredSurface:
    path: Path
    spec: dict              # the JSON in the file: spec fields, run, model, weight hashes
    x: np.ndarray
    y: Optional[np.ndarray]
    losses: np.ndarray
    accuracies: np.ndarray
    done: np.ndarray

    @property
    def complete(self) -> bool:
        return bool(self.done.all())

    def save(self) -> None:
        arrays = {"x": self.x, "losses": self.losses, "accuracies": self.accuracies, "done": self.done}
        if self.y is not None:
            arrays["y"] = self.y
        write_arrays(self.path, self.spec, arrays)


def read_surface(path: Path) -> StoredSurface:
    """Load a stored surface (see the module docstring for the arrays)."""
    path = Path(path)
    try:
        spec, f = read_arrays(path)
        # files written before the loss was recorded were all evaluated with cross-entropy
        return StoredSurface(path=path, spec={"loss": "cross-entropy", **spec}, x=f["x"], y=f.get("y"),
                             losses=f["losses"], accuracies=f["accuracies"], done=f["done"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise SurfaceError(f"{path} is not a readable surface file ({type(exc).__name__}: {exc}; truncated by a "
                           f"crash or a full disk?); delete it (or move it away) to recompute it") from None


# -- a run and its weights -----------------------------------------------------------------------------------------
def read_run_config(run_dir: Path) -> RunConfig:
    path = config_path(run_dir)
    if not path.exists():
        raise SurfaceError(f"{run_dir} is not a run directory (no {path.name}); give run directories such as "
                           f"results/<study>/<run-id>, or a study directory holding them")
    try:
        return read_config(path)
    except StoreError as exc:
        raise SurfaceError(f"{path} is unreadable ({exc})") from None


def weights_file(run_dir: Path, epoch: str) -> Path:
    """The file of the run's weights at ``epoch`` (``store.weights_file``)."""
    try:
        return stored_weights_file(run_dir, epoch)
    except StoreError as exc:
        raise SurfaceError(str(exc)) from None


def load_state(path: Path) -> Tuple[dict, str]:
    """(model state_dict on CPU, sha256 of the file) (``store.load_weights``)."""
    try:
        return load_weights(path)
    except StoreError as exc:
        raise SurfaceError(str(exc)) from None


def check_weights(cfg: RunConfig, path: Path, state: dict, input_shape, num_classes: int) -> None:
    """Refuse, in this process and before any work, weights that do not fit the run's model (another model's file)."""
    build_run_model(cfg, state, input_shape, num_classes, source=path)


def evaluation_batch(data, samples: int, data_dir: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``samples`` training images of the run's data in a fixed order; ``data``: the run's Dataset, or its RunConfig
    (the data then read through ``experiments.study.run_data``)."""
    if isinstance(data, RunConfig):
        from experiments.study import run_data
        data = run_data(data, data_dir)
    n = data.x_train.shape[0]
    if samples > n:
        raise SurfaceError(f"--samples {samples} exceeds the run's training subset ({n} images); "
                           f"use at most {n}, or 0 for all of them")
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(SAMPLE_SEED))[:samples or n]
    return data.x_train[idx], data.y_train[idx]


def build_run_model(cfg: RunConfig, state: dict, input_shape, num_classes: int, source="the weights"):
    """The run's network with ``state`` loaded (``experiments.study.model_for``: built-in, import-string and tracked
    runs alike)."""
    from experiments.study import RebuildError, model_for
    try:
        return model_for(cfg, input_shape, num_classes, state, source)
    except RebuildError as exc:
        raise SurfaceError(str(exc)) from None


# -- jobs: everything a worker needs for one run -------------------------------------------------------------------
def prepare_job(run_dir: Path, spec: SurfaceSpec, data_dir: Optional[str] = None) -> Tuple[dict, dict]:
    """(job, identity): the job holds tensors only (it travels to workers); the identity goes into the file."""
    from experiments.study import RebuildError, run_data
    cfg = read_run_config(run_dir)
    try:
        data = run_data(cfg, data_dir)
    except RebuildError as exc:
        raise SurfaceError(f"{run_dir}: {exc}") from None
    input_shape, num_classes = tuple(data.input_shape), data.num_classes
    epochs = ("init", "final") if spec.kind == "interpolation" else (spec.epoch,)
    states, shas = {}, {}
    for epoch in epochs:
        path = weights_file(run_dir, epoch)
        states[epoch], shas[epoch] = load_state(path)
        check_weights(cfg, path, states[epoch], input_shape, num_classes)
    state = states[epochs[-1]]
    weights = {"start": states["init"]} if spec.kind == "interpolation" else {}
    x, y = evaluation_batch(data, spec.samples)
    job = {"model": cfg.to_dict(), "input_shape": input_shape, "num_classes": num_classes,
           "x": x, "y": y, "spec": dataclasses.asdict(spec), "state": state, **weights}
    identity = {**dataclasses.asdict(spec), "run": cfg.run_id, "model": cfg.model, "norm": cfg.norm,
                "loss": cfg.loss, "seed": cfg.seed, "lr": cfg.lr, "sample_seed": SAMPLE_SEED, "chunk": CHUNK, "weights_sha256": shas}
    return job, identity


class _Built:
    """A job made ready to evaluate in this process: model, data chunks, directions."""

    def __init__(self, job: dict, device: torch.device):
        import smoothness

        from experiments.losses import get_loss
        spec = SurfaceSpec(**job["spec"])
        cfg = RunConfig.from_dict(job["model"])
        self.spec = spec
        self.loss_fn = get_loss(cfg.loss)
        self.model = build_run_model(cfg, job["state"], job["input_shape"], job["num_classes"]).to(device)
        x, y = job["x"].to(device), job["y"].to(device)
        self.chunks = [(x[i:i + CHUNK], y[i:i + CHUNK]) for i in range(0, x.shape[0], CHUNK)]
        self.coords = spec.coords
        params = [n for n, p in self.model.named_parameters() if p.requires_grad]
        if spec.kind == "interpolation":
            self.start = {n: job["start"][n].to(device) for n in params}
            self.end = {n: job["state"][n].to(device) for n in params}
        else:
            generator = torch.Generator().manual_seed(spec.direction_seed)
            opts = dict(normalize=None if spec.normalize == "none" else spec.normalize,
                        ignore=None if spec.ignore == "none" else spec.ignore)
            self.directions = [smoothness.random_direction(self.model, generator=generator, **opts)
                               for _ in range(spec.dim)]

    def evaluate(self, unit: "Unit") -> Tuple[np.ndarray, np.ndarray]:
        import smoothness
        row, cols = unit
        s = self.spec
        cols = np.asarray(cols)
        if s.kind == "interpolation":
            out = smoothness.interpolation(self.model, self.loss_fn, self.chunks, self.start, self.end,
                                           self.coords[0][cols], bn_mode=s.bn_mode, bn_stats=s.bn_stats)
        elif s.dim == 1:
            out = smoothness.loss_surface(self.model, self.loss_fn, self.chunks, self.directions,
                                          [self.coords[0][cols]], bn_mode=s.bn_mode, bn_stats=s.bn_stats)
        else:
            out = smoothness.loss_surface(self.model, self.loss_fn, self.chunks, self.directions,
                                          [self.coords[0][[row]], self.coords[1][cols]], bn_mode=s.bn_mode,
                                          bn_stats=s.bn_stats)
        return out.losses.reshape(-1), out.accuracies.reshape(-1)


Unit = Tuple[Optional[int], Tuple[int, ...]]   # (row of a 2-D grid or None, column indices)


def missing_units(done: np.ndarray) -> List[Unit]:
    """The cells still to compute, grouped as units: each 2-D row's missing columns; 1-D runs of CELLS_1D."""
    if done.ndim == 2:
        return [(i, tuple(int(j) for j in np.flatnonzero(~done[i]))) for i in range(done.shape[0])
                if not done[i].all()]
    todo = [int(j) for j in np.flatnonzero(~done)]
    return [(None, tuple(todo[k:k + CELLS_1D])) for k in range(0, len(todo), CELLS_1D)]


def _cells(unit: Unit):
    row, cols = unit
    return (np.full(len(cols), row), np.asarray(cols)) if row is not None else (np.asarray(cols),)


def open_surface(run_dir: Path, spec: SurfaceSpec, identity: dict) -> StoredSurface:
    """The run's stored surface for ``spec``: resumed when it exists and matches, else a new empty one."""
    path = surface_path(run_dir, spec)
    if path.exists():
        stored = read_surface(path)
        if stored.spec != stored_form(identity):
            raise SurfaceError(f"{path} was computed from other weights or options than asked now "
                               f"({_difference(stored.spec, identity)}); nothing was overwritten: move it away "
                               f"to recompute it")
        return stored
    coords = spec.coords
    return StoredSurface(path=path, spec=identity, x=coords[0], y=coords[1] if spec.dim == 2 else None,
                         losses=np.full(spec.shape, np.nan), accuracies=np.full(spec.shape, np.nan),
                         done=np.zeros(spec.shape, dtype=bool))


def _difference(a: dict, b: dict) -> str:
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return "differs in " + ", ".join(keys)


# -- fan-out -------------------------------------------------------------------------------------------------------
_BUILT: dict = {}   # this process's last built job: a worker evaluates many tasks of one job
TASKS_PER_WORKER = 1   # tasks per worker (each task pays one build of the model and directions)


def evaluate_units(job: dict, device: str, key: str, units: Sequence[Unit], progress=None) -> List[tuple]:
    """A task's units, in a worker of any executor (``job``: the run's shared job; built once per job and device).
    Each unit's ``(key, unit, losses, accuracies)`` goes to ``progress`` as soon as it is computed; the list of all of
    them is the return value (for executors without progress, and for what progress lost)."""
    if _BUILT.get("job") is not job or _BUILT.get("device") != device:
        _BUILT.clear()
        _BUILT.update(job=job, device=device, built=_Built(job, torch.device(device)))
    out = []
    for unit in units:
        item = (key, tuple(unit), *_BUILT["built"].evaluate(unit))
        if progress is not None:
            progress.put(item)
        out.append(item)
    return out


def units_per_task(n_units: int, workers: int) -> int:
    """How many units one task takes: the units spread over ``TASKS_PER_WORKER`` tasks per worker."""
    return max(1, math.ceil(n_units / max(1, workers * TASKS_PER_WORKER)))


@dataclass
class SurfaceRun:
    """One run's surface in progress."""
    run_dir: Path
    stored: StoredSurface
    job: dict
    units: List[Unit]


def compute_surfaces(run_dirs: Sequence[Path], spec: SurfaceSpec, *, executor: str = "process",
                     workers: Optional[int] = None, threads: int = 1, device: str = "auto",
                     data_dir: Optional[str] = None, ray_address: Optional[str] = None, quiet: bool = False,
                     on_task: Optional[Callable[[Path, Unit], None]] = None) -> List[StoredSurface]:
    """Compute (or finish) ``spec`` for every run on the executor of that name; returns the stored surfaces in the
    order of ``run_dirs``.

    Every check and every job is prepared before the first task runs. ``on_task(run_dir, unit)`` is called in this
    process after each unit (a row) is stored (the progress bar uses the same hook). Workers default to the executor's
    rule (``executors.default_workers``: one per core, one on this machine's GPU).
    """
    from tqdm.auto import tqdm

    from experiments.training import resolve_device
    options = executors.ExecutorOptions(ray_address=ray_address or None,
                                        workdir=Path(run_dirs[0]).parent if run_dirs else None)
    executors.check_executor(executor, options, [device], workers=workers, threads=threads)
    dev = resolve_device(device)
    runs = []
    for run_dir in run_dirs:
        job, identity = prepare_job(run_dir, spec, data_dir)
        stored = open_surface(run_dir, spec, identity)
        runs.append(SurfaceRun(Path(run_dir), stored, job, missing_units(stored.done)))
    n_units = sum(len(run.units) for run in runs)
    if not n_units:
        return [r.stored for r in runs]
    n_workers = workers or executors.default_workers(executor, n_units, options, one_gpu=dev.type == "cuda")
    per = units_per_task(n_units, n_workers)
    tasks, owner, shared = [], {}, {}
    for k, run in enumerate(runs):
        shared[f"job-{k}"] = run.job
        for start in range(0, len(run.units), per):
            units = tuple(run.units[start:start + per])
            key = f"{k}:{units[0][0]}:{units[0][1][0]}"
            tasks.append(executors.Task(key, evaluate_units, (str(dev), key, units), shared=f"job-{k}"))
            owner[key] = run
    stored_units: set = set()
    bar = tqdm(total=sum(len(cols) for run in runs for _, cols in run.units), unit="pt", disable=quiet,
               desc="surface", dynamic_ncols=True)

    def store_unit(item) -> None:
        key, unit, losses, accuracies = item
        if (key, unit) in stored_units:
            return
        stored_units.add((key, unit))
        run = owner[key]
        cells = _cells(unit)
        run.stored.losses[cells] = losses
        run.stored.accuracies[cells] = accuracies
        run.stored.done[cells] = True
        run.stored.save()
        bar.update(len(unit[1]))
        bar.set_postfix_str(run.run_dir.name, refresh=False)
        if on_task is not None:
            on_task(run.run_dir, unit)

    def store(outcome: executors.Outcome) -> None:
        run = owner[outcome.key]
        if not outcome.ok:
            what = (f"a surface worker process died ({outcome.cause})" if outcome.cause
                    else f"a surface task of {run.run_dir} failed ({outcome.error})")
            raise SurfaceError(f"{what}; every finished row is stored: run the same command again to compute only "
                               f"the missing points")
        for item in outcome.result:
            store_unit(item)

    try:
        executors.run_tasks(executor, tasks, workers=n_workers, threads=threads, on_done=store,
                            on_progress=store_unit, options=options, shared=shared,
                            gpus=1.0 if dev.type == "cuda" else 0.0)
    finally:
        bar.close()
        _BUILT.clear()   # the serial executor built the last job here
    return [r.stored for r in runs]


def expand_run_dirs(paths: Sequence[Path]) -> List[Path]:
    """Run directories as given; a study directory (no config.json, run directories inside) stands for its runs."""
    out = []
    for p in map(Path, paths):
        if has_config(p):
            out.append(p)
            continue
        inside = sorted(c for c in p.iterdir() if has_config(c)) if p.is_dir() else []
        if not inside:
            raise SurfaceError(f"{p} is neither a run directory (config.json) nor a study directory holding runs")
        out += inside
    return list(dict.fromkeys(out))
