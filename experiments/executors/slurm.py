"""``--executor slurm``: one SLURM job per task, submitted and followed through submitit.

A run's records are identical to the other executors'. A job cut off by its time limit or by preemption is requeued
and continues from the run's last checkpoint; ``cluster="local"`` tries a cluster launch without a cluster; Ctrl-C
or SIGTERM cancels the submitted jobs. Every node must see the results directory and the dataset.

Details: docs/explanation/modules.md#slurm
"""
from __future__ import annotations

import collections
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

from experiments.config import ConfigError
from experiments.executors.base import INTERRUPT_GRACE, Executor, Outcome, prepare_worker, register_executor

CLUSTERS = ("slurm", "local")
POLL_SECONDS = 1.0            # how often the launcher looks at its jobs and the runs' records
DEFAULT_TIME_MIN = 240        # per job; a run that needs longer is requeued and resumes from its last checkpoint
_SBATCH_KEY = re.compile(r"^[a-z][a-z0-9-]*$")


@dataclass(frozen=True)
class SlurmOptions:
    """What each run's job asks the cluster for (the ``--slurm-*`` options)."""

    cluster: str = "slurm"                 # "slurm", or "local": submitit's local executor on this machine
    partition: Optional[str] = None        # sbatch --partition
    time_min: int = DEFAULT_TIME_MIN       # sbatch --time, minutes
    gpus: int = 0                          # GPUs per run (sbatch --gpus-per-node)
    cpus: Optional[int] = None             # CPUs per run [default: --threads]
    mem_gb: Optional[float] = None         # memory per run (sbatch --mem)
    sbatch: Tuple[Tuple[str, Union[str, bool]], ...] = ()   # further sbatch options: (("account", "lab"),
    #                                                         ("exclusive", True)) for --account=lab --exclusive
    log_dir: Optional[Path] = None         # submitit's scripts and logs [default: <study>/.slurm]


def import_submitit():
    try:   # the `slurm` extra; without it, --executor slurm says how to install it
        import submitit
    except ImportError:
        raise ConfigError("--executor slurm needs submitit: pip install 'smoothness-lab[slurm]' "
                          "(or pip install 'submitit>=1.5')") from None
    return submitit


def parse_sbatch(items) -> Tuple[Tuple[str, Union[str, bool]], ...]:
    """``--slurm-sbatch KEY=VALUE`` options (``account=lab``, ``constraint=a100``) as pairs; a bare ``KEY`` is a
    flag (``exclusive``: True, which submitit writes as ``#SBATCH --exclusive``)."""
    out = []
    for item in items:
        key, eq, value = str(item).partition("=")
        key = key.strip().lstrip("-")
        if not _SBATCH_KEY.match(key):
            raise ConfigError(f"--slurm-sbatch {item!r} is not KEY=VALUE with an sbatch option name as KEY "
                              f"(e.g. account=mylab, constraint=a100, qos=low)")
        out.append((key.replace("-", "_"), value.strip() if eq else True))
    return tuple(out)


def check_slurm(options: SlurmOptions) -> None:
    """Everything about the cluster options that can be checked before anything is written or submitted."""
    import_submitit()
    if options.cluster not in CLUSTERS:
        raise ConfigError(f"unknown --slurm-cluster {options.cluster!r}; choose one of: {', '.join(CLUSTERS)}")
    if not isinstance(options.time_min, int) or options.time_min < 1:
        raise ConfigError(f"--slurm-time must be a positive number of minutes, got {options.time_min!r}")
    if options.gpus < 0:
        raise ConfigError(f"--slurm-gpus must be >= 0, got {options.gpus}")
    if options.cpus is not None and options.cpus < 1:
        raise ConfigError(f"--slurm-cpus must be a positive integer, got {options.cpus}")
    if options.mem_gb is not None and not options.mem_gb > 0:
        raise ConfigError(f"--slurm-mem-gb must be positive, got {options.mem_gb}")
    missing = [cmd for cmd in ("sbatch", "srun") if shutil.which(cmd) is None] if options.cluster == "slurm" else []
    if missing:
        raise ConfigError(f"--executor slurm found no `{missing[0]}` on PATH: launch from a SLURM login node, or "
                          f"add --slurm-cluster local to run the jobs on this machine through submitit")


def check_devices(devices, options: SlurmOptions) -> None:
    """A task asking for CUDA needs a GPU in its job."""
    cuda = sorted({d for d in devices if str(d).startswith("cuda")})
    if cuda and options.gpus < 1:
        raise ConfigError(f"--device {cuda[0]} needs a GPU in every job: add --slurm-gpus 1 (or use --device auto, "
                          f"which uses CUDA where the job has a GPU)")


