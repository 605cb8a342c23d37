"""Tests for experiments/data.py.

FashionMNIST tests use the real files (Debian's /usr/share/datasets/fashion-mnist or $SMOOTHNESS_DATA) and are
skipped when neither is there. MNIST, SVHN and CIFAR-10 cannot be downloaded in the test environment, so their code
paths run on fake torchvision classes returning small random uint8 arrays of the right per-image shapes and native
layouts (MNIST (n, 28, 28) tensor, SVHN (n, 3, 32, 32) array with `labels`, CIFAR-10 (n, 32, 32, 3) array).
Nothing here touches the network: every download is replaced by a fake.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import math
import random
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torchvision.datasets.mnist import read_image_file, read_label_file

from experiments import data
from experiments.data import DATASETS, DataError, Dataset, load_dataset, resolve_data_dir

FILES = list(data.FASHION_MNIST_FILES)


def _real_fashion_dir() -> Path | None:
    for candidate in (os.environ.get(data.ENV_VAR), "/usr/share/datasets/fashion-mnist"):
        if candidate and all((Path(candidate) / name).is_file() for name in FILES):
            return Path(candidate)
    return None


REAL_DIR = _real_fashion_dir()  # read before the autouse fixture clears the environment
needs_real = pytest.mark.skipif(
    REAL_DIR is None, reason="real FashionMNIST not installed: neither /usr/share/datasets/fashion-mnist "
    "(apt-get install dataset-fashion-mnist) nor $SMOOTHNESS_DATA holds the four .gz files")


@pytest.fixture(autouse=True)
def hermetic(tmp_path, monkeypatch):
    """No $SMOOTHNESS_DATA, an empty ./data, and any download attempt fails loudly."""
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    monkeypatch.chdir(tmp_path)

    def no_download(*args, **kwargs):
        raise AssertionError(f"test tried to reach torchvision: {args} {kwargs}")

    for name in ("FashionMNIST", "MNIST", "SVHN", "CIFAR10"):
        monkeypatch.setattr(torchvision.datasets, name, no_download)


def _link_files(target: Path, names=FILES) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        (target / name).symlink_to(REAL_DIR / name)
    return target


def _assert_standardised(x: torch.Tensor, tol: float = 1e-3):
    """Every channel (dim 1) has mean 0 and std 1 over all samples and positions."""
    per_channel = x.double().transpose(0, 1).reshape(x.shape[1], -1)
    assert per_channel.mean(dim=1).abs().max() < tol
    assert (per_channel.std(dim=1) - 1).abs().max() < tol


# ---------------------------------------------------------------------------------------------------------------
# FashionMNIST, real files

@needs_real
def test_fashion_mnist_real_shapes_labels_standardisation():
    ds = load_dataset("fashion-mnist", subset=0.1, seed=0, data_dir=str(REAL_DIR))
    assert isinstance(ds, Dataset)
    assert ds.x_train.shape == (6000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert ds.x_train.dtype == ds.x_test.dtype == torch.float32
    assert ds.y_train.dtype == ds.y_test.dtype == torch.int64
    assert ds.input_shape == (1, 28, 28) and ds.num_classes == 10
    counts = torch.bincount(ds.y_train, minlength=10)
    assert len(counts) == 10 and counts.min() > 500 and counts.max() < 700  # 600 each in expectation
    assert torch.equal(torch.bincount(ds.y_test), torch.full((10,), 1000))
    _assert_standardised(ds.x_train)
    assert abs(ds.x_test.mean().item()) < 0.05  # test set shares the training subset's statistics
    assert ds.info["n_train"] == 6000 and ds.info["n_train_full"] == 60000 and ds.info["seed"] == 0
    assert ds.info["path"] == str(REAL_DIR)
    assert [Path(f["path"]) for f in ds.info["files"]] == [REAL_DIR / name for name in FILES]


@needs_real
@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_test_inputs_stay_bounded_and_initial_test_loss_is_sane(seed):
    """Issue 9 §3: the seed's per-pixel (x - mean)/(std + 1e-6) multiplied pixels constant over the 6,000-image subset
    by ~1e6, giving test inputs up to |x| = 1.6e4 (subset seed 2) and a test loss of 173 at the end of training.
    Per-channel statistics bound every input by (1 - mean)/std, about 2.0 for FashionMNIST, whatever the subset."""
    from experiments.models import build_model

    ds = load_dataset("fashion-mnist", subset=0.1, seed=seed, data_dir=str(REAL_DIR))
    assert ds.x_test.abs().max() < 3.0 and ds.x_train.abs().max() < 3.0
    assert abs(ds.x_test.mean().item()) < 0.05 and 0.9 < ds.x_test.std().item() < 1.1
    for name in ("convnet", "bn-convnet"):
        torch.manual_seed(seed)
        model = build_model(name, input_shape=ds.input_shape, num_classes=10).eval()
        with torch.no_grad():
            loss = torch.nn.functional.cross_entropy(model(ds.x_test[:2000]), ds.y_test[:2000]).item()
        assert loss < 2 * math.log(10), (name, loss)  # chance is log(10) = 2.30 at initialisation


@needs_real
def test_fashion_mnist_parse_matches_torchvision_reader(tmp_path):
    """Our gzip+numpy idx parser against torchvision's own reader, on the (smaller) test split."""
    (x_train, y_train, x_test, y_test), _ = data._read_fashion_dir(str(REAL_DIR), data._fingerprint(REAL_DIR))
    for name, ours in (("t10k-images-idx3-ubyte", x_test[:, 0]), ("t10k-labels-idx1-ubyte", y_test)):
        raw = tmp_path / name
        raw.write_bytes(gzip.decompress((REAL_DIR / f"{name}.gz").read_bytes()))
        reference = read_image_file(str(raw)) if "images" in name else read_label_file(str(raw))
        assert torch.equal(ours, reference.to(ours.dtype))
    assert x_train.shape == (60000, 1, 28, 28) and x_train.dtype == torch.uint8 and y_train.shape == (60000,)


