"""Every study notebook runs headless, top to bottom, on the committed results it names (one shared kernel), draws
its figures, and writes nothing into results/."""
import hashlib
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
from notebook_kernel import ROOT, ThisPythonKernel, execute  # noqa: E402

STUDIES = ["fashion-mnist-bn", "lr-sweep", "edge-of-stability", "fashion-mnist-spectrum", "per-layer",
           "generalization", "own-resnet", "gradient-noise"]
SLOW = {"generalization"}   # its bootstrap (2,000 resamples x 11 measures) takes the longest


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode() + p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def kernel():
    km = ThisPythonKernel()
    km.start_kernel(cwd=str(ROOT / "notebooks"))
    yield km
    km.shutdown_kernel(now=True)


def test_every_committed_study_has_a_notebook_and_the_site_lists_it():
    # a study is committed once its report is (a study folder of runs still being made has none yet)
    committed = {p.name for p in (ROOT / "results").iterdir()
                 if (p / "study.json").exists() and (p / "report.md").exists()}
    covered = set(STUDIES) | {"fashion-mnist-bn-confirm"}   # read by the main study's notebook
    assert committed <= covered, f"studies without a notebook: {sorted(committed - covered)}"
    nav = (ROOT / "mkdocs.yml").read_text()
    for study in STUDIES:
        assert f"notebooks/{study}.ipynb" in nav


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::ResourceWarning",
                            "ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("study", [pytest.param(s, marks=pytest.mark.slow) if s in SLOW else s for s in STUDIES])
def test_the_notebook_runs_on_the_committed_results_and_writes_nothing_there(study, kernel):
    path = ROOT / "notebooks" / f"{study}.ipynb"
    committed = nbformat.read(path, as_version=4)
    first = committed.cells[1]
    assert "parameters" in first.metadata.get("tags", []) and f'"../results/{study}"' in first.source
    assert all(c.outputs for c in committed.cells[2:] if c.cell_type == "code" and c.source.strip()), \
        f"commit {path.name} with its outputs: python tests/docs/notebook_kernel.py notebooks/{path.name}"
    before = _digest(ROOT / "results" / study)
    nb = execute(nbformat.read(path, as_version=4), kernel)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 1
    assert _digest(ROOT / "results" / study) == before
