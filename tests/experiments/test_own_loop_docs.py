"""the own-loop tutorial's script (docs/tutorials/own-loop.md): it equals examples/own_loop.py, runs as written from
another folder (one pass, via SMOOTHNESS_QUICK=1), and `smoothness-lab plot` and `report` accept the run it wrote."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from experiments.cli import main
from experiments.data import DataError, load_dataset

ROOT = Path(__file__).parents[2]

try:
    load_dataset("fashion-mnist", subset=0.001, download=False)
    HAVE_FASHION = True
except DataError:
    HAVE_FASHION = False


def _script() -> str:
    doc = (ROOT / "docs" / "tutorials" / "own-loop.md").read_text()
    blocks = re.findall(r"<!-- own-loop script:.*?-->\n```python\n(.*?)```\n", doc, flags=re.DOTALL)
    assert len(blocks) == 1, ("docs/tutorials/own-loop.md must hold the script once, after its <!-- own-loop script "
                              "--> marker")
    return blocks[0]


def test_the_docs_script_is_examples_own_loop():
    assert _script() == (ROOT / "examples" / "own_loop.py").read_text()


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_FASHION, reason="real FashionMNIST not found offline: install Debian's "
                    "dataset-fashion-mnist or set SMOOTHNESS_DATA (CI installs it)")
def test_the_docs_script_runs_and_plot_and_report_read_its_run(tmp_path):
    (tmp_path / "own_loop.py").write_text(_script())
    env = {**os.environ, "SMOOTHNESS_QUICK": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "own_loop.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "smoothness-lab plot results/own-loop" in result.stdout
    study = tmp_path / "results" / "own-loop"
    for command in ("plot", "report"):
        out = CliRunner().invoke(main, ["-q", command, str(study)])
        assert out.exit_code == 0, out.output
    assert (study / "report.md").exists() and list((study / "figures").glob("*.png"))