@needs_real
def test_fashion_mnist_subset_is_seeded():
    a = load_dataset("fashion-mnist", seed=0, data_dir=str(REAL_DIR))
    b = load_dataset("fashion-mnist", seed=0, data_dir=str(REAL_DIR))
    c = load_dataset("fashion-mnist", seed=1, data_dir=str(REAL_DIR))
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_train, b.y_train)
    assert not torch.equal(a.y_train, c.y_train)
    assert torch.equal(a.y_test, c.y_test)  # the test set is always whole


@needs_real
def test_fashion_mnist_md5_mismatch_names_the_file(tmp_path):
    bad = "train-labels-idx1-ubyte.gz"
    _link_files(tmp_path / "copy", [n for n in FILES if n != bad])
    corrupt = bytearray((REAL_DIR / bad).read_bytes())
    corrupt[len(corrupt) // 2] ^= 0xFF
    (tmp_path / "copy" / bad).write_bytes(bytes(corrupt))
    with pytest.raises(DataError) as error:
        load_dataset("fashion-mnist", data_dir=str(tmp_path / "copy"))
    message = str(error.value)
    assert bad in message and "md5" in message and data.FASHION_MNIST_FILES[bad] in message
    assert "download" in message and "reinstall" in message


@needs_real
def test_fashion_mnist_recompressed_archive_accepted_by_content_md5(tmp_path):
    """A re-gzipped archive (Debian's case) has another .gz md5 but the official content: accepted, and recorded."""
    name = "t10k-labels-idx1-ubyte.gz"
    _link_files(tmp_path / "regz", [n for n in FILES if n != name])
    content = gzip.decompress((REAL_DIR / name).read_bytes())
    (tmp_path / "regz" / name).write_bytes(gzip.compress(content, compresslevel=1, mtime=0))
    ds = load_dataset("fashion-mnist", data_dir=str(tmp_path / "regz"))
    record = next(f for f in ds.info["files"] if f["path"] == str(tmp_path / "regz" / name))
    assert record["verified_by"] == "md5 of decompressed idx"
    assert record["md5"] == hashlib.md5((tmp_path / "regz" / name).read_bytes()).hexdigest()
    assert torch.equal(torch.bincount(ds.y_test), torch.full((10,), 1000))


@needs_real
def test_fashion_mnist_torchvision_layout_and_env_var(tmp_path, monkeypatch):
    raw = _link_files(tmp_path / "tv" / "FashionMNIST" / "raw")
    ds = load_dataset("fashion-mnist", data_dir=str(tmp_path / "tv"))
    assert ds.info["path"] == str(raw) and ds.info["source"] == "files"
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path / "tv"))
    assert load_dataset("fashion-mnist").info["path"] == str(raw)


