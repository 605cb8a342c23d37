"""Suite-wide settings. The tests use tiny models, for which extra intra-op threads only add overhead (and, on a
loaded 2-core machine, spinning OpenMP threads slow everything down by orders of magnitude)."""
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
