"""Fan a study's runs out: serially, on a pool of worker processes, or on a Ray cluster, with one progress display.

Every executor calls the same ``execute`` -> ``training.train_run`` with the same config, so a run's records do not
depend on the executor (the tests compare them byte for byte after parsing).

Threads and reproducibility
---------------------------
torch's CPU kernels split their reductions by the number of intra-op threads, so one config trained with 1 and with
2 threads gives records that differ in the last bits (measured on a synthetic bn-convnet run: the second record
already differs). A run id names a config, and a relaunched sweep mixes runs made by different executors, so the
thread count must not follow from the executor, the number of workers or the core count. Every executor therefore
runs every run with the same ``threads``, by default ``DEFAULT_THREADS`` = 1, whatever the executor; the cores are
used by running several runs at once (``--workers``), which for these small models is also the fastest way (on 2
busy cores a run with 2 threads took 114 s against 17 s with 1). ``--threads N`` is passed to every executor alike;
runs made with different thread counts agree only to rounding, so keep it fixed within a study. On CUDA the thread
count does not enter the numbers.

Executors
---------
``serial``   runs one after another in this process. Ctrl-C stops the current run with its records readable (every
             record is flushed when written) and raises KeyboardInterrupt.
``process``  every run in a process of its own, at most ``workers`` at once. The processes are forked from
             multiprocessing's fork server, which imports torch and the training code once and never runs a torch
             operation (so, like spawned processes, they inherit no thread pool; where there is no fork server they
             are spawned). A run's process sends progress and then its result over a pipe of its own; a run leaves
             the launcher's books only with a result, or, when its process ended without one (killed, out of
             memory), as ``failed``. There is no process reuse, so no run can be handed to a dead process, and a
             death at any moment fails exactly that run while the others go on (module ``_launch_processes``).
``ray``      one Ray task per run (``num_cpus=threads``; a GPU share when runs would use CUDA), on a local cluster
             of ``workers x threads`` CPUs started here, or on the cluster at ``ray_address`` (whose nodes must see
             the results directory and have this package installed). Tasks are not retried.
``slurm``    one SLURM job per run through submitit, or submitit's local executor for a try on this machine
             (``experiments.slurm``). Jobs cut off by their time limit or preempted resume from their last
             checkpoint in a requeued job.

For every executor: runs already finished (``done``) are skipped without touching their directory; a run directory
holding a different config stops the launch before anything runs (``preflight``); an exception in one run is logged
with its traceback to that run's ``run.log``, reported as ``failed``, and does not stop the others; a run that
another launch is training right now is left alone and reported ``busy``; a run that was interrupted before is only
continued with ``resume`` (else the launch is refused before anything runs). SIGTERM is treated like Ctrl-C: running runs are interrupted (their records stay readable; relaunching resumes them from
their last checkpoint), queued runs are not started, and KeyboardInterrupt is raised to the caller.

Each run's ``run.log`` gets ``start`` (pid, host, threads, resume point, SLURM job) and ``finish`` / ``failed`` /
``interrupted`` lines, and is locked (``store.run_lock``) while a process trains the run; ``experiments.status``
reads both.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import signal
import socket
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import multiprocessing as mp
from multiprocessing.connection import wait as mp_wait

from tqdm.auto import tqdm

from .config import EXECUTION_FIELDS, ConfigError, RunConfig
from .launch_result import INTERRUPT_GRACE, LaunchResult

EXECUTORS = ("serial", "process", "ray", "slurm")
DEFAULT_THREADS = 1          # the same for every executor: see the module docstring


def default_workers(executor: str, n_runs: int, slurm=None) -> int:
    """Runs at once: 1 serially; every run on a SLURM cluster (its scheduler queues them); else one per core."""
    if executor == "serial":
        return 1
    if executor == "slurm" and (slurm is None or slurm.cluster == "slurm"):
        return max(1, n_runs)
    return max(1, min(os.cpu_count() or 1, n_runs))


def default_threads() -> int:
    """Torch threads per run: ``DEFAULT_THREADS`` whatever the executor and the number of workers, so that a run's
    records do not depend on how it was launched (module docstring)."""
    return DEFAULT_THREADS


# -- checks made before anything runs ------------------------------------------------------------------------
def preflight(runs: Sequence[RunConfig], root: Path, resume: bool = True) -> None:
    """Refuse to launch into ``root`` if a run directory there holds another config (or an unreadable one), or,
    without ``resume``, an interrupted run: nothing is written, every problem is named. Reads only."""
    from .store import StoreError, config_path, has_progress, is_done, is_locked, read_config
    problems, interrupted = [], []
    for cfg in runs:
        run_dir = Path(root) / cfg.run_id
        path = config_path(run_dir)
        if path.exists():
            try:
                theirs = read_config(path)
            except StoreError as exc:  # unreadable, or options that do not give the hash it claims
                problems.append(f"{path.parent} holds a different config or an unreadable one ({exc})")
                continue
            if theirs.config_hash != cfg.config_hash:
                problems.append(f"{path.parent} holds a different config (hash {theirs.config_hash!r}, "
                                f"expected {cfg.config_hash!r})")
                continue
        if not resume and not is_done(run_dir) and has_progress(run_dir) and not is_locked(run_dir):
            interrupted.append(run_dir.name)
    if problems:
        raise StoreError("refusing to launch, nothing was written: " + "; ".join(problems)
                         + ". Move those directories away, or use another --results-dir or study name")
    if interrupted:
        raise StoreError(f"refusing to launch, nothing was written: {len(interrupted)} run(s) in {root} were "
                         f"interrupted before ({', '.join(interrupted)}); pass --resume to continue them from their "
                         f"last checkpoint (or move them away to start over)")


def left_behind(runs: Sequence[RunConfig], root: Path) -> List[Tuple[Path, RunConfig, RunConfig, List[str]]]:
    """Unfinished runs in ``root`` that this launch will not continue because some option changed: a run id names
    its config, so a rerun with another ``--epochs`` is a new run from scratch, and the interrupted one stays as it
    was. For every unfinished run directory with progress, not among ``runs`` and not running now, whose model,
    norm and seed are those of a run of the launch: (that directory, its config, the launched config with the
    fewest differences, the fields that differ). Reads only; an unreadable config.json is left to ``status``."""
    from .store import StoreError, config_path, has_config, has_progress, is_done, is_locked, read_config
    root, launched = Path(root), {cfg.run_id for cfg in runs}
    out = []
    for run_dir in sorted(root.iterdir()) if root.is_dir() else ():
        if (run_dir.name in launched or not has_config(run_dir) or is_done(run_dir)
                or not has_progress(run_dir) or is_locked(run_dir)):
            continue
        try:
            old = read_config(config_path(run_dir))
        except StoreError:
            continue

        def differing(cfg: RunConfig) -> List[str]:
            new, was = cfg.to_dict(), old.to_dict()
            return [k for k in new if k not in EXECUTION_FIELDS and new[k] != was[k]]

        same = [cfg for cfg in runs if (cfg.model, cfg.norm, cfg.seed) == (old.model, old.norm, old.seed)]
        if same:
            closest = min(same, key=lambda cfg: len(differing(cfg)))
            out.append((run_dir, old, closest, differing(closest)))
    return out


def check_ray_address(address: str, timeout: float = 5.0) -> None:
    """Fail fast (within ``timeout`` s) when nothing listens at a Ray cluster address; ``auto`` is left to Ray."""
    if address == "auto":
        return
    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            pass
    except ValueError:
        raise ConfigError(f"--ray-address {address!r} is not HOST:PORT (nor ray://HOST:PORT or auto)") from None
    except OSError as exc:
        raise ConfigError(f"the Ray cluster at --ray-address {address} does not answer ({exc.strerror or exc}); "
                          f"start it with `ray start --head` or leave --ray-address out to start a local "
                          f"cluster") from None


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("--executor ray needs Ray: pip install 'smoothness-lab[ray]' "
                          "(or pip install 'ray[default]')") from None
    return ray


def check_executor(executor: str, ray_address: Optional[str] = None, slurm=None) -> None:
    """Everything about the executor that can be checked before a results directory is touched."""
    if executor not in EXECUTORS:
        raise ConfigError(f"unknown --executor {executor!r}; choose one of: {', '.join(EXECUTORS)}")
    if ray_address and executor != "ray":
        raise ConfigError(f"--ray-address applies to --executor ray only (got --executor {executor})")
    if slurm is not None and executor != "slurm":
        raise ConfigError(f"the --slurm-* options apply to --executor slurm only (got --executor {executor})")
    if executor == "ray":
        _import_ray()
        if ray_address:
            check_ray_address(ray_address)
    if executor == "slurm":
        from .slurm import SlurmOptions, check_slurm
        check_slurm(slurm or SlurmOptions())


def runs_elsewhere(executor: str, ray_address: Optional[str] = None, slurm=None) -> bool:
    """Whether the runs execute on other machines than this one (a Ray cluster joined by address, a SLURM
    cluster), whose GPUs this machine cannot see."""
    return (executor == "ray" and bool(ray_address)) or (executor == "slurm" and (slurm is None
                                                                                or slurm.cluster == "slurm"))


def check_device(runs: Sequence[RunConfig], elsewhere: bool = False) -> None:
    """``--device cuda`` on a machine without CUDA fails here, before a results directory is touched, rather than
    in every run. Skipped when the runs execute ``elsewhere`` (``runs_elsewhere``)."""
    if elsewhere:
        return
    from .training import resolve_device
    for device in sorted({cfg.device for cfg in runs}):
        resolve_device(device)


def check_launch(runs: Sequence[RunConfig], root: Path, *, executor: str, ray_address: Optional[str] = None,
                 slurm=None, resume: bool = True) -> None:
    """Every check a launch makes before anything is written: executor, device, directories (``preflight``)."""
    check_executor(executor, ray_address, slurm)
    if executor == "slurm":
        from .slurm import SlurmOptions, check_runs
        check_runs(runs, slurm or SlurmOptions())
    check_device(runs, runs_elsewhere(executor, ray_address, slurm))
    preflight(runs, root, resume)


# -- one run -------------------------------------------------------------------------------------------------
@contextmanager
def _run_log(run_dir: Path):
    """Route the ``experiments`` logger to ``run_dir/run.log`` (only there) while the run executes."""
    from .store import run_log_handler
    handler = run_log_handler(run_dir)
    logger = logging.getLogger("experiments")
    old_level, old_propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield logger
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        logger.propagate = old_propagate
        handler.close()


def _resume_point(run_dir: Path) -> str:
    from .store import checkpoint_epochs, checkpoint_path
    epochs = checkpoint_epochs(run_dir)
    return (f"resuming from {checkpoint_path(run_dir, epochs[-1]).relative_to(run_dir)}" if epochs
            else "no checkpoint: from the start")


def execute(cfg_dict: dict, root: str, resume: bool, data_dir: Optional[str], threads: int,
            progress_queue=None) -> LaunchResult:
    """Run one config in this process (the body of every executor's task). Exceptions become a ``failed``
    result (traceback in run.log); KeyboardInterrupt is logged and re-raised."""
    import torch
    from .store import RunStore, StoreError, event_fields, has_progress, last_event, run_lock
    torch.set_num_threads(threads)
    cfg = RunConfig.from_dict(cfg_dict)
    start = time.perf_counter()
    run_dir = Path(root) / cfg.run_id
    try:    # a directory holding another config is not touched at all, not even its run.log
        preflight([cfg], Path(root))
    except StoreError as exc:
        return LaunchResult(cfg.run_id, "failed", 0.0, f"StoreError: {exc}")
    if RunStore(Path(root), cfg).done:
        return LaunchResult(cfg.run_id, "skipped", 0.0)

    def progress(run_id, done, total):
        if progress_queue is not None:
            progress_queue.put((run_id, done, total))

    with run_lock(run_dir) as mine:
        if not mine:
            pid, host, _ = event_fields(last_event(run_dir, ("start",))[1])
            by = f" (pid {pid} on {host})" if pid and host else ""
            return LaunchResult(cfg.run_id, "busy", 0.0, f"another launch is training it right now{by}; it was "
                                f"left alone")
        if not resume and has_progress(run_dir):   # before run.log is written: it keeps saying what happened
            return LaunchResult(cfg.run_id, "failed", 0.0, f"StoreError: {run_dir} holds an interrupted run of this "
                                f"config; pass --resume to continue it from its last checkpoint (or move the "
                                f"directory away to start over)")
        return _execute_locked(cfg, root, resume, data_dir, threads, progress, start)


def _execute_locked(cfg: RunConfig, root: str, resume: bool, data_dir: Optional[str], threads: int, progress,
                    start: float) -> LaunchResult:
    from .store import last_record
    from .training import train_run
    run_dir = Path(root) / cfg.run_id
    with _run_log(run_dir) as log:
        job = os.environ.get("SLURM_JOB_ID")
        log.info("start %s pid=%d host=%s threads=%d device=%s resume=%s%s%s", cfg.run_id, os.getpid(),
                 socket.gethostname(), threads, cfg.device, resume, f" slurm_job={job}" if job else "",
                 f", {_resume_point(run_dir)}" if resume else "")
        try:
            outcome = train_run(cfg, Path(root), resume=resume, data_dir=data_dir, progress=progress)
        except (KeyboardInterrupt, SystemExit):   # Ctrl-C, SIGTERM; SystemExit: submitit requeues a SLURM job
            log.warning("interrupted after %.1f s; relaunch the sweep (or pass --resume) to continue from the last "
                        "checkpoint", time.perf_counter() - start)
            raise
        except Exception as exc:  # one broken run must not stop a sweep; its log keeps the traceback
            log.error("failed: %s: %s\n%s", type(exc).__name__, exc, traceback.format_exc().rstrip())
            return LaunchResult(cfg.run_id, "failed", time.perf_counter() - start, f"{type(exc).__name__}: {exc}")
        detail = ""
        if outcome.status == "diverged":
            detail = f" ({last_record(run_dir).get('reason', 'loss not finite')})"
        log.info("finish %s: %s after %d steps in %.1f s%s", cfg.run_id, outcome.status, outcome.steps,
                 outcome.seconds, detail)
    return LaunchResult(cfg.run_id, outcome.status, time.perf_counter() - start)


# -- progress ------------------------------------------------------------------------------------------------
class ProgressDisplay:
    """One bar for the whole study (SGD steps over all runs, with ETA) and one per active run."""

    def __init__(self, runs: Sequence[RunConfig], steps_per_run: Dict[str, int], quiet: bool):
        self.quiet = quiet
        self.total_runs = len(runs)
        self.done_runs = 0
        self.not_finished = 0
        self.steps: Dict[str, int] = {}
        self.bars: Dict[str, tqdm] = {}
        self.positions: Dict[str, int] = {}
        self.overall = tqdm(total=sum(steps_per_run[cfg.run_id] for cfg in runs), desc="study", unit="step", disable=quiet,
                            dynamic_ncols=True, position=0)
        self._set_postfix()

    def _set_postfix(self):
        missing = f", {self.not_finished} not finished" if self.not_finished else ""
        self.overall.set_postfix_str(f"runs {self.done_runs}/{self.total_runs}{missing}")

    def update(self, run_id: str, done: int, total: int) -> None:
        if run_id not in self.bars:
            used = set(self.positions.values())
            position = next(i for i in range(1, len(used) + 2) if i not in used)
            self.positions[run_id] = position
            self.bars[run_id] = tqdm(total=total, desc=run_id, unit="step", disable=self.quiet, leave=False,
                                     dynamic_ncols=True, position=position)
            self.steps.setdefault(run_id, 0)
        delta = done - self.steps.get(run_id, 0)
        self.steps[run_id] = done
        self.bars[run_id].update(delta)
        self.overall.update(delta)

    def finish(self, result: LaunchResult, total_steps: int) -> None:
        """A finished, diverged or skipped run fills its share of the study bar; a failed or busy one does not,
        so the bar ends short of 100% when runs are missing. (Runs found finished before the launch are not on
        the display at all: ``launch`` says how many there are.)"""
        self.done_runs += 1
        if result.status in ("done", "diverged", "skipped"):
            self.overall.update(max(0, total_steps - self.steps.get(result.run_id, 0)))
            self.steps[result.run_id] = total_steps
        else:
            self.not_finished += 1
        bar = self.bars.pop(result.run_id, None)
        self.positions.pop(result.run_id, None)
        if bar is not None:
            bar.close()
        self._set_postfix()
        if result.status in ("failed", "diverged", "busy") and not self.quiet:
            tqdm.write(f"{result.run_id}: {result.status} {result.error}".rstrip())

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.overall.close()


class DirectQueue:
    """Progress from a run in this process straight to the display (the serial executor, ``train``)."""

    def __init__(self, display: ProgressDisplay):
        self.display = display

    def put(self, item) -> None:
        self.display.update(*item)


# -- the launcher --------------------------------------------------------------------------------------------
@contextmanager
def _sigterm_as_interrupt():
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


def launch(runs: Sequence[RunConfig], root: Path, *, executor: str = "serial", workers: Optional[int] = None,
           threads: Optional[int] = None, resume: bool = False, data_dir: Optional[str] = None,
           ray_address: Optional[str] = None, slurm=None, quiet: bool = False,
           steps_per_run: Optional[Dict[str, int]] = None) -> List[LaunchResult]:
    """Run every config under ``root``, in the order given; finished runs are skipped, failures are reported in
    the results, not raised: every run given gets exactly one result. Raises ConfigError / StoreError before
    anything runs, KeyboardInterrupt on Ctrl-C or SIGTERM (after stopping the runs). ``slurm``: an
    ``experiments.slurm.SlurmOptions`` for ``executor="slurm"``."""
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers must be a positive integer, got {workers}")
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads must be a positive integer, got {threads}")
    unique: Dict[str, RunConfig] = {}
    for cfg in runs:                 # convnet and convnet:none are one run: never train a directory twice at once
        unique.setdefault(cfg.run_id, cfg)
    runs = list(unique.values())
    check_launch(runs, root, executor=executor, ray_address=ray_address, slurm=slurm, resume=resume)
    workers = workers or default_workers(executor, len(runs), slurm)
    threads = threads or default_threads()
    steps_per_run = steps_per_run or {}
    totals = {cfg.run_id: steps_per_run.get(cfg.run_id, 1) for cfg in runs}
    from .store import RunStore
    skipped = {cfg.run_id for cfg in runs if RunStore(root, cfg).done}
    todo = [cfg for cfg in runs if cfg.run_id not in skipped]
    results: Dict[str, LaunchResult] = {r: LaunchResult(r, "skipped", 0.0) for r in skipped}
    if not todo:   # no bar: skipped runs filled in at once read as millions of steps per second
        if not quiet:
            tqdm.write(f"all {len(runs)} runs already finished; nothing to do" if len(runs) > 1
                       else "the run is already finished; nothing to do")
        return [results[cfg.run_id] for cfg in runs]
    if skipped and not quiet:
        tqdm.write(f"{len(skipped)} of {len(runs)} runs already finished; running the other {len(todo)}")
    display = ProgressDisplay(todo, totals, quiet)   # the bar counts only the steps to run, so its rate is true

    def finished(result: LaunchResult) -> None:
        if result.run_id in results:   # an executor must report a run once; a second report is a bug
            raise RuntimeError(f"run {result.run_id} was reported twice ({results[result.run_id].status}, "
                               f"{result.status})")
        results[result.run_id] = result
        display.finish(result, totals[result.run_id])

    args = [(cfg.to_dict(), str(root), resume, data_dir, threads) for cfg in todo]
    try:
        with _sigterm_as_interrupt():
            if executor == "serial":
                for a in args:
                    finished(execute(*a, progress_queue=DirectQueue(display)))
            elif executor == "process":
                _launch_processes(args, display, finished, min(workers, len(todo)))
            elif executor == "ray":
                _launch_ray(args, todo, display, finished, workers, threads, ray_address)
            else:
                from .slurm import SlurmOptions, launch_slurm
                launch_slurm(args, display, finished, workers, threads, slurm or SlurmOptions(), Path(root),
                             totals, execute)
        for cfg in todo:    # the invariant every executor keeps; checked so that a broken one cannot exit 0
            if cfg.run_id not in results:
                finished(LaunchResult(cfg.run_id, "failed", 0.0, f"the {executor} executor lost track of this run "
                                      f"(a bug in smoothness-lab: please report it); relaunch to resume it"))
    finally:
        display.close()
    return [results[cfg.run_id] for cfg in runs]


# -- process executor ----------------------------------------------------------------------------------------
class _PipeQueue:
    def __init__(self, conn):
        self.conn = conn

    def put(self, item) -> None:
        try:
            self.conn.send(("progress", item))
        except (OSError, EOFError):     # the launcher is gone (killed): stop, as on Ctrl-C
            raise KeyboardInterrupt from None


def _process_context():
    """Run processes fork from multiprocessing's fork server, which imports torch and the training code once and
    never runs a torch operation: starting a run costs about 0.1 s instead of a fresh interpreter's torch import
    (6-12 s on a busy 2-core machine), and, like spawn, no process inherits threads (plain fork after torch has
    started threads can deadlock). Spawn where there is no fork server (Windows)."""
    if "forkserver" not in mp.get_all_start_methods():   # pragma: no cover - Windows
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["experiments.training"])   # no effect once the server runs: then it has them
    return ctx


def _run_process_main(conn, task_fn, task: tuple) -> None:
    """The body of one run's process: run the task, send its result, exit. Ctrl-C (SIGINT from the launcher or
    the terminal) ends it quietly: run.log says "interrupted"."""
    try:
        result = task_fn(*task, progress_queue=_PipeQueue(conn))
    except KeyboardInterrupt:
        return
    except Exception as exc:   # outside train_run (execute catches its errors): still one result per run
        traceback.print_exc()
        result = LaunchResult(RunConfig.from_dict(task[0]).run_id, "failed", 0.0, f"{type(exc).__name__}: {exc}")
    try:
        conn.send(("result", result))
    except (OSError, EOFError):
        pass   # the launcher is gone


class _RunProcess:
    """One run in a process of its own, with the read end of its pipe."""

    def __init__(self, ctx, run_id: str, task: tuple, task_fn):
        self.run_id, self.root = run_id, Path(task[1])
        self.conn, child = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=_run_process_main, args=(child, task_fn, task), daemon=True,
                                name=f"smoothness-lab {run_id}")
        self.started = time.perf_counter()
        self.result: Optional[LaunchResult] = None
        self.proc.start()
        child.close()

    def drain(self, display) -> None:
        """Read everything the process has sent so far (progress, then at most one result)."""
        try:
            while self.result is None and self.conn.poll():
                kind, payload = self.conn.recv()
                if kind == "progress":
                    display.update(*payload)
                else:
                    self.result = payload
        except (EOFError, OSError):
            pass   # the process ended, possibly in the middle of a message: what it sent before stands

    def died(self) -> LaunchResult:
        """The result of a run whose process ended without sending one."""
        seconds = time.perf_counter() - self.started
        on_disk = _finished_on_disk(self.root / self.run_id)
        if on_disk is not None:   # killed between its `done` marker and its result: the run is complete
            return LaunchResult(self.run_id, on_disk, seconds, f"its process died after the run finished "
                                f"({_death(self.proc)})")
        return LaunchResult(self.run_id, "failed", seconds, f"its process died ({_death(self.proc)}); relaunch "
                            f"to resume the run from its last checkpoint")


def _finished_on_disk(run_dir: Path) -> Optional[str]:
    from .store import is_done, last_record
    if not is_done(run_dir):
        return None
    return "diverged" if last_record(run_dir).get("kind") == "diverged" else "done"


def _death(proc) -> str:
    code = proc.exitcode
    if code is not None and code < 0:
        try:
            how = f"killed by {signal.Signals(-code).name}"
        except ValueError:
            how = f"killed by signal {-code}"
        if code == -signal.SIGKILL:
            how += ": out of memory?"
    else:
        how = f"exit code {code}: see the messages above"
    return how


def _launch_processes(args, display, finished, workers: int) -> None:
    """At most ``workers`` run processes at a time. The books: a run is in ``running`` from its start until it is
    reported through ``finished``, with its result, or as failed once its process has ended without one (checked
    for every running process at every turn, whatever woke the wait). Processes that sent their result are
    reaped in ``closing``."""
    ctx = _process_context()
    queue = collections.deque((RunConfig.from_dict(a[0]).run_id, a) for a in args)
    running: List[_RunProcess] = []
    closing: List[_RunProcess] = []
    try:
        while queue or running:
            while queue and len(running) < workers:
                running.append(_RunProcess(ctx, *queue.popleft(), execute))
            mp_wait([r.conn for r in running] + [r.proc.sentinel for r in running], timeout=1.0)
            for r in list(running):
                r.drain(display)
                if r.result is None and not r.proc.is_alive():
                    r.proc.join()
                    r.drain(display)   # what it sent between the first look and its end
                    if r.result is None:
                        r.result = r.died()
                if r.result is not None:
                    running.remove(r)
                    closing.append(r)
                    finished(r.result)
            closing = [r for r in closing if _reaped(r, wait=0.0) is False]
    except BaseException:
        _stop_processes(running + closing)
        raise
    for r in closing:
        _reaped(r, wait=INTERRUPT_GRACE)


def _reaped(r: _RunProcess, wait: float) -> bool:
    """Join a process that has sent its result (killing it if it lingers past ``wait`` > 0); whether it is gone."""
    r.proc.join(timeout=wait)
    if r.proc.is_alive():
        if not wait:
            return False
        r.proc.kill()
        r.proc.join()
    r.conn.close()
    return True


def _stop_processes(procs: List[_RunProcess]) -> None:
    """Ctrl-C / SIGTERM / an error in the launcher: interrupt running runs (their run.log says so), then make
    sure no run process outlives the launch."""
    deadline = time.monotonic() + 2.0      # processes hit by the terminal's Ctrl-C are already on their way out
    for r in procs:
        r.proc.join(timeout=max(0.0, deadline - time.monotonic()))
    for r in procs:
        if r.proc.is_alive():
            try:
                os.kill(r.proc.pid, signal.SIGINT)
            except OSError:
                pass
    deadline = time.monotonic() + INTERRUPT_GRACE
    for r in procs:
        r.proc.join(timeout=max(0.0, deadline - time.monotonic()))
        if r.proc.is_alive():
            r.proc.kill()
            r.proc.join()
        r.conn.close()


# -- Ray executor --------------------------------------------------------------------------------------------
def _gpu_share(runs: Sequence[RunConfig], workers: int) -> float:
    """Ray hides GPUs from tasks that ask for none, so a run that would use CUDA under the other executors asks
    for a share of one (else its numbers would silently come from the CPU)."""
    if all(cfg.device == "cpu" for cfg in runs):
        return 0.0
    try:
        import torch
        n = torch.cuda.device_count()
    except Exception:  # pragma: no cover
        n = 0
    return min(1.0, n / workers) if n else 0.0


def _launch_ray(args, runs, display, finished, workers, threads, address) -> None:
    ray = _import_ray()
    from ray.util.queue import Queue as RayQueue
    started_here = not ray.is_initialized()
    if started_here:
        options = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
        try:
            if address:
                ray.init(address=address, **options)
            else:
                ray.init(num_cpus=workers * threads, **options)
        except Exception as exc:
            where = f"the Ray cluster at --ray-address {address}" if address else "a local Ray cluster"
            raise ConfigError(f"could not start or join {where}: {type(exc).__name__}: {exc}") from None
    refs: dict = {}
    try:
        q = RayQueue(actor_options={"num_cpus": 0})
        remote = ray.remote(execute).options(num_cpus=threads, num_gpus=_gpu_share(runs, workers), max_retries=0)
        starts = {}
        for a, cfg in zip(args, runs):
            refs[remote.remote(*a, q)] = cfg.run_id
            starts[cfg.run_id] = time.perf_counter()
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=0.2)
            while not q.empty():
                display.update(*q.get())
            for ref in ready:
                run_id = refs.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayError as exc:   # the task's worker died, or it was cancelled
                    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                    result = LaunchResult(run_id, "failed", time.perf_counter() - starts[run_id],
                                          f"{type(exc).__name__}: {message}")
                finished(result)
    except BaseException:
        for ref in refs:
            try:
                ray.cancel(ref)   # KeyboardInterrupt inside the task: run.log says "interrupted"
            except Exception:
                pass
        if refs:
            ray.wait(list(refs), num_returns=len(refs), timeout=INTERRUPT_GRACE)
        raise
    finally:
        if started_here:
            ray.shutdown()