@needs_real
def test_fashion_mnist_falls_back_to_torchvision_download(tmp_path, monkeypatch):
    calls = []

    class FakeFashionMNIST:  # what torchvision's download leaves behind: <root>/FashionMNIST/raw/*.gz
        def __init__(self, root, train=True, download=False):
            calls.append((root, download))
            _link_files(Path(root) / "FashionMNIST" / "raw")

    monkeypatch.setattr(data, "SYSTEM_DATA_DIRS", ())
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", FakeFashionMNIST)
    ds = load_dataset("fashion-mnist", data_dir=str(tmp_path / "dl"))
    assert calls == [(str(tmp_path / "dl"), True)]
    assert ds.info["source"] == "torchvision download" and ds.x_train.shape == (6000, 1, 28, 28)


# ---------------------------------------------------------------------------------------------------------------
# FashionMNIST absent

def test_fashion_mnist_absent_error_lists_places_and_remedies(tmp_path, monkeypatch):
    """No folder chosen: ./data and the system folders are searched, and the error lists them and every remedy."""
    system = tmp_path / "no-system-copy"
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / FILES[1]).write_bytes(b"")  # a stray file: the message should say the folder is incomplete
    attempts = []

    def offline(root, train=True, download=False):
        attempts.append((root, download))
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(data, "SYSTEM_DATA_DIRS", (system,))
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    with pytest.raises(DataError) as error:
        load_dataset("fashion-mnist")
    message = str(error.value)
    for place in (tmp_path / "data", tmp_path / "data" / "FashionMNIST" / "raw", system,
                  system / "FashionMNIST" / "raw"):
        assert f"- {place}" in message
    for remedy in ("--data-dir", "SMOOTHNESS_DATA", "apt-get install dataset-fashion-mnist", "internet"):
        assert remedy in message
    assert "incomplete" in message and "does not exist" in message and "URLError" in message
    assert attempts == [(str(tmp_path / "data"), True)]

    attempts.clear()
    with pytest.raises(DataError, match="download=False"):
        load_dataset("fashion-mnist", download=False)
    assert attempts == []


def _offline_fashion(monkeypatch, attempts: list):
    def offline(root, train=True, download=False):
        attempts.append((root, download))
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)


