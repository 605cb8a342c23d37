"""``--executor ray``: one Ray task per task (``num_cpus=threads``, ``num_gpus`` the share the caller asks for), on a
local cluster of ``workers x threads`` CPUs started here, or on the cluster at ``--ray-address`` (whose nodes must see
the results directory and have this package installed). Tasks are not retried; a task whose worker died or that was
cancelled is reported failed with Ray's one-line reason. Ctrl-C cancels the tasks (KeyboardInterrupt inside them),
waits ``INTERRUPT_GRACE`` seconds, then kills what is left."""
from __future__ import annotations

import socket
import time

from experiments.config import ConfigError
from experiments.executors.base import INTERRUPT_GRACE, Executor, Outcome, failure_of, prepare_worker, register_executor


def import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("--executor ray needs Ray: pip install 'smoothness-lab[ray]' "
                          "(or pip install 'ray[default]')") from None
    return ray


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


def ray_call(fn, head, args, threads, progress):
    """The body of every Ray task (``head``: the shared object, resolved by Ray, or None)."""
    prepare_worker(threads)
    return fn(*(() if head is None else (head,)), *args, progress=progress)


class RayExecutor(Executor):
    name = "ray"
    takes = ("ray_address",)

    def check(self, options, devices=()) -> None:
        import_ray()
        if options.ray_address:
            check_ray_address(options.ray_address)

    def elsewhere(self, options) -> bool:
        return bool(options.ray_address)

    def run(self, tasks, *, workers, threads, options, on_done, on_progress, shared, gpus) -> None:
        ray = import_ray()
        from ray.util.queue import Queue as RayQueue
        address = options.ray_address
        started_here = not ray.is_initialized()
        if started_here:
            init = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
            try:
                if address:
                    ray.init(address=address, **init)
                else:
                    ray.init(num_cpus=workers * threads, **init)
            except Exception as exc:
                where = f"the Ray cluster at --ray-address {address}" if address else "a local Ray cluster"
                raise ConfigError(f"could not start or join {where}: {type(exc).__name__}: {exc}") from None
        refs: dict = {}
        try:
            q = RayQueue(actor_options={"num_cpus": 0})
            remote = ray.remote(ray_call).options(num_cpus=threads, num_gpus=gpus, max_retries=0)
            heads = {name: ray.put(shared[name]) for name in sorted({t.shared for t in tasks if t.shared is not None})}
            starts = {}
            for task in tasks:
                refs[remote.remote(task.fn, heads.get(task.shared), tuple(task.args), threads, q)] = task.key
                starts[task.key] = time.perf_counter()
            pending = list(refs)
            while pending:
                ready, pending = ray.wait(pending, num_returns=1, timeout=0.2)
                while not q.empty():
                    on_progress(q.get())
                for ref in ready:
                    key = refs.pop(ref)
                    try:
                        outcome = Outcome(key, ray.get(ref), seconds=time.perf_counter() - starts[key])
                    except ray.exceptions.RayError as exc:   # the task raised, its worker died, or it was cancelled
                        outcome = Outcome(key, failure=failure_of(exc), seconds=time.perf_counter() - starts[key])
                    on_done(outcome)
        except BaseException:
            for ref in refs:
                try:
                    ray.cancel(ref)   # KeyboardInterrupt inside the task: a run's run.log says "interrupted"
                except Exception:
                    pass
            if refs:
                _, left = ray.wait(list(refs), num_returns=len(refs), timeout=INTERRUPT_GRACE)
                for ref in left:
                    try:
                        ray.cancel(ref, force=True)
                    except Exception:
                        pass
            raise
        finally:
            if started_here:
                ray.shutdown()


register_executor(RayExecutor())
