"""What every executor reports for a run, and how long it waits for interrupted runs: shared by ``launchers`` and
the executors it dispatches to (``slurm``), which must not import ``launchers`` back."""
from __future__ import annotations

from dataclasses import dataclass

INTERRUPT_GRACE = 10.0       # seconds interrupted workers get to close their runs before they are killed


@dataclass(frozen=True)
class LaunchResult:
    run_id: str
    status: str        # done, diverged, skipped, failed, busy (another launch is training it right now)
    seconds: float
    error: str = ""
