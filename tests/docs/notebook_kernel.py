"""Run a notebook headless with nbclient on the interpreter running the tests (whatever kernelspecs exist), importing
this checkout's packages. ``python tests/docs/notebook_kernel.py NOTEBOOK...`` executes notebooks in place, with
their outputs: how the committed notebooks were run."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import nbclient
import nbformat
from jupyter_client import KernelManager
from jupyter_client.kernelspec import KernelSpec

ROOT = Path(__file__).resolve().parents[2]


class ThisPythonKernel(KernelManager):
    """A kernel on this interpreter, with this checkout first on its path."""

    @property
    def kernel_spec(self):
        return KernelSpec(argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                          display_name="test python", language="python",
                          env={"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                               "OMP_NUM_THREADS": "1", "MPLBACKEND": "module://matplotlib_inline.backend_inline"})


def execute(nb: nbformat.NotebookNode, km: KernelManager, timeout: int = 300) -> nbformat.NotebookNode:
    """Execute every cell of ``nb`` on the kernel of ``km`` (started on first use and left running, so that several
    notebooks share one kernel's start-up and imports); raises CellExecutionError at the first failing cell. The
    kernel's working directory is the one it was started in (``km.start_kernel(cwd=...)``)."""
    client = nbclient.NotebookClient(nb, km=km, timeout=timeout)
    client.execute()
    return nb


if __name__ == "__main__":
    km = ThisPythonKernel()
    km.start_kernel(cwd=str(ROOT / "notebooks"))
    try:
        for path in map(Path, sys.argv[1:]):
            nb = execute(nbformat.read(path, as_version=4), km)
            for cell in nb.cells:   # keep the committed notebooks free of run-to-run noise
                cell.metadata.pop("execution", None)
            nbformat.write(nb, path)
            print(f"executed {path}")
    finally:
        km.shutdown_kernel(now=True)
