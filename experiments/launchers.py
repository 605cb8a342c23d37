"""Fan a study's runs out on an executor of the registry (experiments.executors), with one progress display.

Every executor calls the same ``execute`` -> ``training.train_run``, so a run's records do not depend on the
executor. Threads and reproducibility: every run uses the same ``threads`` (``DEFAULT_THREADS`` = 1) whatever the
executor or the number of workers, since torch's CPU results depend on the thread count. Finished runs are skipped,
a failing run does not stop the others, and Ctrl-C or SIGTERM interrupts the runs so that a relaunch resumes them.

Details: docs/explanation/modules.md#launchers
"""
from __future__ import annotations

import functools
import logging
import os
import socket
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from tqdm.auto import tqdm

from experiments.config import EXECUTION_FIELDS, RunConfig
from experiments.executors import ExecutorOptions, Outcome, Task, check_executor, default_workers, run_tasks
from experiments.launch_result import RunOutcome

DEFAULT_THREADS = 1          # the same for every executor (docs/explanation/modules.md#threads-and-reproducibility)


def default_threads() -> int:
    """Torch threads per run: ``DEFAULT_THREADS`` whatever the executor and the number of workers, so that a run's
    records do not depend on how it was launched (module docstring)."""
    return DEFAULT_THREADS


# -- checks made before anything runs ------------------------------------------------------------------------
def preflight(runs: Sequence[RunConfig], root: Path, resume: bool = True) -> None:
    """Refuse to launch into ``root`` if a run directory there holds another config (or an unreadable one), or,
    without ``resume``, an interrupted run: nothing is written, every problem is named. Reads only."""
    from experiments.store import StoreError, config_path, has_progress, is_done, is_locked, read_config
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
    from experiments.store import StoreError, config_path, has_config, has_progress, is_done, is_locked, read_config
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


def executor_options(ray_address: Optional[str] = None, slurm=None, root: Optional[Path] = None) -> ExecutorOptions:
    """The executor-specific options of a launch (``slurm``: an ``executors.slurm.SlurmOptions``)."""
    return ExecutorOptions(ray_address=ray_address or None, slurm=slurm, workdir=None if root is None else Path(root))


def check_device(runs: Sequence[RunConfig], elsewhere: bool = False) -> None:
    """``--device cuda`` on a machine without CUDA fails here, before a results directory is touched, rather than
    in every run. Skipped when the runs execute ``elsewhere`` (on a cluster joined by address or through SLURM)."""
    if elsewhere:
        return
    from experiments.training import resolve_device
    for device in sorted({cfg.device for cfg in runs}):
        resolve_device(device)


def check_launch(runs: Sequence[RunConfig], root: Path, *, executor: str, ray_address: Optional[str] = None,
                 slurm=None, resume: bool = True, workers: Optional[int] = None,
                 threads: Optional[int] = None) -> None:
    """Every check a launch makes before anything is written: executor, device, directories (``preflight``)."""
    options = executor_options(ray_address, slurm, root)
    chosen = check_executor(executor, options, sorted({cfg.device for cfg in runs}), workers=workers,
                            threads=threads)
    check_device(runs, chosen.elsewhere(options))
    preflight(runs, root, resume)


# -- one run -------------------------------------------------------------------------------------------------
@contextmanager
def _run_log(run_dir: Path):
    """Route the ``experiments`` logger to ``run_dir/run.log`` (only there) while the run executes."""
    from experiments.store import run_log_handler
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
    from experiments.store import checkpoint_epochs, checkpoint_path
    epochs = checkpoint_epochs(run_dir)
    return (f"resuming from {checkpoint_path(run_dir, epochs[-1]).relative_to(run_dir)}" if epochs
            else "no checkpoint: from the start")


