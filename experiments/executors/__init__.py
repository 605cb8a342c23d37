"""The executor registry: one object per way of running a list of tasks (``base.Executor``), found by name.

Sweeps (``launchers.launch``; the Hessian spectra are measured inside training runs, so they launch as sweeps do)
and loss surfaces (``surface.compute_surfaces``) run their work through ``run_tasks``; the CLI's ``--executor``
choices are the registry's names. Built in: ``serial``, ``process``, ``ray``, ``slurm`` (one module each).
"""
from experiments.executors import serial  # noqa: F401, I001  (each module registers its executor; this order is the CLI's order)
from experiments.executors import process  # noqa: F401
from experiments.executors import ray  # noqa: F401
from experiments.executors import slurm  # noqa: F401
from experiments.executors.base import (EXECUTORS, INTERRUPT_GRACE, Executor, ExecutorOptions, Outcome, Task, check_executor,
                   default_workers, get_executor, register_executor, run_tasks)

__all__ = ["EXECUTORS", "INTERRUPT_GRACE", "Executor", "ExecutorOptions", "Outcome", "Task", "check_executor",
           "default_workers", "get_executor", "register_executor", "run_tasks"]
