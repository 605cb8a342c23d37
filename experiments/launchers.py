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
``process``  ``workers`` spawned worker processes, each reused for many runs (torch is imported once per worker).
             Each worker is handed one run at a time, so when a worker dies (out of memory, killed) exactly that run
             is reported as failed and a fresh worker takes the next one; the other runs go on.
``ray``      one Ray task per run (``num_cpus=threads``; a GPU share when runs would use CUDA), on a local cluster
             of ``workers x threads`` CPUs started here, or on the cluster at ``ray_address`` (whose nodes must see
             the results directory and have this package installed). Tasks are not retried.

For every executor: runs already finished (``done``) are skipped without touching their directory; a run directory
holding a different config stops the launch before anything runs (``preflight``); an exception in one run is logged
with its traceback to that run's ``run.log``, reported as ``failed``, and does not stop the others. SIGTERM is
treated like Ctrl-C: running runs are interrupted (their records stay readable; relaunching resumes them from
their last checkpoint), queued runs are not started, and KeyboardInterrupt is raised to the caller.

Each run's ``run.log`` gets ``start`` (pid, host, threads, resume point) and ``finish`` / ``failed`` /
``interrupted`` lines; ``experiments.status`` reads them.
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
from typing import Dict, List, Optional, Sequence

import multiprocessing as mp
from multiprocessing.connection import wait as mp_wait

from tqdm.auto import tqdm

from .config import ConfigError, RunConfig

EXECUTORS = ("serial", "process", "ray")
DEFAULT_THREADS = 1          # the same for every executor: see the module docstring
INTERRUPT_GRACE = 10.0       # seconds interrupted workers get to close their runs before they are killed


@dataclass(frozen=True)
class LaunchResult:
    run_id: str
    status: str        # done, diverged, skipped, failed
    seconds: float
    error: str = ""


def default_workers(executor: str, n_runs: int) -> int:
    return 1 if executor == "serial" else max(1, min(os.cpu_count() or 1, n_runs))


def default_threads() -> int:
    """Torch threads per run: ``DEFAULT_THREADS`` whatever the executor and the number of workers, so that a run's
    records do not depend on how it was launched (module docstring)."""
    return DEFAULT_THREADS


