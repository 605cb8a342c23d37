"""The executor interface and its registry: what sweeps (``launchers.launch``) and surfaces
(``surface.compute_surfaces``) hand their work to.

An executor runs a list of ``Task`` s, at most ``workers`` at a time with ``threads`` torch threads each, and reports
every task exactly once through ``on_done(Outcome)``: with the task's return value, or with a one-line failure (the
task raised, its worker died, its job was cancelled). Tasks may send progress (``progress.put(item)`` inside the
task, delivered to ``on_progress(item)`` in the caller's process). Ctrl-C and SIGTERM stop a launch: running tasks
are interrupted (KeyboardInterrupt inside them), given ``INTERRUPT_GRACE`` seconds to close, then killed, and
KeyboardInterrupt reaches the caller. Worker processes die with their parent.

Add an executor: a subclass of ``Executor`` in a module of its own, and ``register_executor(ItsClass())``
(docs/ARCHITECTURE.md). The CLI's ``--executor`` choices are the names in ``EXECUTORS``.
"""
from __future__ import annotations

import abc
import os
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, ClassVar, Dict, Mapping, Optional, Sequence, Tuple

from experiments.config import ConfigError

INTERRUPT_GRACE = 10.0       # seconds interrupted workers get to close their work before they are killed


@dataclass(frozen=True)
class Task:
    """One unit of work: ``fn(*args, progress=<sink or None>)`` in a worker, or ``fn(shared, *args, progress=...)``
    when ``shared`` names an entry of the ``shared`` mapping given to ``run`` (an object many tasks read, such as a
    surface's model and data: shipped to each worker once, not with every task). ``fn`` is a module-level function
    (workers receive it pickled, by name); ``progress`` has ``put(item)``, or is None where the executor cannot carry
    progress out of a running task (then it calls ``watch()`` in the caller's process instead, if given).
    ``again``: the arguments when the task is started again after being cut off (a SLURM job requeued at its time
    limit); default ``args``."""

    key: str
    fn: Callable[..., Any]
    args: Tuple = ()
    shared: Optional[str] = None
    again: Optional[Tuple] = None
    watch: Optional[Callable[[], Any]] = None


@dataclass(frozen=True)
class Outcome:
    """How a task ended: its return value (``failure`` empty), or ``failure``, one line (plus ``cause``, how its
    worker died, when it died)."""

    key: str
    result: Any = None
    failure: str = ""
    cause: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failure

    @property
    def error(self) -> str:
        return f"{self.failure} ({self.cause})" if self.cause else self.failure


@dataclass(frozen=True)
class ExecutorOptions:
    """Options that only some executors take (``Executor.takes`` names the fields an executor accepts)."""

    ray_address: Optional[str] = None   # --ray-address
    slurm: Any = None                   # --slurm-*: an ``executors.slurm.SlurmOptions``
    workdir: Optional[Path] = None      # where an executor may keep files of its own (slurm: <workdir>/.slurm)


FLAGS = {"ray_address": "--ray-address applies", "slurm": "the --slurm-* options apply"}   # for the messages


class Executor(abc.ABC):
    """Runs tasks; one instance per name in ``EXECUTORS``. Subclasses set ``name`` and implement ``run``, and, as
    needed, ``check`` (before anything is written), ``takes``, ``elsewhere`` and ``default_workers``."""

    name: ClassVar[str] = ""
    takes: ClassVar[Tuple[str, ...]] = ()    # the ExecutorOptions fields this executor uses

    def check(self, options: ExecutorOptions, devices: Sequence[str] = ()) -> None:
        """Raise ConfigError for what it needs but lacks (a package, a reachable cluster, valid options); called
        before anything is written. ``devices``: the torch devices the tasks will ask for."""

    def elsewhere(self, options: ExecutorOptions) -> bool:
        """Whether tasks run on other machines than this one (whose GPUs this machine cannot see)."""
        return False

    def default_workers(self, n_tasks: int, options: ExecutorOptions) -> int:
        """Tasks at once when ``--workers`` is not given: one per core."""
        return max(1, min(os.cpu_count() or 1, n_tasks))

    @abc.abstractmethod
    def run(self, tasks: Sequence[Task], *, workers: int, threads: int, options: ExecutorOptions,
            on_done: Callable[[Outcome], None], on_progress: Callable[[Any], None],
            shared: Mapping[str, Any], gpus: float) -> None:
        """Run every task; report each through ``on_done`` once. ``gpus``: the share of a GPU a task needs (for
        executors that place tasks by resources). Called through ``run_tasks``, which checks the books."""