@needs_real
@pytest.mark.parametrize("case, expected", [
    ("missing", "does not exist"),
    ("empty", "is empty"),
    ("three of four", "incomplete: missing t10k-labels-idx1-ubyte.gz"),
    ("stray files", "has none of the four files"),
])
def test_chosen_data_dir_without_the_dataset_is_an_error_not_a_fallback(tmp_path, monkeypatch, case, expected):
    """Issue 10 item 4: a --data-dir that does not hold FashionMNIST used to fall back silently to the system copy
    (exit 0, other files than asked for). Now it is an error saying what is missing there and what to do."""
    monkeypatch.setattr(data, "SYSTEM_DATA_DIRS", (_link_files(tmp_path / "system-copy"),))  # a complete copy
    chosen = tmp_path / "chosen"
    if case == "empty":
        chosen.mkdir()
    elif case == "three of four":
        _link_files(chosen, FILES[:3])
    elif case == "stray files":
        chosen.mkdir()
        (chosen / "README").write_text("not the data")
    attempts = []
    _offline_fashion(monkeypatch, attempts)
    with pytest.raises(DataError) as error:
        load_dataset("fashion-mnist", data_dir=str(chosen))
    message = str(error.value)
    assert f"--data-dir {chosen} does not hold FashionMNIST" in message and expected in message
    assert f"{chosen / 'FashionMNIST' / 'raw'}  (does not exist)" in message
    assert "leave out --data-dir" in message and "URLError" in message and "system-copy" not in message
    assert attempts == [(str(chosen), True)]  # the download goes to the chosen folder, nowhere else
    with pytest.raises(DataError, match="download=False"):
        load_dataset("fashion-mnist", data_dir=str(chosen), download=False)


@needs_real
def test_chosen_data_dir_that_is_a_file_is_refused_before_any_download(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "SYSTEM_DATA_DIRS", (_link_files(tmp_path / "system-copy"),))
    afile = tmp_path / "train-images-idx3-ubyte.gz"
    afile.symlink_to(REAL_DIR / FILES[0])
    attempts = []
    _offline_fashion(monkeypatch, attempts)
    with pytest.raises(DataError, match=f"--data-dir {afile} is a file, not a folder"):
        load_dataset("fashion-mnist", data_dir=str(afile))
    assert attempts == []
    monkeypatch.setattr(torchvision.datasets, "MNIST", _fake_class("MNIST", present_in=tmp_path))
    with pytest.raises(DataError, match="is a file, not a folder"):
        load_dataset("mnist", data_dir=str(afile))


@needs_real
def test_env_var_is_a_choice_too(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "SYSTEM_DATA_DIRS", (_link_files(tmp_path / "system-copy"),))
    _offline_fashion(monkeypatch, [])
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match=r"\$SMOOTHNESS_DATA .*nowhere does not hold FashionMNIST"):
        load_dataset("fashion-mnist")


@needs_real
def test_files_read_are_recorded_with_checksums(tmp_path):
    """Every run records which files it read and their md5 (the dataset info that training saves)."""
    chosen = _link_files(tmp_path / "chosen")
    info = load_dataset("fashion-mnist", subset=0.01, data_dir=str(chosen)).info
    assert info["path"] == str(chosen) and info["source"] == "files"
    assert [f["path"] for f in info["files"]] == [str(chosen / name) for name in FILES]
    for record in info["files"]:
        content = Path(record["path"]).read_bytes()
        assert record["md5"] == hashlib.md5(content).hexdigest() and record["bytes"] == len(content)
        assert record["verified_by"] in ("md5 of .gz", "md5 of decompressed idx")


@needs_real
def test_unreadable_data_file_is_a_one_line_error(tmp_path, monkeypatch):
    """Issue 10 item 6: a file that exists but cannot be read gave a PermissionError traceback. (Tests run as root,
    which reads anything, so the denial is simulated at Path.read_bytes, where the archives are read.)"""
    from click.testing import CliRunner

    from experiments.cli import main

    chosen = _link_files(tmp_path / "chosen")
    denied = chosen / FILES[2]
    real_read_bytes = Path.read_bytes

    def read_bytes(self):
        if self == denied:
            raise PermissionError(13, "Permission denied", str(self))
        return real_read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    with pytest.raises(DataError) as error:
        load_dataset("fashion-mnist", data_dir=str(chosen))
    message = str(error.value)
    assert message == (f"cannot read {denied}: Permission denied. Make it readable (e.g. chmod a+r, or run as a "
                       f"user who may read it) or pass --data-dir with a readable copy.")
    result = CliRunner().invoke(main, ["train", "--results-dir", str(tmp_path / "r"), "--data-dir", str(chosen)])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert result.output == f"Error: {message}\n"  # one line, no traceback


