"""One way to rebuild a run (experiments.study): every command works on an import-string run (surface, spectrum,
per-layer, generalization), a tracked loop of one's own network is named after its class, gets its BN axis from its
layers and draws surfaces, and status lists the features that wrote records, one registered from outside too."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from experiments import features, plugins
from experiments.cli import main
from experiments.data import load_dataset
from experiments.features.generalization.table import study_table
from experiments.study import RebuildError, batch_normalised, rebuild
from experiments.tracker import Tracker, run_config

sys.path.insert(0, str(Path(__file__).parent))
from test_measurements import GRADNORM  # noqa: E402

MODULE = "rebuildfactories"
FACTORIES = '''
import torch
from torch import nn

class Blobs(torch.utils.data.Dataset):
    classes = ["a", "b", "c"]
    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.arange(n) % 3
        self.x = torch.randn(n, 1, 4, 4, generator=g) + self.y.view(-1, 1, 1, 1)
    def __len__(self):
        return len(self.y)
    def __getitem__(self, i):
        return self.x[i], int(self.y[i])

def data(n_train=120, n_test=40):
    return Blobs(n_train, 0), Blobs(n_test, 1)

def net_bn(input_shape, num_classes, width=6):
    return nn.Sequential(nn.Flatten(), nn.Linear(16, width), nn.BatchNorm1d(width), nn.ReLU(),
                         nn.Linear(width, num_classes))

class BNNet(nn.Module):
    """A network of one's own: no registered name describes it."""
    def __init__(self, width=8):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(784, width), nn.BatchNorm1d(width), nn.ReLU(),
                                  nn.Linear(width, 10))
    def forward(self, x):
        return self.body(x)
