"""Fan a study's runs out: serially, on a process pool, or on a Ray cluster, with one progress display.

Every executor calls the same ``training.train_run`` with the same config, so records do not depend on the
executor. Each worker runs torch with ``threads`` intra-op threads so that workers x threads fits the cores.
"""
from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import multiprocessing as mp

from tqdm.auto import tqdm

from .config import ConfigError, RunConfig

EXECUTORS = ("serial", "process", "ray")


@dataclass(frozen=True)
class LaunchResult:
    run_id: str
    status: str        # done, diverged, skipped, failed
    seconds: float
    error: str = ""


def default_workers(executor: str, n_runs: int) -> int:
    return 1 if executor == "serial" else max(1, min(os.cpu_count() or 1, n_runs))


def default_threads(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, workers))


@contextmanager
def _run_log(run_dir: Path):
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / "run.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("experiments")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield logger
    finally:
        logger.removeHandler(handler)
        handler.close()


def execute(cfg_dict: dict, root: str, resume: bool, data_dir: Optional[str], threads: int,
            progress_queue=None) -> LaunchResult:
    """Run one config in this process (the body of every executor's task)."""
    import torch
    from .training import train_run
    torch.set_num_threads(threads)
    cfg = RunConfig.from_dict(cfg_dict)
    start = time.perf_counter()

    def progress(run_id, done, total):
        if progress_queue is not None:
            progress_queue.put((run_id, done, total))

    with _run_log(Path(root) / cfg.run_id) as log:
        log.info("start %s (threads=%d, resume=%s)", cfg.run_id, threads, resume)
        try:
            outcome = train_run(cfg, Path(root), resume=resume, data_dir=data_dir, progress=progress)
        except KeyboardInterrupt:
            log.warning("interrupted; rerun with --resume to continue from the last checkpoint")
            raise
        except Exception as exc:  # one broken run must not stop a sweep; its log keeps the traceback
            log.error("failed: %s\n%s", exc, traceback.format_exc())
            return LaunchResult(cfg.run_id, "failed", time.perf_counter() - start, f"{type(exc).__name__}: {exc}")
        log.info("%s after %d steps in %.1f s", outcome.status, outcome.steps, outcome.seconds)
    return LaunchResult(cfg.run_id, outcome.status, time.perf_counter() - start)


class ProgressDisplay:
    """One bar for the whole study (SGD steps over all runs, with ETA) and one per active run."""

    def __init__(self, runs: Sequence[RunConfig], steps_per_run: Dict[str, int], quiet: bool):
        self.quiet = quiet
        self.total_runs = len(runs)
        self.done_runs = 0
        self.steps: Dict[str, int] = {}
        self.bars: Dict[str, tqdm] = {}
        self.overall = tqdm(total=sum(steps_per_run.values()), desc="study", unit="step", disable=quiet,
                            dynamic_ncols=True, position=0)
        self._set_postfix()

    def _set_postfix(self):
        self.overall.set_postfix_str(f"runs {self.done_runs}/{self.total_runs}")

    def update(self, run_id: str, done: int, total: int) -> None:
        if run_id not in self.bars:
            self.bars[run_id] = tqdm(total=total, desc=run_id, unit="step", disable=self.quiet, leave=False,
                                     dynamic_ncols=True, position=len(self.bars) + 1)
        delta = done - self.steps.get(run_id, 0)
        self.steps[run_id] = done
        self.bars[run_id].update(delta)
        self.overall.update(delta)

    def finish(self, result: LaunchResult, total_steps: int) -> None:
        self.done_runs += 1
        self.overall.update(max(0, total_steps - self.steps.get(result.run_id, 0)))
        self.steps[result.run_id] = total_steps
        bar = self.bars.pop(result.run_id, None)
        if bar is not None:
            bar.close()
        self._set_postfix()
        if result.status in ("failed", "diverged") and not self.quiet:
            tqdm.write(f"{result.run_id}: {result.status} {result.error}".rstrip())

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.overall.close()