def test_resolve_data_dir_order(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "SYSTEM_DATA_DIRS", (Path("/sys-dir"),))
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path / "env"))
    assert resolve_data_dir(tmp_path / "arg") == [tmp_path / "arg"]  # a chosen folder is the only place
    assert resolve_data_dir(None) == [tmp_path / "env"]
    monkeypatch.delenv(data.ENV_VAR)
    assert resolve_data_dir(None) == [tmp_path / "data", Path("/sys-dir")]
    assert resolve_data_dir(None, include_system=False) == [tmp_path / "data"]
    monkeypatch.setattr(data, "SYSTEM_DATA_DIRS", (tmp_path / "data", Path("/sys-dir")))
    assert resolve_data_dir(None) == [tmp_path / "data", Path("/sys-dir")]  # no duplicates


# ---------------------------------------------------------------------------------------------------------------
# Generated datasets

def test_mnist1d_generated_locally_without_touching_global_rng():
    np_state, py_state = np.random.get_state()[1].copy(), random.getstate()
    full = load_dataset("mnist1d", subset=1.0)
    assert np.array_equal(np.random.get_state()[1], np_state) and random.getstate() == py_state
    assert full.x_train.shape == (4000, 1, 40) and full.x_test.shape == (1000, 1, 40)
    assert full.input_shape == (1, 40) and full.y_train.dtype == torch.int64
    assert set(full.y_train.tolist()) == set(range(10))
    assert full.info["source"] == "generated"
    _assert_standardised(full.x_train)
    part = load_dataset("mnist1d", subset=0.1, seed=3)
    assert part.x_train.shape == (400, 1, 40) and part.x_test.shape == (1000, 1, 40)


def test_synthetic_shapes_determinism_and_learnability():
    a = load_dataset("synthetic", subset=1.0, seed=0)
    b = load_dataset("synthetic", subset=1.0, seed=0)
    c = load_dataset("synthetic", subset=0.5, seed=1)
    assert a.x_train.shape == (2000, 1, 28, 28) and a.x_test.shape == (500, 1, 28, 28)
    assert c.x_train.shape == (1000, 1, 28, 28)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert torch.equal(torch.bincount(a.y_train), torch.full((10,), 200))
    _assert_standardised(a.x_train)
    # nearest class mean, fitted on train, far above chance (0.1) on test
    means = torch.stack([a.x_train[a.y_train == k].mean(0) for k in range(10)]).flatten(1)
    predicted = torch.cdist(a.x_test.flatten(1), means).argmin(1)
    assert (predicted == a.y_test).float().mean() > 0.6


def test_subset_size_rounds_and_is_at_least_one():
    assert load_dataset("synthetic", subset=0.25).x_train.shape[0] == 500
    tiny = load_dataset("synthetic", subset=1e-9)
    assert tiny.x_train.shape[0] == 1 and torch.isfinite(tiny.x_train).all() and torch.isfinite(tiny.x_test).all()


@pytest.mark.parametrize("subset", [0, -0.1, 1.5, float("nan"), "0.1", True])
def test_subset_outside_unit_interval_is_rejected(subset):
    with pytest.raises(ValueError, match="--subset"):
        load_dataset("synthetic", subset=subset)


def test_unknown_name_lists_the_choices():
    with pytest.raises(ValueError) as error:
        load_dataset("imagenet")
    for name in ("fashion-mnist", "mnist1d", "synthetic", "mnist", "mnist-32x3", "svhn", "cifar10"):
        assert name in str(error.value)
    assert set(DATASETS) == {"fashion-mnist", "mnist1d", "synthetic", "mnist", "mnist-32x3", "svhn", "cifar10"}


# ---------------------------------------------------------------------------------------------------------------
# Torchvision datasets on fakes (no download possible here)

N_TRAIN, N_TEST = 300, 100


