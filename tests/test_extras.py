"""The README's test command (`make test`) installs only the [dev] extra, so on a fresh clone every test that needs
another extra must skip, naming it (issue 20 item 1: the `--executor slurm` cases failed without submitit); CI runs
that command as given, then installs the extras and runs just their tests, selected by marker."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def _pytest_without(module: str, *args: str) -> subprocess.CompletedProcess:
    """pytest in a fresh interpreter where ``import module`` fails, as on a machine without its extra."""
    code = f"import sys; sys.modules[{module!r}] = None; import pytest; sys.exit(pytest.main({list(args)!r}))"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("module, extra, args", [
    ("submitit", "slurm", ["tests/experiments/test_sweep_cli.py", "-k", "bad_options_fail_before_anything"]),
    ("ray", "ray", ["tests/experiments/test_sweep_cli.py", "tests/experiments/test_launchers.py", "-m", "needs_ray"]),
    ("lightning", "lightning", ["tests/experiments/test_lightning_callback.py"]),
])
def test_tests_that_need_an_extra_skip_naming_it_without_it(module, extra, args):
    result = _pytest_without(module, *args, "-q", "-rs", "-p", "no:cacheprovider")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert re.search(r"\b[1-9]\d* skipped", result.stdout), result.stdout[-2000:]
    assert f"needs the {extra} extra ({module} is not installed): pip install -e '.[{extra}]'" in result.stdout


def test_ci_runs_the_readme_test_command_then_only_the_extras_tests():
    conftest = (ROOT / "tests" / "conftest.py").read_text()
    markers = re.findall(r'"(needs_\w+)": \("(\w+)"', conftest)
    assert {m for m, _ in markers} == {"needs_ray", "needs_slurm", "needs_lightning"}
    setup = (ROOT / "setup.cfg").read_text()
    for marker, extra in markers:
        assert f"    {marker}: needs the {extra} extra" in setup      # registered, so pytest knows it
        assert f"\n{extra} =\n" in setup                               # and an extra of setup.cfg
    assert "\nmake test    # the test suite\n" in (ROOT / "README.md").read_text()
    makes = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.startswith("make ")]
    assert makes[0] == "make test"                                     # exactly the README's command, first
    extras_pass = makes[-1]
    assert extras_pass.startswith("make test EXTRAS=dev,ray,slurm,lightning ")
    assert '-m "needs_ray or needs_slurm or needs_lightning"' in extras_pass