def execute(cfg_dict: dict, root: str, resume: bool, data_dir: Optional[str], threads: int,
            progress_queue=None) -> RunOutcome:
    """Run one config in this process (the body of every executor's task). Exceptions become a ``failed``
    result (traceback in run.log); KeyboardInterrupt is logged and re-raised."""
    import torch
    from experiments.store import RunState, RunStore, StoreError, event_fields, has_progress, last_event, run_lock
    torch.set_num_threads(threads)
    cfg = RunConfig.from_dict(cfg_dict)
    start = time.perf_counter()
    run_dir = Path(root) / cfg.run_id
    try:    # a directory holding another config is not touched at all, not even its run.log
        preflight([cfg], Path(root))
    except StoreError as exc:
        return RunOutcome(cfg.run_id, RunState.FAILED, error=f"StoreError: {exc}")
    if RunStore(Path(root), cfg).done:
        return RunOutcome(cfg.run_id, RunState.SKIPPED)

    def progress(run_id, done, total):
        if progress_queue is not None:
            progress_queue.put((run_id, done, total))

    with run_lock(run_dir) as mine:
        if not mine:
            pid, host, _ = event_fields(last_event(run_dir, ("start",))[1])
            by = f" (pid {pid} on {host})" if pid and host else ""
            return RunOutcome(cfg.run_id, RunState.BUSY,
                              error=f"another launch is training it right now{by}; it was left alone")
        if not resume and has_progress(run_dir):   # before run.log is written: it keeps saying what happened
            return RunOutcome(cfg.run_id, RunState.FAILED,
                              error=f"StoreError: {run_dir} holds an interrupted run of this config; pass --resume "
                                    f"to continue it from its last checkpoint (or move the directory away to start "
                                    f"over)")
        return _execute_locked(cfg, root, resume, data_dir, threads, progress, start)


def _execute_locked(cfg: RunConfig, root: str, resume: bool, data_dir: Optional[str], threads: int, progress,
                    start: float) -> RunOutcome:
    from experiments.store import RunState, last_record
    from experiments.training import train_run
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
            return RunOutcome(cfg.run_id, RunState.FAILED, time.perf_counter() - start,
                              error=f"{type(exc).__name__}: {exc}")
        detail = ""
        if outcome.status == RunState.DIVERGED:
            detail = f" ({last_record(run_dir).get('reason', 'loss not finite')})"
        log.info("finish %s: %s after %d steps in %.1f s%s", cfg.run_id, outcome.status, outcome.steps,
                 outcome.seconds, detail)
    return RunOutcome(cfg.run_id, outcome.status, time.perf_counter() - start, steps=outcome.steps,
                      path=outcome.path)


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

    def finish(self, result: RunOutcome, total_steps: int) -> None:
        """A finished, diverged or skipped run fills its share of the study bar; a failed or busy one does not,
        so the bar ends short of 100% when runs are missing. (Runs found finished before the launch are not on
        the display at all: ``launch`` says how many there are.)"""
        from experiments.store import RunState
        self.done_runs += 1
        if result.status in RunState.FINISHED + (RunState.SKIPPED,):
            self.overall.update(max(0, total_steps - self.steps.get(result.run_id, 0)))
            self.steps[result.run_id] = total_steps
        else:
            self.not_finished += 1
        bar = self.bars.pop(result.run_id, None)
        self.positions.pop(result.run_id, None)
        if bar is not None:
            bar.close()
        self._set_postfix()
        if result.status in (RunState.FAILED, RunState.DIVERGED, RunState.BUSY) and not self.quiet:
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


# -- the launcher ---------------------------------------------------------------------------------------------
def train_task(cfg_dict: dict, root: str, resume: bool, data_dir: Optional[str], threads: int,
               progress=None) -> RunOutcome:
    """One run as an executor's task (``executors.Task``): ``execute`` with the executor's progress channel."""
    return execute(cfg_dict, root, resume, data_dir, threads, progress_queue=progress)


def records_progress(run_dir: Path, total: int) -> Optional[Tuple[str, int, int]]:
    """A run's progress read from its records (for executors whose workers cannot send it: slurm), None before it
    starts: (run id, steps recorded so far, total)."""
    from experiments.store import last_record   # store imports torch; the launcher process need not until now
    record = last_record(run_dir)
    step = record.get("step") if isinstance(record, dict) else None
    if not isinstance(step, int):
        return None
    steps = step + 1 if record.get("kind") in ("step", "probe") else step
    return run_dir.name, min(steps, total), total