def _fake_class(kind: str, present_in: Path | None = None, calls: list | None = None):
    """A stand-in for a torchvision dataset class with random uint8 data in its native layout. It 'finds' its files
    only under `present_in`, and downloading fails as it does offline."""
    generator = torch.Generator().manual_seed(0)
    shape = {"MNIST": (28, 28), "SVHN": (3, 32, 32), "CIFAR10": (32, 32, 3)}[kind]
    arrays = {split: (torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=generator),
                      torch.randint(0, 10, (n,), generator=generator))
              for split, n in (("train", N_TRAIN), ("test", N_TEST))}

    class Fake:
        def __init__(self, root, train=True, split=None, download=False):
            if calls is not None:
                calls.append((root, download))
            if download:
                raise urllib.error.URLError("no network")
            if present_in is None or Path(root) != present_in:
                raise RuntimeError("Dataset not found. You can use download=True to download it")
            images, labels = arrays[split or ("train" if train else "test")]
            if kind == "MNIST":
                self.data, self.targets = images, labels
            elif kind == "SVHN":
                self.data, self.labels = images.numpy(), labels.numpy()
            else:
                self.data, self.targets = images.numpy(), labels.tolist()

    Fake.arrays = arrays
    return Fake


def _expected(images: torch.Tensor, indices: torch.Tensor, test: torch.Tensor):
    """The naive pipeline: subset, float, per-channel (x - mean_c) / std_c with the subset's statistics."""
    train = images[indices].double()
    per_channel = train.transpose(0, 1).reshape(train.shape[1], -1)
    shape = (1, -1) + (1,) * (train.ndim - 2)
    mean, std = per_channel.mean(1).reshape(shape), per_channel.std(1).reshape(shape)
    return ((train - mean) / std).float(), ((test.double() - mean) / std).float()