EXECUTORS: Dict[str, Executor] = {}


def register_executor(executor: Executor) -> Executor:
    """Add an executor to the registry (and so to the CLI's --executor choices) under ``executor.name``."""
    if not executor.name or not isinstance(executor.name, str):
        raise ValueError(f"an executor needs a name, got {executor.name!r}")
    EXECUTORS[executor.name] = executor
    return executor


def get_executor(name: str) -> Executor:
    try:
        return EXECUTORS[name]
    except KeyError:
        raise ConfigError(f"unknown --executor {name!r}; choose one of: {', '.join(EXECUTORS)}") from None


def check_executor(name: str, options: ExecutorOptions = ExecutorOptions(), devices: Sequence[str] = (), *,
                   workers: Optional[int] = None, threads: Optional[int] = None) -> Executor:
    """Everything about the executor that can be checked before anything is written; returns it."""
    executor = get_executor(name)
    for field in fields(ExecutorOptions):
        if field.name in FLAGS and getattr(options, field.name) not in (None, ()) and field.name not in executor.takes:
            owners = [n for n, e in EXECUTORS.items() if field.name in e.takes]
            raise ConfigError(f"{FLAGS[field.name]} to --executor {' or '.join(owners)} only (got --executor {name})")
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers must be a positive integer, got {workers}")
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads must be a positive integer, got {threads}")
    executor.check(options, devices)
    return executor


def default_workers(name: str, n_tasks: int, options: ExecutorOptions = ExecutorOptions(), *,
                    one_gpu: bool = False) -> int:
    """Tasks at once when ``--workers`` is not given: the executor's rule, or 1 for tasks that would all share this
    machine's one GPU (``one_gpu``: a surface's rows on CUDA)."""
    executor = get_executor(name)
    if one_gpu and not executor.elsewhere(options):
        return 1
    return executor.default_workers(n_tasks, options)


@contextmanager
def sigterm_as_interrupt():
    """SIGTERM (``kill PID``, a scheduler's stop) takes the Ctrl-C path, so workers are stopped cleanly."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def run_tasks(name: str, tasks: Sequence[Task], *, workers: int, threads: int,
              on_done: Callable[[Outcome], None], on_progress: Optional[Callable[[Any], None]] = None,
              options: ExecutorOptions = ExecutorOptions(), shared: Optional[Mapping[str, Any]] = None,
              gpus: float = 0.0) -> None:
    """Run ``tasks`` on the executor ``name`` (checked before with ``check_executor``), SIGTERM taken as Ctrl-C.
    Every task is reported exactly once: a second report is an error, and a task the executor never reported is
    reported as failed, so that a broken executor cannot make a launch look complete."""
    executor = get_executor(name)
    keys = [t.key for t in tasks]
    if len(set(keys)) != len(keys):
        raise ValueError("task keys must be unique")
    reported: set = set()

    def done(outcome: Outcome) -> None:
        if outcome.key in reported:
            raise RuntimeError(f"task {outcome.key} was reported twice by the {name} executor")
        reported.add(outcome.key)
        on_done(outcome)

    with sigterm_as_interrupt():
        executor.run(tasks, workers=max(1, min(workers, len(tasks))), threads=threads, options=options,
                     on_done=done, on_progress=on_progress or (lambda item: None), shared=shared or {}, gpus=gpus)
    for key in keys:
        if key not in reported:
            done(Outcome(key, failure=f"the {name} executor lost track of this task (a bug in smoothness-lab: "
                                      f"please report it)"))


def prepare_worker(threads: int) -> None:
    """What a worker process does before its task: ``threads`` torch threads, and the CPU allocator tuned
    (``smoothness.allocator.tune_cpu_allocator``: freed memory kept in the process, no page faults per product)."""
    import torch

    from experiments.features.base import load_plugins
    from smoothness.allocator import tune_cpu_allocator
    torch.set_num_threads(threads)
    tune_cpu_allocator()
    load_plugins()   # features from outside the package (``$SMOOTHNESS_LAB_FEATURES``), as the CLI loaded them


@contextmanager
def torch_threads(n: int):
    """``n`` torch threads while a task runs in this process; the previous number afterwards."""
    import torch
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def failure_of(exc: BaseException) -> str:
    """An exception as the one-line failure of an Outcome."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
