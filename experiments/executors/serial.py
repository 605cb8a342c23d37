"""``--executor serial``: every task in this process, one after another. Ctrl-C stops the current task (a training
run's records stay readable: every record is flushed when written) and raises KeyboardInterrupt."""
from __future__ import annotations

import time

from experiments.executors.base import Executor, Outcome, failure_of, register_executor, torch_threads


class CallerError(BaseException):
    """An error of the caller's progress callback, carried through the task (a BaseException, so the task's own
    ``except Exception`` does not take it) and raised again to the caller: it is not the task's failure."""

    def __init__(self, exc: Exception):
        super().__init__(str(exc))
        self.exc = exc


class DirectSink:
    """Progress from a task in this process straight to the caller's callback."""

    def __init__(self, on_progress):
        self.on_progress = on_progress

    def put(self, item) -> None:
        try:
            self.on_progress(item)
        except Exception as exc:
            raise CallerError(exc) from exc


class SerialExecutor(Executor):
    name = "serial"

    def default_workers(self, n_tasks, options) -> int:
        return 1

    def run(self, tasks, *, workers, threads, options, on_done, on_progress, shared, gpus) -> None:
        sink = DirectSink(on_progress)
        with torch_threads(threads):
            for task in tasks:
                started = time.perf_counter()
                head = (shared[task.shared],) if task.shared is not None else ()
                try:
                    result = task.fn(*head, *task.args, progress=sink)
                except CallerError as err:   # the caller's own error, as if raised where it was called
                    raise err.exc from None
                except Exception as exc:   # one broken task must not stop the others
                    on_done(Outcome(task.key, failure=failure_of(exc), seconds=time.perf_counter() - started))
                    continue
                on_done(Outcome(task.key, result, seconds=time.perf_counter() - started))


register_executor(SerialExecutor())
