"""``--executor process``: every task in a process of its own, at most ``workers`` at once.

The processes come from multiprocessing's fork server (torch imported once, no inherited threads), or are spawned
where there is none. A process that dies fails exactly its task; Ctrl-C, SIGTERM or an error in the caller interrupt
the running processes and kill them after ``INTERRUPT_GRACE`` seconds.

Details: docs/explanation/modules.md#executors-process
"""
from __future__ import annotations

import _thread
import collections
import multiprocessing as mp
import os
import pickle
import select
import shutil
import signal
import tempfile
import threading
import time
import traceback
from multiprocessing.connection import wait as mp_wait
from typing import List, Optional

from experiments.executors.base import INTERRUPT_GRACE, Executor, Outcome, failure_of, prepare_worker, register_executor

PRELOAD = ("torch", "experiments.training")   # what nearly every task imports: once, in the fork server
PARENT_POLL_S = 0.2      # how often a task's process checks that its parent is alive, in seconds
ORPHAN_GRACE_S = 3.0     # how long an orphaned task may take to close after its interrupt


class PipeSink:
    """Progress from a task's process to the launcher."""

    def __init__(self, conn):
        self.conn = conn

    def put(self, item) -> None:
        try:
            self.conn.send(("progress", item))
        except (OSError, EOFError):     # the launcher is gone (killed): stop, as on Ctrl-C
            raise KeyboardInterrupt from None


def process_context(preload=()):
    """The fork-server context (``preload`` imported once in the server; no effect once it runs), or spawn where
    there is no fork server (Windows)."""
    if "forkserver" not in mp.get_all_start_methods():   # pragma: no cover - Windows
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(list(dict.fromkeys([*PRELOAD, *preload])))
    return ctx


def die_with_parent(fd: int, folder: Optional[str]) -> None:
    """Watchdog thread of a task's process: once the parent is gone (killed, even by SIGKILL), remove the shared
    folder, interrupt the task, and exit after a short grace. The sign is the task's pipe: its read end is held by
    the parent alone, so the write end reports an error (POLLERR) once the parent has died. (os.getppid would not
    change: a fork server's children are its own, and it lives on while they hold its fd.)"""
    poll = select.poll()
    poll.register(fd, 0)   # POLLERR and POLLHUP are always reported
    while not poll.poll(PARENT_POLL_S * 1000):
        pass
    if folder:
        shutil.rmtree(folder, ignore_errors=True)
    _thread.interrupt_main()
    time.sleep(ORPHAN_GRACE_S)
    os._exit(1)


def process_main(conn, fn, args: tuple, shared_path: Optional[str], threads: int) -> None:
    """The body of one task's process: run it, send its result (or its one-line failure), exit. Ctrl-C (SIGINT from
    the launcher or the terminal) ends it quietly."""
    folder = os.path.dirname(shared_path) if shared_path else None
    threading.Thread(target=die_with_parent, args=(conn.fileno(), folder), daemon=True,
                     name="die-with-parent").start()
    try:
        prepare_worker(threads)
        head = ()
        if shared_path:
            with open(shared_path, "rb") as f:
                head = (pickle.load(f),)
        message = ("result", fn(*head, *args, progress=PipeSink(conn)))
    except KeyboardInterrupt:
        return
    except Exception as exc:   # still one report per task
        traceback.print_exc()
        message = ("error", failure_of(exc))
    try:
        conn.send(message)
    except (OSError, EOFError):
        pass   # the launcher is gone


class TaskProcess:
    """One task in a process of its own, with the read end of its pipe."""

    def __init__(self, ctx, task, shared_path: Optional[str], threads: int):
        self.key = task.key
        self.conn, child = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=process_main, args=(child, task.fn, tuple(task.args), shared_path, threads),
                                daemon=True, name=f"smoothness-lab {task.key}")
        self.started = time.perf_counter()
        self.outcome: Optional[Outcome] = None
        self.proc.start()
        child.close()

    def drain(self, on_progress) -> None:
        """Read everything the process has sent so far (progress, then at most one result)."""
        try:
            while self.outcome is None and self.conn.poll():
                kind, payload = self.conn.recv()
                if kind == "progress":
                    on_progress(payload)
                elif kind == "result":
                    self.outcome = Outcome(self.key, payload, seconds=time.perf_counter() - self.started)
                else:
                    self.outcome = Outcome(self.key, failure=payload, seconds=time.perf_counter() - self.started)
        except (EOFError, OSError):
            pass   # the process ended, possibly in the middle of a message: what it sent before stands

    def died(self) -> Outcome:
        """The outcome of a task whose process ended without sending one."""
        return Outcome(self.key, failure="its process died", cause=death(self.proc),
                       seconds=time.perf_counter() - self.started)


def death(proc) -> str:
    """How a process ended, in words."""
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


def reaped(r: TaskProcess, wait: float) -> bool:
    """Join a process that has sent its result (killing it if it lingers past ``wait`` > 0); whether it is gone."""
    r.proc.join(timeout=wait)
    if r.proc.is_alive():
        if not wait:
            return False
        r.proc.kill()
        r.proc.join()
    r.conn.close()
    return True


def stop_processes(procs: List[TaskProcess]) -> None:
    """Ctrl-C / SIGTERM / an error in the launcher: interrupt running tasks (a run's run.log says so), then make
    sure no task's process outlives the launch."""
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


def write_shared(tasks, shared) -> tuple:
    """(folder or None, {name: path}): every shared object the tasks use, pickled once."""
    names = sorted({t.shared for t in tasks if t.shared is not None})
    if not names:
        return None, {}
    folder = tempfile.mkdtemp(prefix="smoothness-shared-")
    paths = {}
    for k, name in enumerate(names):
        paths[name] = os.path.join(folder, f"shared-{k}.pkl")
        with open(paths[name], "wb") as f:
            pickle.dump(shared[name], f, protocol=pickle.HIGHEST_PROTOCOL)
    return folder, paths


class ProcessExecutor(Executor):
    name = "process"

    def run(self, tasks, *, workers, threads, options, on_done, on_progress, shared, gpus) -> None:
        """The books: a task is in ``running`` from its start until it is reported through ``on_done``, with its
        result, or as failed once its process has ended without one (checked for every running process at every
        turn, whatever woke the wait). Processes that sent their result are reaped in ``closing``."""
        ctx = process_context(sorted({t.fn.__module__ for t in tasks}))
        queue = collections.deque(tasks)
        running: List[TaskProcess] = []
        closing: List[TaskProcess] = []
        folder, paths = None, {}
        try:
            folder, paths = write_shared(tasks, shared)
            while queue or running:
                while queue and len(running) < workers:
                    task = queue.popleft()
                    running.append(TaskProcess(ctx, task, paths.get(task.shared), threads))
                mp_wait([r.conn for r in running] + [r.proc.sentinel for r in running], timeout=1.0)
                for r in list(running):
                    r.drain(on_progress)
                    if r.outcome is None and not r.proc.is_alive():
                        r.proc.join()
                        r.drain(on_progress)   # what it sent between the first look and its end
                        if r.outcome is None:
                            r.outcome = r.died()
                    if r.outcome is not None:
                        running.remove(r)
                        closing.append(r)
                        on_done(r.outcome)
                closing = [r for r in closing if reaped(r, wait=0.0) is False]
        except BaseException:
            stop_processes(running + closing)
            raise
        finally:
            if folder:
                shutil.rmtree(folder, ignore_errors=True)
        for r in closing:
            reaped(r, wait=INTERRUPT_GRACE)


register_executor(ProcessExecutor())