@pytest.mark.parametrize("name, kind, to_nchw", [
    ("mnist", "MNIST", lambda x: x.unsqueeze(1)),
    ("mnist-32x3", "MNIST", lambda x: torch.nn.functional.pad(x.unsqueeze(1), (2, 2, 2, 2)).repeat(1, 3, 1, 1)),
    ("svhn", "SVHN", lambda x: x),
    ("cifar10", "CIFAR10", lambda x: x.permute(0, 3, 1, 2)),
])
def test_torchvision_datasets_on_fakes(tmp_path, monkeypatch, name, kind, to_nchw):
    fake = _fake_class(kind, present_in=tmp_path / "given")
    monkeypatch.setattr(torchvision.datasets, kind, fake)
    ds = load_dataset(name, subset=0.5, seed=2, data_dir=str(tmp_path / "given"))
    assert ds.input_shape == DATASETS[name].input_shape
    assert ds.x_train.shape == (N_TRAIN // 2, *ds.input_shape)
    assert ds.x_test.shape == (N_TEST, *ds.input_shape) and ds.y_test.dtype == torch.int64
    assert ds.info["source"] == "files" and ds.info["path"] == str(tmp_path / "given")
    (x_train, y_train), (x_test, y_test) = fake.arrays["train"], fake.arrays["test"]
    indices = data._subset_indices(N_TRAIN, 0.5, 2)
    want_train, want_test = _expected(to_nchw(x_train), indices, to_nchw(x_test))
    torch.testing.assert_close(ds.x_train, want_train, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ds.x_test, want_test, atol=1e-4, rtol=1e-4)
    assert torch.equal(ds.y_train, y_train[indices]) and torch.equal(ds.y_test, y_test)


def test_mnist_32x3_zero_border_and_identical_channels(tmp_path, monkeypatch):
    monkeypatch.setattr(torchvision.datasets, "MNIST", _fake_class("MNIST", present_in=tmp_path / "data"))
    ds = load_dataset("mnist-32x3", subset=1.0)  # found in ./data
    for x in (ds.x_train, ds.x_test):
        assert x.shape[1:] == (3, 32, 32)
        assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
        border = torch.ones(32, 32, dtype=torch.bool)
        border[2:30, 2:30] = False
        # the zero border is one value per channel: raw 0 standardised, (0 - mean_c)/std_c < 0
        edge = x[:, :, border]
        assert (edge == edge.flatten()[0]).all() and edge.flatten()[0] < 0
        assert (x[:, :, ~border] != edge.flatten()[0]).any()
    raw = torch.randint(1, 256, (5, 1, 28, 28), dtype=torch.uint8)
    padded = data._pad_to_32x3(raw)
    assert padded.shape == (5, 3, 32, 32) and padded.dtype == torch.uint8
    assert torch.equal(padded[:, :, 2:30, 2:30], raw.expand(-1, 3, -1, -1)) and padded.sum() == 3 * raw.sum()


@pytest.mark.parametrize("name, kind", [("mnist", "MNIST"), ("svhn", "SVHN"), ("cifar10", "CIFAR10")])
def test_torchvision_datasets_offline_error(tmp_path, monkeypatch, name, kind):
    calls = []
    monkeypatch.setattr(torchvision.datasets, kind, _fake_class(kind, present_in=None, calls=calls))
    with pytest.raises(DataError) as error:
        load_dataset(name, data_dir=str(tmp_path / "nowhere"))
    message = str(error.value)
    for needle in (kind, "--data-dir", "SMOOTHNESS_DATA", "cannot be downloaded", "URLError",
                   f"- {tmp_path / 'nowhere'}"):
        assert needle in message
    assert (str(tmp_path / "nowhere"), True) in calls  # the download went to --data-dir
    with pytest.raises(DataError, match=r"- .*data\n"):
        load_dataset(name)  # nothing chosen: ./data is searched


@pytest.mark.parametrize("name, kind", [("mnist", "MNIST"), ("cifar10", "CIFAR10")])
def test_torchvision_datasets_chosen_dir_does_not_fall_back_to_dot_data(tmp_path, monkeypatch, name, kind):
    calls = []
    monkeypatch.setattr(torchvision.datasets, kind, _fake_class(kind, present_in=tmp_path / "data", calls=calls))
    assert load_dataset(name).info["path"] == str(tmp_path / "data")
    with pytest.raises(DataError, match=f"- {tmp_path / 'nowhere'}\n"):
        load_dataset(name, data_dir=str(tmp_path / "nowhere"))
    assert str(tmp_path / "data") not in {root for root, _ in calls[2:]}


REAL_MNIST = torchvision.datasets.MNIST  # saved before the autouse fixture replaces it


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_torchvision_files_read_are_recorded_with_checksums(tmp_path, monkeypatch):
    """torchvision's own MNIST class on idx files written here: the files it read are recorded with their md5."""
    raw = tmp_path / "given" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 20), ("t10k", 10)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, (n,)))
    monkeypatch.setattr(torchvision.datasets, "MNIST", REAL_MNIST)
    ds = load_dataset("mnist", subset=0.5, data_dir=str(tmp_path / "given"))
    assert ds.x_train.shape == (10, 1, 28, 28) and ds.x_test.shape == (10, 1, 28, 28)
    names = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    assert [f["path"] for f in ds.info["files"]] == [str(raw / name) for name in names]
    for record in ds.info["files"]:
        content = Path(record["path"]).read_bytes()
        assert record["md5"] == hashlib.md5(content).hexdigest() and record["bytes"] == len(content)


def test_training_run_saves_the_dataset_info(tmp_path):
    """What load_dataset records (files and checksums, subset, preprocessing) lands in the run's dataset.json."""
    import json

    from experiments.config import RunConfig
    from experiments.training import train_run

    cfg = RunConfig(dataset="synthetic", subset=0.05, epochs=1, probe_every=0, sharpness_samples=0,
                    local_smoothness_samples=16)
    outcome = train_run(cfg, tmp_path)
    saved = json.loads((outcome.path / "dataset.json").read_text())
    assert saved == json.loads(json.dumps(load_dataset("synthetic", subset=0.05, seed=0).info))
    assert saved["n_train"] == 100 and "standardisation" in saved
