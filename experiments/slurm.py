"""``--executor slurm``: one SLURM job per run, submitted and followed through submitit.

Every job calls the same ``launchers.execute`` as the other executors (handed to ``launch_slurm`` as ``task``), with
the same config and thread count, so its records are identical to theirs (tests/experiments/test_slurm.py compares
them with the serial executor's).
What the cluster must provide: the results directory and the dataset on a file system every node sees, and this
package importable by the job's Python (submitit runs the jobs with the launcher's interpreter, ``sys.executable``,
and SLURM passes the launcher's environment on, so an installed package or a PYTHONPATH both work).

A job cut off by its time limit or by preemption is not lost: SLURM signals it (USR2, 90 s ahead) and submitit
calls ``_RunJob.checkpoint``, which requeues the run with ``resume=True``; the requeued job continues from the run's
last checkpoint (after 3 time-outs submitit gives up and the run is reported failed). ``cluster="local"`` runs the
jobs as processes on this machine through submitit's local executor: the way to try a cluster launch (and to test
it) without a cluster.

The launcher follows the jobs (``job.done()``) and shows progress from each run's records file, since a job on
another node cannot send progress to it. Ctrl-C or SIGTERM cancels the jobs it submitted (``scancel``); killing
the launcher with SIGKILL leaves them running on the cluster. Submitit's job scripts and logs go to
``<study>/.slurm/`` (or ``log_dir``), named by job id.
"""
from __future__ import annotations

import collections
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

from .config import ConfigError
from .launch_result import INTERRUPT_GRACE, LaunchResult

try:   # the `slurm` extra; without it, --executor slurm says how to install it
    import submitit
    _Checkpointable = submitit.helpers.Checkpointable
except ImportError:   # pragma: no cover - submitit is installed in CI
    submitit = None
    _Checkpointable = object

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


def _import_submitit():
    if submitit is None:
        raise ConfigError("--executor slurm needs submitit: pip install 'smoothness-lab[slurm]' "
                          "(or pip install 'submitit>=1.5')")
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
    _import_submitit()
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


def check_runs(runs, options: SlurmOptions) -> None:
    """A run asking for CUDA needs a GPU in its job."""
    cuda = sorted({cfg.device for cfg in runs if str(cfg.device).startswith("cuda")})
    if cuda and options.gpus < 1:
        raise ConfigError(f"--device {cuda[0]} needs a GPU in every job: add --slurm-gpus 1 (or use --device auto, "
                          f"which uses CUDA where the job has a GPU)")


def make_executor(options: SlurmOptions, folder: Path, threads: int, workers: int):
    """The submitit executor for these options (job scripts, pickles and logs go to ``folder/<job id>_*``)."""
    _import_submitit()
    executor = submitit.AutoExecutor(folder=str(folder), cluster=options.cluster)
    params = dict(name="smoothness-lab", timeout_min=options.time_min, cpus_per_task=options.cpus or threads,
                  gpus_per_node=options.gpus, tasks_per_node=1, nodes=1, mem_gb=options.mem_gb,
                  slurm_partition=options.partition, slurm_array_parallelism=workers)
    if options.sbatch:
        params["slurm_additional_parameters"] = dict(options.sbatch)
    executor.update_parameters(**params)
    return executor


class _RunJob(_Checkpointable):
    """One run as a submitit job. On a time-out or preemption submitit calls ``checkpoint``: the run is requeued
    with ``resume=True`` and continues from its last checkpoint."""

    def __init__(self, task):
        self.task = task   # launchers.execute, handed over so that this module need not import launchers

    def __call__(self, cfg_dict, root, resume, data_dir, threads):
        return self.task(cfg_dict, root, resume, data_dir, threads)

    def checkpoint(self, cfg_dict, root, resume, data_dir, threads):
        return submitit.helpers.DelayedSubmission(self, cfg_dict, root, True, data_dir, threads)


def _progress(run_dir: Path) -> Optional[int]:
    """Steps a run has recorded so far (from the last complete line of its records), None before it starts."""
    from .store import last_record   # store imports torch; the launcher process need not
    record = last_record(run_dir)
    step = record.get("step") if isinstance(record, dict) else None
    if not isinstance(step, int):
        return None
    return step + 1 if record.get("kind") in ("step", "probe") else step


def _job_failure(job, exc: BaseException) -> str:
    message = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    try:
        log = f" (job log: {job.paths.stderr})"
    except Exception:   # pragma: no cover - a job without paths
        log = ""
    return f"SLURM job {job.job_id} ended without a result: {type(exc).__name__}: {message}{log}"


def launch_slurm(args, display, finished, workers: int, threads: int, options: SlurmOptions, root: Path,
                 totals: Dict[str, int], task) -> None:
    """Submit one job per run and follow them until each has given a result (through ``finished``). On a cluster
    every job is submitted at once as a job array (``workers`` at a time); the local executor starts a job's
    process at submission, so there at most ``workers`` are submitted at a time. ``task``: what a job runs,
    ``launchers.execute``."""
    from .config import RunConfig
    _import_submitit()
    executor = make_executor(options, options.log_dir or Path(root) / ".slurm", threads, workers)
    pending = collections.deque((RunConfig.from_dict(a[0]).run_id, a) for a in args)
    jobs: Dict[object, Tuple[str, float]] = {}

    def submit(n: int) -> None:
        chunk = [pending.popleft() for _ in range(min(n, len(pending)))]
        if not chunk:
            return
        try:
            with executor.batch():
                submitted = [executor.submit(_RunJob(task), *a) for _, a in chunk]
        except Exception as exc:
            raise ConfigError(f"could not submit to the {options.cluster} cluster: {type(exc).__name__}: "
                              f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") from None
        for job, (run_id, _) in zip(submitted, chunk):
            jobs[job] = (run_id, time.perf_counter())

    try:
        submit(len(pending) if options.cluster == "slurm" else workers)
        while jobs:
            for job, (run_id, started) in list(jobs.items()):
                steps = _progress(Path(root) / run_id)
                if steps is not None:
                    display.update(run_id, min(steps, totals.get(run_id, steps)), totals.get(run_id, steps))
                if not job.done():
                    continue
                del jobs[job]
                try:
                    result = job.result()
                except (submitit.core.utils.UncompletedJobError, submitit.core.utils.FailedJobError,
                        OSError) as exc:
                    result = LaunchResult(run_id, "failed", time.perf_counter() - started, _job_failure(job, exc))
                finished(result)
            if options.cluster != "slurm":
                submit(workers - len(jobs))
            if jobs:
                time.sleep(POLL_SECONDS)
    except BaseException:
        for job in jobs:
            try:
                job.cancel(check=False)   # the run's run.log says "interrupted" (local) or it is killed (scancel)
            except Exception:
                pass
        deadline = time.monotonic() + INTERRUPT_GRACE
        while time.monotonic() < deadline and not all(_safe_done(j) for j in jobs):
            time.sleep(0.2)
        raise


def _safe_done(job) -> bool:
    try:
        return job.done()
    except Exception:
        return True