'''


@pytest.fixture
def user_module(user_module_from):
    return user_module_from(MODULE, FACTORIES).parent


def cli(*args):
    result = CliRunner().invoke(main, ["-q", *args])
    assert result.exit_code == 0, (args, result.output)
    return result.output


SURFACE = ["--grid", "3", "--samples", "20", "--executor", "serial"]


def test_every_command_works_on_an_import_string_run(user_module, tmp_path):
    results = tmp_path / "results"
    for lr in ("0.02", "0.04", "0.08"):   # Kendall τ needs at least 3 runs
        cli("train", "--results-dir", str(results), "--study", "own", "--model", f"{MODULE}:net_bn", "--dataset",
            f"{MODULE}:data", "--lr", lr, "--epochs", "2", "--batch-size", "20", "--subset", "1", "--probe-every",
            "0", "--sharpness-samples", "32", "--local-smoothness-samples", "32", "--per-layer", "--spectrum-every",
            "1", "--generalization-every", "1", "--generalization-samples", "32", "--device", "cpu")
    study = results / "own"
    runs = sorted(p for p in study.iterdir() if (p / "config.json").exists())
    assert len(runs) == 3
    # the network's normalisation, recorded at run start; the BN axis reads it
    assert json.loads((runs[0] / "code.json").read_text())["model"]["normalization"] == "batch"
    assert study_table(study)["bn"].tolist() == [True, True, True]
    cli("surface", str(runs[0]), *SURFACE)
    assert list((runs[0] / "surfaces").glob("*.npz"))
    cli("spectrum", str(study))
    cli("per-layer", str(study))
    cli("generalization", str(study), "--resamples", "100")
    assert (study / "spectrum.md").exists() and (study / "per_layer.md").exists()
    assert (study / "generalization.md").exists()
    built = rebuild(runs[0], "final")
    assert type(built.model).__name__ == "Sequential" and built.data.num_classes == 3
    assert torch.equal(built.model.state_dict()["1.weight"],
                       torch.load(runs[0] / "weights-final.pt", weights_only=True)["1.weight"])


def test_a_run_whose_code_is_not_importable_is_refused_in_one_line(user_module, tmp_path, monkeypatch):
    results = tmp_path / "results"
    cli("train", "--results-dir", str(results), "--study", "own", "--model", f"{MODULE}:net_bn", "--dataset",
        f"{MODULE}:data", "--epochs", "1", "--batch-size", "20", "--subset", "1", "--probe-every", "0",
        "--local-smoothness-samples", "32", "--device", "cpu")
    (run,) = (results / "own").iterdir()
    monkeypatch.syspath_prepend(str(tmp_path / "nowhere"))
    sys.modules.pop(MODULE, None)
    (user_module / f"{MODULE}.py").rename(user_module / "moved.py")
    plugins._user_splits.cache_clear()
    with pytest.raises(RebuildError, match="PYTHONPATH") as err:
        rebuild(run)
    assert "\n" not in str(err.value)


def test_a_tracked_network_of_ones_own_is_named_after_its_class(user_module, tmp_path):
    """The config names bn-convnet (as a Lightning run once had to); the network is BNNet: the run is BNNet's."""
    from rebuildfactories import BNNet
    data = load_dataset("synthetic", subset=0.05, seed=0)
    torch.manual_seed(0)
    model = BNNet(width=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    cfg = run_config(opt, model="bn-convnet", dataset="synthetic", batch_size=20, epochs=1, probe_every=0,
                     local_smoothness_samples=20, sharpness_samples=20, study="own-loop", seed=0)
    tracker = Tracker(tmp_path / "own-loop", model, F.cross_entropy, opt, train_data=(data.x_train, data.y_train),
                      test_data=(data.x_test, data.y_test), config=cfg, model_args={"width": 8})
    assert tracker.config.model == f"{MODULE}:BNNet" and tracker.config.model_args == {"width": 8}
    with tracker:
        for i in range(0, data.x_train.shape[0] - 19, 20):
            xb, yb = data.x_train[i:i + 20], data.y_train[i:i + 20]
            with tracker.step((xb, yb)) as s:
                opt.zero_grad()
                out = model(xb)
                loss = F.cross_entropy(out, yb)
                loss.backward()
                opt.step()
                s.record(loss, out)
        tracker.end_epoch()
    (run,) = (tmp_path / "own-loop").iterdir()
    assert run.name.startswith(f"{MODULE}.BNNet-lr0.05-s0-")
    info = json.loads((run / "tracker.json").read_text())
    assert info["model_label"] == "BNNet" and info["normalization"] == "batch"
    config = json.loads((run / "config.json").read_text())
    assert batch_normalised(config, run) is True
    cli("surface", str(run), *SURFACE)
    assert list((run / "surfaces").glob("*.npz"))
    assert "bn-convnet" not in cli("status", str(tmp_path / "own-loop"))


def test_status_lists_the_features_that_wrote_records_one_from_outside_too(tmp_path):
    features.register(GRADNORM)
    try:
        cli("train", "--model", "fc-tanh", "--dataset", "synthetic", "--subset", "0.08", "--epochs", "1",
            "--probe-every", "0", "--no-pass-sharpness", "--local-smoothness-samples", "64", "--device", "cpu",
            "--results-dir", str(tmp_path), "--study", "gn", "--gradnorm-every", "2")
        shown = cli("status", str(tmp_path / "gn"))
    finally:
        features.unregister("gradnorm")
    line = next(x for x in shown.splitlines() if x.startswith("fc-tanh"))
    listed = line.partition("features: ")[2].split(", ")
    assert "gradnorm" in listed and "evaluation" in listed and "probe" not in listed


def test_surface_works_on_an_image_folder_run(tmp_path):
    """The dataset of an imagefolder:PATH run is read from the folder (it was looked up by name: KeyError)."""
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 40), ("test", 20)):
        for i in range(n):
            folder = tmp_path / "tree" / split / f"class{i % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (torch.rand(28, 28, generator=g) * 128 + 127 * (i % 2)).to(torch.uint8)
            Image.fromarray(pixels.numpy(), mode="L").save(folder / f"{i:03d}.png")
    results = tmp_path / "results"
    cli("train", "--results-dir", str(results), "--study", "images", "--model", "mlp", "--dataset",
        f"imagefolder:{tmp_path / 'tree'}", "--epochs", "1", "--batch-size", "10", "--subset", "1", "--probe-every",
        "0", "--local-smoothness-samples", "20", "--sharpness-samples", "20", "--device", "cpu")
    (run,) = (results / "images").iterdir()
    cli("surface", str(run), *SURFACE)
    assert list((run / "surfaces").glob("*.npz"))
    assert rebuild(run).data.num_classes == 2
