"""The documentation site builds with ``mkdocs build --strict`` (skipped, saying so, where the docs extra is not
installed), and --strict with this project's configuration fails on a broken link and on an API object that no
longer exists, also when only cross-referenced (docs/hooks.py lets only the docstrings' math in brackets through)."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("mkdocs", "material",
                                                                                  "mkdocstrings_handlers.python",
                                                                                  "mkdocs_click", "mkdocs_jupyter")),
                                reason="needs the docs extra (mkdocs is not installed): pip install -e '.[docs]'")


def _mkdocs(*args, cwd=ROOT):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_the_site_builds_strictly(tmp_path):
    out = _mkdocs("--site-dir", str(tmp_path / "site"))
    assert out.returncode == 0, out.stderr[-4000:]
    site = tmp_path / "site"
    cli = (site / "reference" / "cli" / "index.html").read_text()
    assert all(f"smoothness-lab {c}" in cli for c in ("run", "sweep", "train", "spectrum", "surface", "per-layer"))
    assert "--probe-every" in cli                                     # generated from the click options
    api = (site / "reference" / "api" / "index.html").read_text()
    assert 'id="smoothness.top_eigenvalues"' in api and 'id="smoothness.line_probe"' in api
    assert (site / "notebooks" / "fashion-mnist-bn" / "index.html").exists()
    speed = (site / "explanation" / "speed" / "index.html").read_text()
    assert "bench_eigensolvers.py" in speed                           # the benchmark tables are included
    from experiments.presets import PRESETS
    presets = (site / "reference" / "presets" / "index.html").read_text()
    assert "&lt;!-- presets --&gt;" not in presets and "<!-- presets -->" not in presets
    assert all(f"<code>{name}</code>" in presets for name in PRESETS)  # generated from experiments.presets


@pytest.mark.slow
@pytest.mark.parametrize("page, complaint", [
    ("See [the report](no-such-page.md).\n", "no-such-page.md"),
    ("::: smoothness.no_such_estimator\n", "smoothness.no_such_estimator"),
    ("::: smoothness.line_probe\n\nSee [it][smoothness.no_such_estimator].\n", "smoothness.no_such_estimator"),
])
def test_strict_fails_on_a_broken_link_and_on_a_vanished_api_object(tmp_path, page, complaint):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text("# Home\n\n" + page)
    (tmp_path / "mkdocs.yml").write_text(f"INHERIT: {ROOT / 'mkdocs.yml'}\ndocs_dir: {docs}\n"
                                         f"hooks: [{ROOT / 'docs' / 'hooks.py'}]\nnav: [index.md]\n")
    out = _mkdocs("-f", str(tmp_path / "mkdocs.yml"), "--site-dir", str(tmp_path / "site"), cwd=ROOT)
    assert out.returncode != 0 and complaint in out.stderr, out.stderr[-3000:]