def gpu_share(runs: Sequence[RunConfig], workers: int) -> float:
    """Executors that place tasks by resources (Ray) hide GPUs from tasks that ask for none, so a run that would
    use CUDA under the other executors asks for a share of one (else its numbers would silently come from the
    CPU)."""
    if all(cfg.device == "cpu" for cfg in runs):
        return 0.0
    try:
        import torch
        n = torch.cuda.device_count()
    except Exception:  # pragma: no cover
        n = 0
    return min(1.0, n / workers) if n else 0.0


def run_result(outcome: Outcome, root: Path) -> RunOutcome:
    """The RunOutcome of a run's task: what ``execute`` returned, or, when its worker gave none, ``failed`` (or
    what its directory says when it finished before its worker died)."""
    from experiments.store import RunState, finished_state
    if outcome.ok:
        return outcome.result
    on_disk = finished_state(Path(root) / outcome.key)
    if on_disk is not None:   # killed between its `done` marker and its result: the run is complete
        cause = f" ({outcome.cause})" if outcome.cause else ""
        return RunOutcome(outcome.key, on_disk, outcome.seconds,
                          error=f"{outcome.failure} after the run finished{cause}")
    return RunOutcome(outcome.key, RunState.FAILED, outcome.seconds,
                      error=f"{outcome.error}; relaunch to resume the run from its last checkpoint")


def launch(runs: Sequence[RunConfig], root: Path, *, executor: str = "serial", workers: Optional[int] = None,
           threads: Optional[int] = None, resume: bool = False, data_dir: Optional[str] = None,
           ray_address: Optional[str] = None, slurm=None, quiet: bool = False,
           steps_per_run: Optional[Dict[str, int]] = None) -> List[RunOutcome]:
    """Run every config under ``root``, in the order given, on the executor of that name (``experiments.executors``);
    finished runs are skipped, failures are reported in the results, not raised: every run given gets exactly one
    result. Raises ConfigError / StoreError before anything runs, KeyboardInterrupt on Ctrl-C or SIGTERM (after
    stopping the runs). ``slurm``: an ``experiments.executors.slurm.SlurmOptions`` for ``executor="slurm"``."""
    unique: Dict[str, RunConfig] = {}
    for cfg in runs:                 # convnet and convnet:none are one run: never train a directory twice at once
        unique.setdefault(cfg.run_id, cfg)
    runs = list(unique.values())
    check_launch(runs, root, executor=executor, ray_address=ray_address, slurm=slurm, resume=resume,
                 workers=workers, threads=threads)
    options = executor_options(ray_address, slurm, root)
    workers = workers or default_workers(executor, len(runs), options)
    threads = threads or default_threads()
    steps_per_run = steps_per_run or {}
    totals = {cfg.run_id: steps_per_run.get(cfg.run_id, 1) for cfg in runs}
    from experiments.store import RunState, RunStore
    skipped = {cfg.run_id for cfg in runs if RunStore(root, cfg).done}
    todo = [cfg for cfg in runs if cfg.run_id not in skipped]
    results: Dict[str, RunOutcome] = {r: RunOutcome(r, RunState.SKIPPED) for r in skipped}
    if not todo:   # no bar: skipped runs filled in at once read as millions of steps per second
        if not quiet:
            tqdm.write(f"all {len(runs)} runs already finished; nothing to do" if len(runs) > 1
                       else "the run is already finished; nothing to do")
        return [results[cfg.run_id] for cfg in runs]
    if skipped and not quiet:
        tqdm.write(f"{len(skipped)} of {len(runs)} runs already finished; running the other {len(todo)}")
    display = ProgressDisplay(todo, totals, quiet)   # the bar counts only the steps to run, so its rate is true

    def finished(outcome: Outcome) -> None:
        result = run_result(outcome, root)
        results[result.run_id] = result
        display.finish(result, totals[result.run_id])

    tasks = [Task(cfg.run_id, train_task, (cfg.to_dict(), str(root), resume, data_dir, threads),
                  again=(cfg.to_dict(), str(root), True, data_dir, threads),
                  watch=functools.partial(records_progress, Path(root) / cfg.run_id, totals[cfg.run_id]))
             for cfg in todo]
    try:
        run_tasks(executor, tasks, workers=workers, threads=threads, on_done=finished,
                  on_progress=lambda item: display.update(*item), options=options,
                  gpus=gpu_share(todo, workers))
    finally:
        display.close()
    return [results[cfg.run_id] for cfg in runs]