# -- checks made before anything runs ------------------------------------------------------------------------
def preflight(runs: Sequence[RunConfig], root: Path) -> None:
    """Refuse to launch into ``root`` if a run directory there holds another config (or an unreadable one):
    nothing is written, every conflict is named. Reads only."""
    from .store import StoreError
    problems = []
    for cfg in runs:
        path = Path(root) / cfg.run_id / "config.json"
        if not path.exists():
            continue
        try:
            theirs = json.loads(path.read_text())
            if not isinstance(theirs, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            problems.append(f"{path} is unreadable ({exc})")
            continue
        mine = cfg.hashed_dict()
        if theirs.get("config_hash") != cfg.config_hash or {k: theirs.get(k) for k in mine} != mine:
            problems.append(f"{path.parent} holds a different config (hash {theirs.get('config_hash')!r}, "
                            f"expected {cfg.config_hash!r})")
    if problems:
        raise StoreError("refusing to launch, nothing was written: " + "; ".join(problems)
                         + ". Move those directories away, or use another --results-dir or study name")


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


def check_executor(executor: str, ray_address: Optional[str] = None) -> None:
    """Everything about the executor that can be checked before a results directory is touched."""
    if executor not in EXECUTORS:
        raise ConfigError(f"unknown --executor {executor!r}; choose one of: {', '.join(EXECUTORS)}")
    if ray_address and executor != "ray":
        raise ConfigError(f"--ray-address applies to --executor ray only (got --executor {executor})")
    if executor == "ray":
        _import_ray()
        if ray_address:
            check_ray_address(ray_address)


# -- one run -------------------------------------------------------------------------------------------------
@contextmanager
def _run_log(run_dir: Path):
    """Route the ``experiments`` logger to ``run_dir/run.log`` (only there) while the run executes."""
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / "run.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
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
    ckpts = sorted((run_dir / "checkpoints").glob("epoch-*.pt")) if (run_dir / "checkpoints").is_dir() else []
    return f"resuming from checkpoints/{ckpts[-1].name}" if ckpts else "no checkpoint: from the start"


def _last_record(run_dir: Path) -> dict:
    try:
        with open(run_dir / "records.jsonl", "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 65536))
            return json.loads(f.read().splitlines()[-1])
    except (OSError, ValueError, IndexError):
        return {}


@contextmanager
def run_lock(run_dir: Path):
    """Hold an exclusive lock on ``run_dir/run.log`` while the run executes, so that two launches into the same
    results directory never train one run at once; yields False (and holds nothing) if another process holds it.
    The lock dies with its process, even on SIGKILL. No-op where ``fcntl`` is missing."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield True
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / "run.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def is_locked(run_dir: Path) -> bool:
    """Whether a live process holds ``run_lock`` on this run (on this machine)."""
    try:
        import fcntl
        fd = os.open(run_dir / "run.log", os.O_RDONLY)
    except (ImportError, OSError):
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def execute(cfg_dict: dict, root: str, resume: bool, data_dir: Optional[str], threads: int,
            progress_queue=None) -> LaunchResult:
    """Run one config in this process (the body of every executor's task). Exceptions become a ``failed``
    result (traceback in run.log); KeyboardInterrupt is logged and re-raised."""
    import torch
    from .store import RunStore, StoreError
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
            return LaunchResult(cfg.run_id, "failed", 0.0, f"{run_dir} is being run by another process right now "
                                f"(another launch into the same results directory?); it was left alone")
        return _execute_locked(cfg, root, resume, data_dir, threads, progress, start)


def _execute_locked(cfg: RunConfig, root: str, resume: bool, data_dir: Optional[str], threads: int, progress,
                    start: float) -> LaunchResult:
    from .training import train_run
    run_dir = Path(root) / cfg.run_id
    with _run_log(run_dir) as log:
        log.info("start %s pid=%d host=%s threads=%d device=%s resume=%s%s", cfg.run_id, os.getpid(),
                 socket.gethostname(), threads, cfg.device, resume,
                 f", {_resume_point(run_dir)}" if resume else "")
        try:
            outcome = train_run(cfg, Path(root), resume=resume, data_dir=data_dir, progress=progress)
        except KeyboardInterrupt:
            log.warning("interrupted after %.1f s; relaunch the sweep (or pass --resume) to continue from the last "
                        "checkpoint", time.perf_counter() - start)
            raise
        except Exception as exc:  # one broken run must not stop a sweep; its log keeps the traceback
            log.error("failed: %s: %s\n%s", type(exc).__name__, exc, traceback.format_exc().rstrip())
            return LaunchResult(cfg.run_id, "failed", time.perf_counter() - start, f"{type(exc).__name__}: {exc}")
        detail = ""
        if outcome.status == "diverged":
            detail = f" ({_last_record(run_dir).get('reason', 'loss not finite')})"
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
        self.steps: Dict[str, int] = {}
        self.bars: Dict[str, tqdm] = {}
        self.positions: Dict[str, int] = {}
        self.overall = tqdm(total=sum(steps_per_run.values()), desc="study", unit="step", disable=quiet,
                            dynamic_ncols=True, position=0)
        self._set_postfix()

    def _set_postfix(self):
        self.overall.set_postfix_str(f"runs {self.done_runs}/{self.total_runs}")

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
        self.done_runs += 1
        self.overall.update(max(0, total_steps - self.steps.get(result.run_id, 0)))
        self.steps[result.run_id] = total_steps
        bar = self.bars.pop(result.run_id, None)
        self.positions.pop(result.run_id, None)
        if bar is not None:
            bar.close()
        self._set_postfix()
        if result.status in ("failed", "diverged") and not self.quiet:
            tqdm.write(f"{result.run_id}: {result.status} {result.error}".rstrip())

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.overall.close()


class _DirectQueue:
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
           ray_address: Optional[str] = None, quiet: bool = False,
           steps_per_run: Optional[Dict[str, int]] = None) -> List[LaunchResult]:
    """Run every config under ``root``, in the order given; finished runs are skipped, failures are reported in
    the results, not raised. Raises ConfigError / StoreError before anything runs, KeyboardInterrupt on Ctrl-C
    or SIGTERM (after stopping the workers)."""
    check_executor(executor, ray_address)
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers must be a positive integer, got {workers}")
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads must be a positive integer, got {threads}")
    unique: Dict[str, RunConfig] = {}
    for cfg in runs:                 # convnet and convnet:none are one run: never train a directory twice at once
        unique.setdefault(cfg.run_id, cfg)
    runs = list(unique.values())
    preflight(runs, root)
    workers = workers or default_workers(executor, len(runs))
    threads = threads or default_threads()
    steps_per_run = steps_per_run or {}
    totals = {cfg.run_id: steps_per_run.get(cfg.run_id, 1) for cfg in runs}
    from .store import RunStore
    skipped = {cfg.run_id for cfg in runs if RunStore(root, cfg).done}
    todo = [cfg for cfg in runs if cfg.run_id not in skipped]
    display = ProgressDisplay(runs, totals, quiet)
    results: Dict[str, LaunchResult] = {}

    def finished(result: LaunchResult) -> None:
        results[result.run_id] = result
        display.finish(result, totals[result.run_id])

    for run_id in skipped:
        finished(LaunchResult(run_id, "skipped", 0.0))
    args = [(cfg.to_dict(), str(root), resume, data_dir, threads) for cfg in todo]
    try:
        with _sigterm_as_interrupt():
            if not todo:
                pass
            elif executor == "serial":
                for a in args:
                    finished(execute(*a, progress_queue=_DirectQueue(display)))
            elif executor == "process":
                _launch_processes(args, display, finished, min(workers, len(todo)))
            else:
                _launch_ray(args, todo, display, finished, workers, threads, ray_address)
    finally:
        display.close()
    return [results[cfg.run_id] for cfg in runs if cfg.run_id in results]


# -- process executor ----------------------------------------------------------------------------------------
class _PipeQueue:
    def __init__(self, conn):
        self.conn = conn

    def put(self, item) -> None:
        try:
            self.conn.send(("progress", item))
        except (OSError, EOFError):     # the launcher is gone (killed): stop, as on Ctrl-C
            raise KeyboardInterrupt from None


def _worker_main(conn) -> None:
    """A worker process: run the tasks sent over ``conn`` one at a time until told to stop (None)."""
    try:
        while True:
            task = conn.recv()
            if task is None:
                return
            conn.send(("result", execute(*task, progress_queue=_PipeQueue(conn))))
    except (KeyboardInterrupt, EOFError, BrokenPipeError):
        return   # interrupted (run.log says so) or the launcher went away


class _Worker:
    def __init__(self, ctx):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child,), daemon=True, name="smoothness-lab-worker")
        self.proc.start()
        child.close()
        self.run_id: Optional[str] = None
        self.started = 0.0

    def give(self, run_id: str, task: tuple) -> None:
        self.run_id, self.started = run_id, time.perf_counter()
        self.conn.send(task)


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
    return f"worker process died ({how}); relaunch to resume the run from its last checkpoint"


def _launch_processes(args, display, finished, workers: int) -> None:
    ctx = mp.get_context("spawn")   # fork after torch has started threads can deadlock
    queue = collections.deque((RunConfig.from_dict(a[0]).run_id, a) for a in args)
    pool: List[_Worker] = []
    try:
        while queue or any(w.run_id for w in pool):
            for w in pool:
                if w.run_id is None and queue:
                    w.give(*queue.popleft())
            while queue and len(pool) < workers:
                w = _Worker(ctx)
                pool.append(w)
                w.give(*queue.popleft())
            busy = [w for w in pool if w.run_id]
            ready = mp_wait([w.conn for w in busy] + [w.proc.sentinel for w in busy], timeout=1.0)
            for w in busy:
                if w.conn in ready or w.proc.sentinel in ready:
                    _service(w, display, finished)
            for w in [w for w in pool if not w.proc.is_alive()]:
                pool.remove(w)
                w.conn.close()
    except BaseException:
        _stop_workers(pool)
        raise
    for w in pool:
        try:
            w.conn.send(None)
        except OSError:
            pass
    for w in pool:
        w.proc.join(timeout=INTERRUPT_GRACE)
        if w.proc.is_alive():
            w.proc.kill()
        w.conn.close()


def _service(w: _Worker, display, finished) -> None:
    """Read what a worker sent; if it died holding a run, that run failed."""
    try:
        while w.conn.poll():
            kind, payload = w.conn.recv()
            if kind == "progress":
                display.update(*payload)
            else:
                w.run_id = None
                finished(payload)
    except (EOFError, OSError):
        pass
    if w.run_id is not None and not w.proc.is_alive():
        w.proc.join()
        finished(LaunchResult(w.run_id, "failed", time.perf_counter() - w.started, _death(w.proc)))
        w.run_id = None


def _stop_workers(pool: List[_Worker]) -> None:
    """Ctrl-C / SIGTERM / an error in the launcher: interrupt running runs (their run.log says so), then make
    sure no worker outlives the launch."""
    deadline = time.monotonic() + 2.0      # workers hit by the terminal's Ctrl-C are already on their way out
    for w in pool:
        w.proc.join(timeout=max(0.0, deadline - time.monotonic()))
    for w in pool:
        if w.proc.is_alive():
            try:
                os.kill(w.proc.pid, signal.SIGINT)
            except OSError:
                pass
    deadline = time.monotonic() + INTERRUPT_GRACE
    for w in pool:
        w.proc.join(timeout=max(0.0, deadline - time.monotonic()))
        if w.proc.is_alive():
            w.proc.kill()
            w.proc.join()
        w.conn.close()


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
