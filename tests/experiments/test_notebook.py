"""notebooks/analysis.ipynb runs headless, top to bottom, on a small fake study."""
import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
from jupyter_client import KernelManager  # noqa: E402
from jupyter_client.kernelspec import KernelSpec  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from fake_results import make_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "notebooks" / "analysis.ipynb"


class ThisPythonKernel(KernelManager):
    """A kernel on the interpreter running the tests, whatever kernelspecs (if any) are installed."""

    @property
    def kernel_spec(self):
        return KernelSpec(argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                          display_name="test python", language="python")


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::ResourceWarning",
                            "ignore::pytest.PytestUnraisableExceptionWarning")
def test_notebook_executes(tmp_path, monkeypatch):
    study = make_results(tmp_path, seeds=(0, 1), epochs=2, diverged=[("convnet", 1)])
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert "parameters" in nb.cells[0].metadata.get("tags", [])
    assert "RESULTS_DIR" in nb.cells[0].source
    nb.cells[0].source = f"RESULTS_DIR = {str(study.path)!r}"
    # The kernel must import this checkout's `experiments`, installed or not.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    km = ThisPythonKernel()
    client = nbclient.NotebookClient(nb, km=km, timeout=180, resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    try:
        client.execute()  # raises CellExecutionError if any cell errors
    finally:  # nbclient leaves a kernel manager it was handed running
        if km.has_kernel:
            km.shutdown_kernel(now=True)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 3
    assert any("text/markdown" in o.get("data", {}) for o in outputs)
    assert (study.path / "report.md").exists() and (study.path / "figures" / "santurkar_fig4.pdf").exists()
