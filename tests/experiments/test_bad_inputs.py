"""Inputs a run cannot use are one-line errors before anything is written: image folders (16-bit pixels, files that
are not regular files), non-finite inputs, models that cannot train (no trainable parameters, a failing train-mode
pass, BatchNorm on one input, no nn.Linear for --generalization-every, the wrong image shape for a built-in model), a
single class, and resuming a run whose model changed shape."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from experiments import imagefolder, plugins
from experiments.cli import main
from experiments.config import RunConfig, StudyConfig
from experiments.tracker import Tracker, run_config
from experiments.training import train_run

REPO = Path(__file__).resolve().parents[2]
MODULE = "badfactories"

FACTORIES = '''
import os

import torch
from torch import nn

class Blobs(torch.utils.data.Dataset):
    """n inputs of `shape` in `n_classes` classes; `bad` is written into item 1's first value."""
    def __init__(self, n, seed, shape=(1, 4, 4), n_classes=3, bad=None):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.arange(n) % n_classes
        self.x = torch.randn(n, *shape, generator=g) + self.y.view(-1, *[1] * len(shape))
        if bad is not None:
            self.x.view(n, -1)[1, 0] = bad
        self.classes = [str(c) for c in range(n_classes)]
    def __len__(self):
        return len(self.y)
    def __getitem__(self, i):
        return self.x[i], int(self.y[i])

def data():
    return Blobs(200, 0), Blobs(60, 1)

def nan_train():
    return Blobs(200, 0, bad=float("nan")), Blobs(60, 1)

def inf_test():
    return Blobs(200, 0), Blobs(60, 1, bad=float("inf"))

def huge_float64():   # finite in float64, inf once read as float32
    train, test = Blobs(200, 0), Blobs(60, 1)
    train.x = train.x.double()
    train.x[5, 0, 0, 0] = 1e300
    return train, test

def one_class():
    return Blobs(200, 0, n_classes=1), Blobs(60, 1, n_classes=1)

def rgb32():
    return Blobs(200, 0, shape=(3, 32, 32)), Blobs(60, 1, shape=(3, 32, 32))

def grey16():
    return Blobs(200, 0, shape=(1, 16, 16)), Blobs(60, 1, shape=(1, 16, 16))

WIDTH = int(os.environ.get('BAD_FACTORIES_WIDTH', 8))   # the same code, another shape

def net(input_shape, num_classes, width=None):
    return nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(input_shape).prod()), width or WIDTH), nn.ReLU(),
                         nn.Linear(width or WIDTH, num_classes))

class NoParameters(nn.Module):
    def __init__(self, k):
        super().__init__()
        self.k = k
    def forward(self, x):
        return x.flatten(1)[:, :self.k]

def no_parameters(input_shape, num_classes):
    return NoParameters(num_classes)

def frozen(input_shape, num_classes):
    model = net(input_shape, num_classes)
    for p in model.parameters():
        p.requires_grad_(False)
    return model

