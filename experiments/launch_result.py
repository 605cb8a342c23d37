"""How a run ended, the one outcome type: returned by ``training.train_run``, by ``launchers.execute`` (the task
every executor runs) and by ``launchers.launch``."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional


@dataclass(frozen=True)
class RunOutcome:
    """``status`` is a `experiments.store.RunState` a launch reports: done, diverged, skipped (already finished),
    failed (``error`` says why) or busy (another launch is training it right now). ``steps``: the steps the run
    took (0 when it did not train); ``path``: its directory, where known."""
    run_id: str
    status: str
    seconds: float = 0.0
    steps: int = 0
    error: str = ""
    path: Optional[Path] = None
