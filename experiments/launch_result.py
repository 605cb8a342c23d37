"""What every run of a launch ends as: returned by ``launchers.execute`` (the task every executor runs) and by
``launchers.launch``."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LaunchResult:
    run_id: str
    status: str        # done, diverged, skipped, failed, busy (another launch is training it right now)
    seconds: float
    error: str = ""
