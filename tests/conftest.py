"""Suite-wide settings. The tests use tiny models, for which extra intra-op threads only add overhead (and, on a
loaded 2-core machine, spinning OpenMP threads slow everything down by orders of magnitude).

Tests that need an optional extra of setup.cfg carry its marker (``needs_ray``, ``needs_slurm``,
``needs_lightning``) and are skipped,
naming the extra, where it is not installed: ``make test`` installs only ``[dev]`` and must pass on a fresh clone.
CI then installs the extras and runs just these tests (``pytest -m "needs_ray or needs_slurm or needs_lightning"``,
.ci/run)."""
import importlib

import matplotlib
import pytest
import torch

matplotlib.use("Agg")


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


EXTRAS = {"needs_ray": ("ray", "ray"), "needs_slurm": ("slurm", "submitit"),   # marker: (extra, module it installs)
          "needs_lightning": ("lightning", "lightning")}


def _missing(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return True
    return False


def pytest_collection_modifyitems(config, items):
    missing = {}
    for item in items:
        for marker, (extra, module) in EXTRAS.items():
            if item.get_closest_marker(marker) is None:
                continue
            if module not in missing:
                missing[module] = _missing(module)
            if missing[module]:
                item.add_marker(pytest.mark.skip(reason=f"needs the {extra} extra ({module} is not installed): "
                                                        f"pip install -e '.[{extra}]'"))
