"""The run ids of the committed results: every run directory under results/ is named by the hash of its config, so
a change of hashing (a new option, a new default, another canonical form) that would orphan them fails here, loudly,
with the run it broke."""
import json
from pathlib import Path

import pytest

from experiments.store import read_config

RESULTS = Path(__file__).resolve().parents[2] / "results"
CONFIGS = sorted(RESULTS.glob("*/*/config.json"))


def test_results_hold_committed_runs():
    assert len(CONFIGS) >= 40, f"expected the committed studies' run directories under {RESULTS}"


@pytest.mark.parametrize("path", CONFIGS, ids=[f"{p.parent.parent.name}/{p.parent.name}" for p in CONFIGS])
def test_committed_run_id_is_recomputed_from_its_config(path):
    cfg = read_config(path)      # also refuses a file whose run_id or config_hash disagrees with its options
    saved = json.loads(path.read_text())
    assert cfg.run_id == path.parent.name, f"{path}: the options now hash to {cfg.run_id}"
    assert (saved["run_id"], saved["config_hash"]) == (cfg.run_id, cfg.config_hash)
