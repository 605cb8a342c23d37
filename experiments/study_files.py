"""The study folder's own JSON files, apart from its run directories (which only `experiments.store` reads):
``study.json`` (every grid launched into the folder), ``launch.json`` (how each launch ran) and the sweep files
a user passes to ``smoothness-lab sweep --sweep-file``."""
from __future__ import annotations

import json
from pathlib import Path

STUDY_JSON, LAUNCH_JSON = "study.json", "launch.json"


def read_json(path: Path):
    """The JSON value in ``path``; OSError when it cannot be read, ValueError when it is not UTF-8 JSON."""
    return json.loads(Path(path).read_text(encoding="utf-8"))