def _drain(q, display: ProgressDisplay, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            display.update(*q.get(timeout=0.2))
        except queue.Empty:
            continue
        except (EOFError, OSError):
            return


def _check_ray_address(address: str, timeout: float = 5.0) -> None:
    host, _, port = address.replace("ray://", "").rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as exc:
        raise ConfigError(f"the Ray cluster at --ray-address {address} does not answer ({exc}); start it with "
                          f"`ray start --head` or leave --ray-address out to start a local cluster") from None


def launch(runs: Sequence[RunConfig], root: Path, *, executor: str = "serial", workers: Optional[int] = None,
           threads: Optional[int] = None, resume: bool = False, data_dir: Optional[str] = None,
           ray_address: Optional[str] = None, quiet: bool = False,
           steps_per_run: Optional[Dict[str, int]] = None) -> List[LaunchResult]:
    """Run every config under ``root``; finished runs are skipped, failures are reported, not raised."""
    if executor not in EXECUTORS:
        raise ConfigError(f"unknown --executor {executor!r}; choose one of: {', '.join(EXECUTORS)}")
    workers = workers or default_workers(executor, len(runs))
    if workers < 1:
        raise ConfigError(f"--workers must be a positive integer, got {workers}")
    threads = threads or default_threads(workers)
    steps_per_run = steps_per_run or {}
    totals = {cfg.run_id: steps_per_run.get(cfg.run_id, 1) for cfg in runs}
    display = ProgressDisplay(runs, totals, quiet)
    results: List[LaunchResult] = []
    args = [(cfg.to_dict(), str(root), resume, data_dir, threads) for cfg in runs]
    try:
        if executor == "serial":
            for a, cfg in zip(args, runs):
                result = execute(*a, progress_queue=_DirectQueue(display))
                results.append(result)
                display.finish(result, totals[cfg.run_id])
        elif executor == "process":
            results = _launch_processes(args, runs, totals, display, workers)
        else:
            results = _launch_ray(args, runs, totals, display, workers, threads, ray_address)
    finally:
        display.close()
    return results


class _DirectQueue:
    def __init__(self, display: ProgressDisplay):
        self.display = display

    def put(self, item) -> None:
        self.display.update(*item)


def _launch_processes(args, runs, totals, display, workers) -> List[LaunchResult]:
    ctx = mp.get_context("spawn")   # fork after torch has started threads can deadlock
    with ctx.Manager() as manager:
        q = manager.Queue()
        stop = threading.Event()
        drainer = threading.Thread(target=_drain, args=(q, display, stop), daemon=True)
        drainer.start()
        results = []
        try:
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                futures = {pool.submit(execute, *a, q): cfg for a, cfg in zip(args, runs)}
                for future in as_completed(futures):
                    cfg = futures[future]
                    result = future.result()
                    results.append(result)
                    display.finish(result, totals[cfg.run_id])
        finally:
            stop.set()
            drainer.join(timeout=2)
    order = {cfg.run_id: i for i, cfg in enumerate(runs)}
    return sorted(results, key=lambda r: order[r.run_id])


def _launch_ray(args, runs, totals, display, workers, threads, address) -> List[LaunchResult]:
    try:
        import ray
        from ray.util.queue import Queue as RayQueue
    except ImportError:
        raise ConfigError("--executor ray needs Ray: pip install 'smoothness-lab[ray]' (or pip install 'ray[default]')") from None
    if address:
        _check_ray_address(address)
    started_here = not ray.is_initialized()
    if started_here:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=workers * threads, include_dashboard=False, log_to_driver=False)
    try:
        q = RayQueue()
        remote = ray.remote(num_cpus=threads)(execute)
        refs = {remote.remote(*a, q): cfg for a, cfg in zip(args, runs)}
        results, pending = [], list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=0.2)
            while not q.empty():
                display.update(*q.get())
            for ref in ready:
                result = ray.get(ref)
                results.append(result)
                display.finish(result, totals[refs[ref].run_id])
    finally:
        if started_here:
            ray.shutdown()
    order = {cfg.run_id: i for i, cfg in enumerate(runs)}
    return sorted(results, key=lambda r: order[r.run_id])