class TrainModeFails(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
    def forward(self, x):
        if self.training:
            raise RuntimeError("this layer breaks in train mode")
        return self.inner(x)

def train_mode_fails(input_shape, num_classes):
    return TrainModeFails(net(input_shape, num_classes))

class ConvOnly(nn.Module):
    def __init__(self, channels, k):
        super().__init__()
        self.conv = nn.Conv2d(channels, k, 3, padding=1)
    def forward(self, x):
        return self.conv(x).mean((2, 3))

def conv_only(input_shape, num_classes):
    return ConvOnly(input_shape[0], num_classes)

def batchnorm(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, num_classes))
'''


@pytest.fixture
def user_module(user_module_from):
    """The factories above, importable as `badfactories` (as PYTHONPATH would make them), fresh for every test."""
    return user_module_from(MODULE, FACTORIES)


TINY = ["--epochs", "1", "--batch-size", "20", "--probe-every", "0", "--subset", "1", "--device", "cpu"]


def _train(tmp_path, *args):
    return CliRunner().invoke(main, ["-q", "train", "--results-dir", str(tmp_path / "results"), *TINY, *args])


def _refused(result, tmp_path, *needles) -> str:
    """The command failed with one line holding every needle, and left no results folder."""
    message = result.output.strip()
    assert result.exit_code != 0, message
    assert all(n in message for n in needles) and "Traceback" not in message, message
    assert len(message.splitlines()) == 1, message
    assert not (tmp_path / "results").exists(), message
    return message


# -- image folders: every pixel at its real depth; only regular files are opened ----------------------------------
def _png_tree(root: Path, images: dict) -> None:
    """images: {"train/a/0.png": PIL image, ...}"""
    for name, image in images.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        image.save(root / name)


def _grey16(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 65536, size=(6, 5), dtype=np.uint16)


def test_16_bit_greyscale_pngs_are_read_at_16_bits(tmp_path):
    from PIL import Image
    arrays = {f"{split}/{c}/{i}.png": _grey16(hash((split, c, i)) % 1000)
              for split in ("train", "test") for c in ("a", "b") for i in range(3)}
    _png_tree(tmp_path / "tree", {k: Image.fromarray(v) for k, v in arrays.items()})
    assert Image.open(tmp_path / "tree/train/a/0.png").mode == "I;16"
    x_train, y_train, x_test, *_, info, _ = imagefolder.load_imagefolder(str(tmp_path / "tree"), {})
    assert x_train.shape == (6, 1, 6, 5) and info["mode"] == "L" and info["pixels"] == "uint16 / 65535"
    want = torch.stack([torch.from_numpy(arrays[f"train/{c}/{i}.png"].astype(np.float64) / 65535)
                        for c in ("a", "b") for i in range(3)]).unsqueeze(1).float()
    assert torch.allclose(x_train, want, rtol=0, atol=1e-7)   # not clipped: before, 99.5% of such pixels read as 1.0
    assert (x_train == 1).float().mean() < 0.01
    resized = imagefolder.load_imagefolder(str(tmp_path / "tree"), {"size": 3})[0]
    assert resized.shape == (6, 1, 3, 3) and 0.2 < resized.mean() < 0.8


def test_16_bit_grey_among_8_bit_rgb_keeps_both_scales(tmp_path):
    from PIL import Image
    rgb = np.full((6, 5, 3), 51, dtype=np.uint8)   # 51 / 255 = 0.2
    grey = np.full((6, 5), 13107, dtype=np.uint16)  # 13107 / 65535 = 0.2
    _png_tree(tmp_path / "tree", {"train/a/0.png": Image.fromarray(rgb), "train/b/0.png": Image.fromarray(grey),
                                  "test/a/0.png": Image.fromarray(grey)})
    x_train, *_, info, _ = imagefolder.load_imagefolder(str(tmp_path / "tree"), {"standardise": False})
    assert x_train.shape == (2, 3, 6, 5) and info["mode"] == "RGB"
    assert torch.allclose(x_train, torch.full_like(x_train, 0.2))


@pytest.mark.parametrize("mode, suffix", [("F", "tif"), ("I", "tif")])
def test_images_without_a_fixed_range_are_refused_naming_mode_and_file(tmp_path, mode, suffix):
    from PIL import Image
    odd = Image.fromarray(np.ones((4, 4), dtype=np.float32 if mode == "F" else np.int32))
    assert odd.mode == mode
    grey = Image.new("L", (4, 4))
    _png_tree(tmp_path / "tree", {"train/a/0.png": grey, "train/b/0.png": grey, f"train/b/1.{suffix}": odd,
                                  "test/a/0.png": grey})
    _refused(_train(tmp_path, "--model", "mlp", "--dataset", f"imagefolder:{tmp_path / 'tree'}", "--batch-size", "2"),
             tmp_path, f"train/b/1.{suffix}", f"PIL mode {mode}")


def test_a_fifo_named_like_an_image_is_never_opened(tmp_path):
    """Opening a FIFO blocks until a writer comes: the folder is refused, naming it, without opening it."""
    from PIL import Image
    grey = Image.new("L", (4, 4))
    _png_tree(tmp_path / "tree", {"train/a/0.png": grey, "train/b/0.png": grey, "test/a/0.png": grey})
    os.mkfifo(tmp_path / "tree" / "train" / "a" / "1.png")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    try:
        done = subprocess.run([sys.executable, "-m", "experiments.cli", "-q", "train", "--results-dir",
                               str(tmp_path / "results"), "--model", "mlp", "--dataset",
                               f"imagefolder:{tmp_path / 'tree'}", *TINY, "--batch-size", "2"],
                              capture_output=True, text=True, env=env, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("the launch blocked on the FIFO")
    message = done.stderr.strip()
    assert done.returncode != 0 and len(message.splitlines()) == 1, message
    assert f"{tmp_path / 'tree' / 'train' / 'a' / '1.png'} is not a regular file (a FIFO)" in message, message
    assert not (tmp_path / "results").exists()


# -- non-finite inputs ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("factory, needles", [
    ("nan_train", ("the training set's inputs hold 1 non-finite value (NaN or inf), the first in item 1",)),
    ("inf_test", ("the test set's inputs hold 1 non-finite value (NaN or inf), the first in item 1",)),
    ("huge_float64", ("the training set's inputs hold 1 non-finite value", "item 5", "float32")),
])
def test_non_finite_inputs_are_refused_before_the_run_folder_exists(user_module, tmp_path, factory, needles):
    _refused(_train(tmp_path, "--model", f"{MODULE}:net", "--dataset", f"{MODULE}:{factory}"), tmp_path,
             f"--dataset {MODULE}:{factory}", *needles)
    _refused(_train(tmp_path, "--model", "mlp", "--dataset", f"{MODULE}:{factory}"), tmp_path, *needles)


# -- models that cannot train on the data -------------------------------------------------------------------------
D = f"{MODULE}:data"
MISTAKES = {
    "no parameters": (["--model", f"{MODULE}:no_parameters", "--dataset", D],
                      ("has no parameters: nothing to train",)),
    "every parameter frozen": (["--model", f"{MODULE}:frozen", "--dataset", D],
                               ("every one of its 4 parameters is frozen (requires_grad=False)",)),
    "forward fails in train mode": (["--model", f"{MODULE}:train_mode_fails", "--dataset", D],
                                    ("in train mode (model.train())", "RuntimeError: this layer breaks in train "
                                     "mode")),
    "generalization without nn.Linear": (["--model", f"{MODULE}:conv_only", "--dataset", D,
                                          "--generalization-every", "1"],
                                         ("--generalization-every", "has no nn.Linear layer")),
    "user BatchNorm model, batch of 1": (["--model", f"{MODULE}:batchnorm", "--dataset", D, "--batch-size", "1"],
                                         ("normalises with batch statistics", "--batch-size 1",
                                          "use --batch-size 2 or more")),
    "built-in BatchNorm model, batch of 1": (["--model", "bn-mlp", "--dataset", D, "--batch-size", "1"],
                                             ("--model bn-mlp normalises with batch statistics", "--batch-size 1")),
    "convnet on 3x32x32": (["--model", "convnet", "--dataset", f"{MODULE}:rgb32"],
                           ("--model convnet cannot take the inputs of --dataset", "(3, 32, 32)", "expects inputs of shape (28, 28) (height, width")),
    "convnet on 1x16x16": (["--model", "convnet", "--dataset", f"{MODULE}:grey16"], ("(1, 16, 16)",)),
    "lenet5 on 1x16x16": (["--model", "lenet5", "--dataset", f"{MODULE}:grey16"], ("expects inputs of shape "
                                                                                 "(3, 32, 32)", "(1, 16, 16)")),
    "vgg11 on 1x16x16": (["--model", "vgg11", "--dataset", f"{MODULE}:grey16"], ("(1, 16, 16)",)),
    "one class, user model": (["--model", f"{MODULE}:net", "--dataset", f"{MODULE}:one_class"],
                              ("the training set holds a single class (label 0, all 200 items)", "at least two classes")),
    "one class, built-in model": (["--model", "mlp", "--dataset", f"{MODULE}:one_class"], ("a single class",)),
}


@pytest.mark.parametrize("mistake", MISTAKES)
def test_a_model_that_cannot_train_is_refused_before_anything_is_written(mistake, user_module, tmp_path):
    args, needles = MISTAKES[mistake]
    _refused(_train(tmp_path, *args), tmp_path, *needles)


def test_an_image_folder_of_one_class_is_refused(tmp_path):
    from PIL import Image
    _png_tree(tmp_path / "tree", {f"{s}/only/{i}.png": Image.new("L", (4, 4), i) for s in ("train", "test")
                                  for i in range(4)})
    _refused(_train(tmp_path, "--model", "mlp", "--dataset", f"imagefolder:{tmp_path / 'tree'}", "--batch-size",
                    "2"), tmp_path, "a single class")


def test_a_study_checks_every_batch_size_of_its_grid(user_module, tmp_path):
    """A study axis (as the generalization preset's) can give --batch-size 1 to some runs of a model only: those
    are checked too, before anything is written."""
    import click
    from experiments.cli import run_study
    base = RunConfig(dataset=D, subset=1.0, epochs=1, probe_every=0, device="cpu", study="bs")
    study = StudyConfig(name="bs", models=(f"{MODULE}:batchnorm",), lrs=(0.1,), seeds=(0,), base=base,
                        axes=(("batch_size", (20, 1)),))
    with pytest.raises(click.ClickException) as info:
        run_study(study, results_dir=tmp_path / "results", data_dir=None, executor="serial", workers=None,
                  threads=None, ray_address=None, resume=False, figures=False, quiet=True)
    assert "--batch-size 1 gives it batches of one input" in info.value.message
    assert not (tmp_path / "results").exists()


def test_the_checks_pass_a_model_that_trains(user_module, tmp_path):
    """The same checks let a trainable BatchNorm model through, at a batch size of 2 (and a BatchNorm2d one at 1)."""
    assert _train(tmp_path, "--model", f"{MODULE}:batchnorm", "--dataset", D, "--batch-size", "2",
                  "--generalization-every", "1").exit_code == 0
    plugins.check_run(RunConfig(model="bn-convnet", dataset="synthetic", batch_size=1))


# -- resuming with a model of another shape ------------------------------------------------------------------------
def test_resuming_after_the_factory_changed_is_one_line_naming_it(user_module, tmp_path):
    cfg = RunConfig(model=f"{MODULE}:net", dataset=D, subset=1.0, epochs=1, batch_size=20, probe_every=0,
                    device="cpu", study="train")
    outcome = train_run(cfg, tmp_path / "results" / "train")
    (outcome.path / "done").unlink()      # killed just before `done`: resumable
    user_module.write_text(user_module.read_text() + "\n# edited\n")   # the factory's file changed
    sys.modules.pop(MODULE, None)
    result = _train(tmp_path, "--model", f"{MODULE}:net", "--dataset", D, "--resume")
    message = result.output.strip()
    assert result.exit_code != 0 and "changed since this run started" in message and str(user_module) in message


def test_resuming_with_a_model_of_another_shape_is_one_line(user_module, tmp_path, monkeypatch):
    cfg = RunConfig(model=f"{MODULE}:net", dataset=D, subset=1.0, epochs=1, batch_size=20, probe_every=0,
                    device="cpu", study="train")
    outcome = train_run(cfg, tmp_path / "results" / "train")
    (outcome.path / "done").unlink()      # killed just before `done`: resumable
    monkeypatch.setenv("BAD_FACTORIES_WIDTH", "12")   # the same code builds another shape (code.json cannot tell)
    sys.modules.pop(MODULE, None)
    result = _train(tmp_path, "--model", f"{MODULE}:net", "--dataset", D, "--resume")
    message = result.output.strip()
    assert result.exit_code != 0 and len(message.splitlines()) == 1, message
    assert "the weights in" in message and "do not fit the model" in message and "1.weight" in message, message
    assert "(12, 16)" in message and "(8, 16)" in message and "restore the model's code" in message, message
    assert "size mismatch" not in message      # not torch's load_state_dict text
    assert sorted(p.name for p in (outcome.path / "checkpoints").iterdir())   # the checkpoints are kept


# -- the Tracker: the same inputs through a user's own loop ----------------------------------------------------------
def _tracker(tmp_path, model, x, y, xt, yt, **fields):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1) if list(model.parameters()) else \
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    cfg = run_config(optimizer, study="own", model="mlp", dataset="mnist1d", batch_size=10, epochs=1, **fields)
    return Tracker(tmp_path / "results", model, torch.nn.functional.cross_entropy, optimizer, train_data=(x, y),
                   test_data=(xt, yt), config=cfg)


@pytest.mark.parametrize("case, needle", [
    ("nan train", "train_data's inputs hold 1 non-finite value (NaN or inf), the first in item 3"),
    ("inf test", "test_data's inputs hold 1 non-finite value (NaN or inf), the first in item 3"),
    ("no parameters", "the model has no parameters"),
    ("frozen", "every one of its 2 parameters is frozen"),
    ("one class", "train_data holds a single class (label 0, all 20 items)"),
    ("generalization without nn.Linear", "has no nn.Linear layer"),
])
def test_the_tracker_refuses_the_same_inputs_before_writing(tmp_path, case, needle):
    x, y = torch.randn(20, 4), torch.arange(20) % 2
    xt, yt = torch.randn(10, 4), torch.arange(10) % 2
    model, fields = torch.nn.Linear(4, 2), {}
    if case == "nan train":
        x[3, 1] = float("nan")
    elif case == "inf test":
        xt[3, 0] = float("inf")
    elif case == "no parameters":
        model = torch.nn.Flatten()
    elif case == "frozen":
        model.requires_grad_(False)
    elif case == "one class":
        y = torch.zeros(20, dtype=torch.int64)
    else:
        model, fields = torch.nn.Sequential(torch.nn.Unflatten(1, (1, 2, 2)), torch.nn.Conv2d(1, 2, 2),
                                            torch.nn.Flatten()), {"generalization_every": 1}
    with pytest.raises(ValueError) as info:
        _tracker(tmp_path, model, x, y, xt, yt, **fields)
    assert needle in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "results").exists()


def test_resuming_a_tracked_loop_with_a_model_of_another_shape_is_one_line(tmp_path):
    from experiments.store import StoreError
    x, y = torch.randn(20, 4), torch.arange(20) % 2

    def model(width, out=2):
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.ReLU(), torch.nn.Linear(width, out))

    # the same class and number of parameters (37), so tracker.json cannot tell them apart: the weights do
    tracker = _tracker(tmp_path, model(5), x, y, x[:10], y[:10], eval_every=1)
    tracker.resume()
    tracker.end_epoch()
    tracker.checkpoint()
    tracker.close_files()                       # interrupted after its checkpoint
    with pytest.raises(StoreError) as info:
        _tracker(tmp_path, model(2, out=9), x, y, x[:10], y[:10], eval_every=1).resume()
    message = str(info.value)
    assert "do not fit the model given to the Tracker (0.weight is (5, 4) there, (2, 4) in the model;" in message
    assert "\n" not in message and "size mismatch" not in message


def test_a_shuffled_pass_that_ends_on_one_image_is_a_batch_of_one(user_module):
    """7 images in batches of 2, shuffled: 4 steps a pass, the last on one image (training._Batches)."""
    cfg = RunConfig(model=f"{MODULE}:batchnorm", dataset=D, subset=0.035, batch_size=2, sampling="shuffle")
    assert len(plugins.load_run_dataset(cfg).x_train) == 7
    with pytest.raises(plugins.PluginError) as info:
        plugins.check_run(cfg)
    assert "--batch-size 2 with --sampling shuffle (the last batch of each pass holds one of the 7 images)" in \
        str(info.value)
    plugins.check_run(RunConfig(**{**cfg.to_dict(), "sampling": "replacement"}))