def make_executor(options: SlurmOptions, folder: Path, threads: int, workers: int):
    """The submitit executor for these options (job scripts, pickles and logs go to ``folder/<job id>_*``)."""
    submitit = import_submitit()
    executor = submitit.AutoExecutor(folder=str(folder), cluster=options.cluster)
    params = dict(name="smoothness-lab", timeout_min=options.time_min, cpus_per_task=options.cpus or threads,
                  gpus_per_node=options.gpus, tasks_per_node=1, nodes=1, mem_gb=options.mem_gb,
                  slurm_partition=options.partition, slurm_array_parallelism=workers)
    if options.sbatch:
        params["slurm_additional_parameters"] = dict(options.sbatch)
    executor.update_parameters(**params)
    return executor


class TaskJob:
    """One task as a submitit job. On a time-out or preemption submitit calls ``checkpoint`` (it looks for the
    method): the task is requeued with its ``again`` arguments."""

    def __init__(self, fn, again: Optional[tuple], threads: int):
        self.fn, self.again, self.threads = fn, again, threads

    def __call__(self, *args):
        prepare_worker(self.threads)
        return self.fn(*args, progress=None)

    def checkpoint(self, *args):
        import submitit
        return submitit.helpers.DelayedSubmission(self, *(args if self.again is None else self.again))


def job_failure(job, exc: BaseException) -> str:
    message = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    try:
        log = f" (job log: {job.paths.stderr})"
    except Exception:   # pragma: no cover - a job without paths
        log = ""
    return f"SLURM job {job.job_id} ended without a result: {type(exc).__name__}: {message}{log}"


def safe_done(job) -> bool:
    try:
        return job.done()
    except Exception:
        return True


class SlurmExecutor(Executor):
    name = "slurm"
    takes = ("slurm",)

    def check(self, options, devices=()) -> None:
        slurm = options.slurm or SlurmOptions()
        check_slurm(slurm)
        check_devices(devices, slurm)

    def elsewhere(self, options) -> bool:
        return (options.slurm or SlurmOptions()).cluster == "slurm"

    def default_workers(self, n_tasks, options) -> int:
        """Every task at once on a cluster (its scheduler queues them); else one per core."""
        if self.elsewhere(options):
            return max(1, n_tasks)
        return super().default_workers(n_tasks, options)

    def run(self, tasks, *, workers, threads, options, on_done, on_progress, shared, gpus) -> None:
        """Submit one job per task and follow them until each has given a result. On a cluster every job is
        submitted at once as a job array (``workers`` at a time); the local executor starts a job's process at
        submission, so there at most ``workers`` are submitted at a time."""
        submitit = import_submitit()
        slurm = options.slurm or SlurmOptions()
        folder = slurm.log_dir or Path(options.workdir or ".") / ".slurm"
        executor = make_executor(slurm, folder, threads, workers)
        pending = collections.deque(tasks)
        jobs: Dict[object, Tuple[object, float]] = {}

        def submit(n: int) -> None:
            chunk = [pending.popleft() for _ in range(min(n, len(pending)))]
            if not chunk:
                return
            try:
                with executor.batch():
                    submitted = []
                    for t in chunk:
                        head = () if t.shared is None else (shared[t.shared],)
                        again = None if t.again is None else (*head, *t.again)
                        submitted.append(executor.submit(TaskJob(t.fn, again, threads), *head, *t.args))
            except Exception as exc:
                raise ConfigError(f"could not submit to the {slurm.cluster} cluster: {type(exc).__name__}: "
                                  f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") from None
            for job, task in zip(submitted, chunk):
                jobs[job] = (task, time.perf_counter())

        try:
            submit(len(pending) if slurm.cluster == "slurm" else workers)
            while jobs:
                for job, (task, started) in list(jobs.items()):
                    item = task.watch() if task.watch is not None else None
                    if item is not None:
                        on_progress(item)
                    if not job.done():
                        continue
                    del jobs[job]
                    try:
                        outcome = Outcome(task.key, job.result(), seconds=time.perf_counter() - started)
                    except (submitit.core.utils.UncompletedJobError, submitit.core.utils.FailedJobError,
                            OSError) as exc:
                        outcome = Outcome(task.key, failure=job_failure(job, exc),
                                          seconds=time.perf_counter() - started)
                    on_done(outcome)
                if slurm.cluster != "slurm":
                    submit(workers - len(jobs))
                if jobs:
                    time.sleep(POLL_SECONDS)
        except BaseException:
            for job in jobs:
                try:
                    job.cancel(check=False)   # a run's run.log says "interrupted" (local) or it is killed (scancel)
                except Exception:
                    pass
            deadline = time.monotonic() + INTERRUPT_GRACE
            while time.monotonic() < deadline and not all(safe_done(j) for j in jobs):
                time.sleep(0.2)
            raise


register_executor(SlurmExecutor())
