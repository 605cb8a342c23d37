"""Datasets as in-memory tensors: FashionMNIST (the study's dataset), MNIST-1D, a synthetic set for tests, and the
torchvision image sets MNIST, MNIST-32x3, SVHN and CIFAR-10.

`load_dataset` loads both splits once per process, draws a seeded subset of the training split (``seed`` chooses
only that) and standardises per channel with the subset's statistics. Files are read only from the folder the user
chose (``--data-dir``, ``$SMOOTHNESS_DATA``) or, without a choice, the default places, and md5-checked.

Details: docs/explanation/modules.md#data
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import os
import random
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
import torchvision

__all__ = ["DATASETS", "DataError", "Dataset", "DatasetSpec", "from_tensors", "load_dataset", "resolve_data_dir"]

ENV_VAR = "SMOOTHNESS_DATA"
#: Directories searched after the user's ones; a module attribute so tests can replace it.
SYSTEM_DATA_DIRS: tuple[Path, ...] = (Path("/usr/share/datasets/fashion-mnist"),)
#: Official file names and md5 checksums of the four FashionMNIST archives.
FASHION_MNIST_FILES: dict[str, str] = dict(torchvision.datasets.FashionMNIST.resources)
#: md5 of the same files decompressed (the published checksums of the raw idx files). Debian's package re-gzips the
#: archives without the original file name in the header, so only the content checksums match there.
FASHION_MNIST_IDX_MD5: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte.gz": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte.gz": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte.gz": "15d484375f8d13e6eb1aabb0c3f46965",
}
MNIST1D_SEED = 42  # the package's default: reproduces the published MNIST-1D (4,000 train / 1,000 test)
SYNTHETIC_SEED = 1234


class DataError(RuntimeError):
    """A dataset could not be loaded; the message says what was wrong and what to do."""


@dataclass(frozen=True, eq=False)  # eq=False: comparing tensors with == is ambiguous
class Dataset:
    name: str
    x_train: torch.Tensor  # float32, standardised, shape (n, *input_shape)
    y_train: torch.Tensor  # int64
    x_test: torch.Tensor
    y_test: torch.Tensor
    input_shape: tuple
    num_classes: int
    info: dict  # provenance: source, path, md5 check, sizes, subset, seed, standardisation


@dataclass(frozen=True)
class _Splits:
    """Full train/test splits as loaded, before subsetting; x has shape (n, *shape) before `transform`."""
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    info: dict


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


@dataclass(frozen=True)
class DatasetSpec:
    """How to get one dataset: `load(data_dir, download)` returns the full splits, `transform` maps a batch of
    loaded images to `input_shape` (applied after subsetting, so only the kept images are transformed)."""
    name: str
    input_shape: tuple
    num_classes: int
    load: Callable[[str | None, bool], _Splits]
    description: str
    transform: Callable[[torch.Tensor], torch.Tensor] = field(default=_identity)


# --------------------------------------------------------------------------------------------------------------
# Where to look

def explicit_data_dir(data_dir: str | os.PathLike | None) -> tuple[Path, str] | None:
    """The folder the user chose, with how it was chosen (``--data-dir`` or ``$SMOOTHNESS_DATA``), or None.

    A chosen folder is the only place looked in: if it does not hold the dataset, loading fails and says what is
    missing. Falling back to another copy (the system one, say) would silently run on other files than asked for."""
    if data_dir is not None:
        return Path(data_dir).expanduser().absolute(), "--data-dir"
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser().absolute(), f"${ENV_VAR}"
    return None


def resolve_data_dir(data_dir: str | os.PathLike | None, *, include_system: bool = True) -> list[Path]:
    """Directories searched for data: only the chosen one (`data_dir`, else ``$SMOOTHNESS_DATA``) if there is one;
    else ``./data`` and (if `include_system`) `SYSTEM_DATA_DIRS`, duplicates dropped."""
    explicit = explicit_data_dir(data_dir)
    if explicit is not None:
        _check_not_a_file(*explicit)
        return [explicit[0]]
    unique: list[Path] = []
    for path in (Path.cwd() / "data", *(SYSTEM_DATA_DIRS if include_system else ())):
        path = path.absolute()
        if path not in unique:
            unique.append(path)
    return unique


def _check_not_a_file(path: Path, how: str) -> None:
    if path.exists() and not path.is_dir():
        raise DataError(f"{how} {path} is a file, not a folder: give the folder that holds the dataset files.")


def _download_root(data_dir: str | os.PathLike | None) -> Path:
    """Where torchvision downloads to: the chosen folder, else ./data."""
    return resolve_data_dir(data_dir, include_system=False)[0]


def _unreadable(error: OSError) -> DataError:
    """A one-line error for a data file or folder that exists but cannot be read (permissions, I/O)."""
    where = error.filename or "a data file"
    return DataError(f"cannot read {where}: {error.strerror or error}. Make it readable (e.g. chmod a+r, or run as a "
                     f"user who may read it) or pass --data-dir with a readable copy.")


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _bullets(lines: list[str]) -> str:
    return "\n".join(f"  - {line}" for line in lines)


# --------------------------------------------------------------------------------------------------------------
# Shared steps: subset, standardisation

def _check_subset(subset: float) -> None:
    if isinstance(subset, bool) or not isinstance(subset, (int, float)) or not 0 < subset <= 1:
        raise ValueError(f"--subset must be a fraction of the training set in (0, 1], e.g. 0.1 for 10%; "
                         f"got {subset!r}")


def _subset_indices(n: int, subset: float, seed: int) -> torch.Tensor:
    """``max(1, round(subset * n))`` distinct indices in [0, n), drawn by a generator seeded with `seed`."""
    size = max(1, round(subset * n))
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=generator)[:size]


def _standardise(x_train: torch.Tensor, x_test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(x - mean_c) / std_c`` with the training set's mean and unbiased std over every sample and
    position of channel c (dim 1 of (n, C, ...) inputs; a flat (n, features) input is one channel).

    A channel constant over the training set (std 0) is only centred: it carries no signal to scale."""
    x_train, x_test = x_train.float(), x_test.float()
    dims = [d for d in range(x_train.ndim) if d != 1] if x_train.ndim > 2 else list(range(x_train.ndim))
    mean = x_train.double().mean(dim=dims, keepdim=True)
    count = x_train.numel() // max(1, mean.numel())
    std = x_train.double().std(dim=dims, keepdim=True, correction=1 if count > 1 else 0)
    scale = torch.where(std > 0, std, torch.ones_like(std))
    return ((x_train - mean) / scale).float(), ((x_test - mean) / scale).float()


# --------------------------------------------------------------------------------------------------------------
# FashionMNIST from the four idx .gz files

def _fashion_candidates(dirs: list[Path]) -> list[Path]:
    return [d for root in dirs for d in (root, root / "FashionMNIST" / "raw")]


def _find_fashion_files(dirs: list[Path]) -> tuple[Path | None, list[str]]:
    """The first directory holding all four files, and what was found in every directory looked in."""
    looked = []
    for directory in _fashion_candidates(dirs):
        missing = [name for name in FASHION_MNIST_FILES if not (directory / name).is_file()]
        if not missing:
            return directory, looked
        if not directory.exists():
            state = "does not exist"
        elif len(missing) == len(FASHION_MNIST_FILES):
            state = "has none of the four files" if any(directory.iterdir()) else "is empty"
        else:
            state = f"incomplete: missing {', '.join(missing)}"
        looked.append(f"{directory}  ({state})")
    return None, looked


def _parse_idx(raw: bytes, name: str) -> np.ndarray:
    """An idx file (uint8 payload): 2 zero bytes, type code 0x08, ndim, then ndim big-endian uint32 sizes."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{name} is not an idx file of unsigned bytes (bad header); re-download it.")
    ndim = raw[3]
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    payload = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if payload.size != int(np.prod(shape)):
        raise DataError(f"{name} is truncated: header says {shape}, found {payload.size} bytes; re-download it.")
    return payload.reshape(shape).copy()  # copy: frombuffer over bytes is read-only


def _verified_idx_bytes(path: Path) -> tuple[bytes, str, str]:
    """The decompressed content of one .gz, how it was verified -- by the archive's md5 (torchvision's official
    checksum) or, for a re-compressed archive such as Debian's (same content, different gzip header, so a different
    md5), by the md5 of the decompressed idx file -- and the archive's md5."""
    compressed = path.read_bytes()  # an OSError here is turned into a one-line DataError by the caller
    got = hashlib.md5(compressed).hexdigest()
    expected = FASHION_MNIST_FILES[path.name]
    if got == expected:
        return gzip.decompress(compressed), "md5 of .gz", got
    content_expected = FASHION_MNIST_IDX_MD5[path.name]
    try:
        content = gzip.decompress(compressed)
    except (OSError, EOFError, zlib.error) as error:
        content, content_got = b"", f"none: it does not decompress ({error})"
    else:
        content_got = hashlib.md5(content).hexdigest()
        if content_got == content_expected:
            return content, "md5 of decompressed idx", got
    raise DataError(
        f"{path} is corrupt: its md5 is {got}, expected md5 {expected} (decompressed: md5 {content_got}, expected "
        f"{content_expected}). Delete it and download it again (or reinstall it: "
        "sudo apt-get install --reinstall dataset-fashion-mnist).")


@functools.lru_cache(maxsize=4)
def _read_fashion_dir(directory: str, fingerprint: tuple) -> tuple[tuple[torch.Tensor, ...], list[dict]]:
    """md5-check and parse the four files; cached per (directory, files' size and mtime). Returns the tensors and,
    per file, what a run records: path, size, md5 of the file as read, and how its content was verified."""
    arrays, files = {}, []
    for name in FASHION_MNIST_FILES:
        path = Path(directory) / name
        content, verified_by, md5 = _verified_idx_bytes(path)
        arrays[name] = _parse_idx(content, str(path))
        files.append({"path": str(path), "bytes": path.stat().st_size, "md5": md5, "verified_by": verified_by})
    x_train, y_train, x_test, y_test = (torch.from_numpy(arrays[name]) for name in FASHION_MNIST_FILES)
    return (x_train.unsqueeze(1), y_train.long(), x_test.unsqueeze(1), y_test.long()), files


def _fingerprint(directory: Path) -> tuple:
    return tuple((name, (directory / name).stat().st_size, (directory / name).stat().st_mtime_ns)
                 for name in FASHION_MNIST_FILES)


def _load_fashion_mnist(data_dir: str | None, download: bool) -> _Splits:
    try:
        return _load_fashion_files(data_dir, download)
    except OSError as error:  # a folder or file that exists but cannot be read (permissions, I/O)
        raise _unreadable(error) from None


def _load_fashion_files(data_dir: str | None, download: bool) -> _Splits:
    explicit = explicit_data_dir(data_dir)
    found, looked = _find_fashion_files(resolve_data_dir(data_dir))
    source = "files"
    download_note = "download not attempted (download=False)"
    if found is None and download:
        root = _download_root(data_dir)
        try:
            # Fetches and md5-checks all four archives into <root>/FashionMNIST/raw, which is then searched.
            _torchvision_dataset("FashionMNIST", root, train=True, download=True)
        except Exception as error:  # torchvision raises URLError, RuntimeError, OSError... when offline
            download_note = f"download by torchvision into {root} failed: {type(error).__name__}: {error}"
        else:
            found, _ = _find_fashion_files([root])
            source = "torchvision download"
            download_note = f"torchvision's download into {root} left no complete set of files there"
    if found is None and explicit is not None:
        folder, how = explicit
        raise DataError(
            f"{how} {folder} does not hold FashionMNIST: " + "; ".join(looked) + f"; and {download_note}. Put "
            + ", ".join(FASHION_MNIST_FILES) + f" in {folder} (or in its FashionMNIST/raw/), or leave out --data-dir "
            f"(and unset {ENV_VAR}) to use ./data or the system copy (sudo apt-get install dataset-fashion-mnist).")
    if found is None:
        raise DataError(
            "FashionMNIST not found. Looked for " + ", ".join(FASHION_MNIST_FILES) + " in:\n"
            + _bullets(looked) + f"\nand {download_note}.\n"
            "Get the data in one of three ways:\n"
            "  (1) run once with internet access, so torchvision downloads it into ./data (or --data-dir);\n"
            f"  (2) pass --data-dir DIR or set {ENV_VAR}=DIR, DIR holding the four .gz files "
            "(directly or in DIR/FashionMNIST/raw/);\n"
            "  (3) on Debian/Ubuntu: sudo apt-get install dataset-fashion-mnist "
            "(puts them in /usr/share/datasets/fashion-mnist).")
    (x_train, y_train, x_test, y_test), files = _read_fashion_dir(str(found), _fingerprint(found))
    info = {"source": source, "path": str(found), "files": [dict(f) for f in files]}
    return _Splits(x_train, y_train, x_test, y_test, info)


# --------------------------------------------------------------------------------------------------------------
# Torchvision image sets (MNIST, SVHN, CIFAR-10)

def _torchvision_dataset(cls_name: str, root: Path, *, train: bool, download: bool):
    # Looked up at call time so tests can substitute the class.
    cls = getattr(torchvision.datasets, cls_name)
    split = {"split": "train" if train else "test"} if cls_name == "SVHN" else {"train": train}
    return cls(str(root), download=download, **split)


def _torchvision_files(dataset) -> list[Path]:
    """The files torchvision read for `dataset`: MNIST's raw idx files, SVHN's .mat, CIFAR-10's pickled batches."""
    if hasattr(dataset, "raw_folder"):  # MNIST reads <root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte
        prefix = "train" if dataset.train else "t10k"
        return [Path(dataset.raw_folder) / f"{prefix}-{kind}-ubyte" for kind in ("images-idx3", "labels-idx1")]
    if hasattr(dataset, "filename"):  # SVHN
        return [Path(dataset.root) / dataset.filename]
    if hasattr(dataset, "base_folder"):  # CIFAR-10
        batches = dataset.train_list if dataset.train else dataset.test_list
        return [Path(dataset.root) / dataset.base_folder / name for name, _ in batches]
    return []


@functools.lru_cache(maxsize=8)
def _torchvision_tensors(cls_name: str, cls: type, root: str, train: bool, download: bool,
                         channels_last: bool) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """(images as uint8 (n, C, H, W), labels int64, records of the files read); `cls` is part of the cache key
    only."""
    dataset = _torchvision_dataset(cls_name, Path(root), train=train, download=download)
    images = torch.as_tensor(np.asarray(dataset.data))
    labels = dataset.labels if hasattr(dataset, "labels") else dataset.targets  # SVHN names them labels
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    if images.ndim == 3:  # greyscale (n, H, W)
        images = images.unsqueeze(1)
    elif channels_last:  # CIFAR-10 stores (n, H, W, C)
        images = images.permute(0, 3, 1, 2).contiguous()
    files = tuple({"path": str(path), "bytes": path.stat().st_size, "md5": _md5(path)}
                  for path in _torchvision_files(dataset) if path.is_file())
    return images, labels, files


def _torchvision_loader(cls_name: str, *, channels_last: bool = False) -> Callable[[str | None, bool], _Splits]:
    def load(data_dir: str | None, download: bool) -> _Splits:
        cls = getattr(torchvision.datasets, cls_name)

        def splits(root: Path, fetch: bool, source: str) -> _Splits:
            x_train, y_train, train_files = _torchvision_tensors(cls_name, cls, str(root), True, fetch, channels_last)
            x_test, y_test, test_files = _torchvision_tensors(cls_name, cls, str(root), False, fetch, channels_last)
            info = {"source": source, "path": str(root), "files": [dict(f) for f in train_files + test_files]}
            return _Splits(x_train, y_train, x_test, y_test, info)

        roots = resolve_data_dir(data_dir, include_system=False)
        for root in roots:
            try:
                return splits(root, False, "files")
            except PermissionError as error:
                raise _unreadable(error) from None
            except (RuntimeError, OSError):  # torchvision: "Dataset not found ..."
                continue
        download_note = "download not attempted (download=False)"
        if download:
            root = _download_root(data_dir)
            try:
                return splits(root, True, "torchvision download")
            except Exception as error:  # offline: URLError, RuntimeError, OSError...
                download_note = (f"it cannot be downloaded: torchvision's download into {root} failed: "
                                 f"{type(error).__name__}: {error}")
        raise DataError(
            f"{cls_name} not found in torchvision's layout under any of:\n{_bullets([str(r) for r in roots])}\n"
            f"and {download_note}.\nRun once with internet access so torchvision downloads it, or pass "
            f"--data-dir DIR (or set {ENV_VAR}=DIR) pointing to a directory where torchvision's {cls_name} "
            "files already are.")
    return load


def _pad_to_32x3(images: torch.Tensor) -> torch.Tensor:
    """(n, 1, 28, 28) -> (n, 3, 32, 32): a 2-pixel zero border and the grey channel repeated, as seed 004 feeds
    MNIST to LeNet-5."""
    return F.pad(images, (2, 2, 2, 2)).repeat(1, 3, 1, 1)


# --------------------------------------------------------------------------------------------------------------
# Generated sets

def _preserving_global_rng(fn: Callable[[], object]) -> object:
    """Run `fn`, restoring Python's and numpy's global RNG state (mnist1d reseeds them)."""
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        return fn()
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


@functools.lru_cache(maxsize=1)
def _mnist1d_splits() -> _Splits:
    import mnist1d.data  # imported here: it pulls in matplotlib, which most runs never need

    args = mnist1d.data.get_dataset_args()
    args.seed = MNIST1D_SEED
    data = _preserving_global_rng(lambda: mnist1d.data.make_dataset(args))  # generation only, no download
    def as_x(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(a, dtype=torch.float32).unsqueeze(1)  # (n, 40) -> (n, 1, 40): one channel

    def as_y(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(a, dtype=torch.int64)

    info = {"source": "generated", "generator": "mnist1d.data.make_dataset",
            "generator_args": {k: v for k, v in vars(args).items() if k != "url"}}
    return _Splits(as_x(data["x"]), as_y(data["y"]), as_x(data["x_test"]), as_y(data["y_test"]), info)


SYNTHETIC_SIZES = (2000, 500)
SYNTHETIC_NOISE = 1.0


@functools.lru_cache(maxsize=1)
def _synthetic_splits() -> _Splits:
    """Ten smooth random 28x28 templates (7x7 uniform noise upsampled, scaled to [0, 2]) plus iid Gaussian noise of
    std `SYNTHETIC_NOISE`; balanced, shuffled labels. Linearly separable enough that a small model beats chance in a
    few steps."""
    generator = torch.Generator().manual_seed(SYNTHETIC_SEED)
    coarse = 2 * torch.rand(10, 1, 7, 7, generator=generator)
    templates = F.interpolate(coarse, size=(28, 28), mode="bilinear", align_corners=False)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randperm(n, generator=generator) % 10
        noise = SYNTHETIC_NOISE * torch.randn(n, 1, 28, 28, generator=generator)
        return templates[labels] + noise, labels

    info = {"source": "generated", "generator_seed": SYNTHETIC_SEED, "noise_std": SYNTHETIC_NOISE}
    return _Splits(*draw(SYNTHETIC_SIZES[0]), *draw(SYNTHETIC_SIZES[1]), info=info)


def _generated(make: Callable[[], _Splits]) -> Callable[[str | None, bool], _Splits]:
    return lambda data_dir, download: make()


# --------------------------------------------------------------------------------------------------------------
# Registry and entry point

DATASETS: dict[str, DatasetSpec] = {
    "fashion-mnist": DatasetSpec("fashion-mnist", (1, 28, 28), 10, _load_fashion_mnist,
                                 "FashionMNIST, 60k/10k greyscale 28x28 (the study's dataset)"),
    "mnist1d": DatasetSpec("mnist1d", (1, 40), 10, _generated(_mnist1d_splits),
                           "MNIST-1D, 4k/1k signals of length 40, generated locally by the mnist1d package"),
    "synthetic": DatasetSpec("synthetic", (1, 28, 28), 10, _generated(_synthetic_splits),
                             "templates + noise, 2k/500, deterministic; for fast tests"),
    "mnist": DatasetSpec("mnist", (1, 28, 28), 10, _torchvision_loader("MNIST"), "MNIST via torchvision"),
    "mnist-32x3": DatasetSpec("mnist-32x3", (3, 32, 32), 10, _torchvision_loader("MNIST"),
                              "MNIST zero-padded to 32x32, 3 channels (LeNet-5 input, seed 004)",
                              transform=_pad_to_32x3),
    "svhn": DatasetSpec("svhn", (3, 32, 32), 10, _torchvision_loader("SVHN"), "SVHN via torchvision"),
    "cifar10": DatasetSpec("cifar10", (3, 32, 32), 10, _torchvision_loader("CIFAR10", channels_last=True),
                           "CIFAR-10 via torchvision"),
}


def load_dataset(name: str, *, subset: float = 0.1, seed: int = 0, data_dir: str | None = None,
                 download: bool = True) -> Dataset:
    """Load `name` as standardised in-memory tensors: a `subset` fraction of the training split chosen by `seed`,
    and the whole test split (see the module docstring)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    _check_subset(subset)
    spec = DATASETS[name]
    full = spec.load(data_dir, download)
    data = from_tensors(name, full.x_train, full.y_train, full.x_test, full.y_test, num_classes=spec.num_classes,
                        subset=subset, seed=seed, info=full.info, transform=spec.transform)
    if data.input_shape != spec.input_shape or tuple(data.x_test.shape[1:]) != spec.input_shape:
        raise DataError(f"{name}: loaded images of shape {data.input_shape} / {tuple(data.x_test.shape[1:])}, "
                        f"expected {spec.input_shape}; the files are not the expected dataset.")
    return data


def from_tensors(name: str, x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor,
                 y_test: torch.Tensor, *, num_classes: int, subset: float, seed: int, info: dict,
                 standardise: bool = True, transform: Callable[[torch.Tensor], torch.Tensor] = _identity) -> Dataset:
    """Steps 2 and 3 of the module docstring on full splits already loaded as tensors: the seeded training subset,
    then `transform` and (if `standardise`) the per-channel standardisation. The one home of both steps: the
    registry's datasets and the user's (experiments.plugins, experiments.imagefolder) go through it."""
    _check_subset(subset)
    indices = _subset_indices(len(x_train), subset, seed)
    x_train, x_test = transform(x_train[indices]), transform(x_test)
    if standardise:
        x_train, x_test = _standardise(x_train, x_test)
    else:
        x_train, x_test = x_train.float(), x_test.float()
    info = {**info, "n_train_full": len(y_train), "n_train": len(indices), "n_test": len(x_test),
            "subset": subset, "seed": seed,
            "standardisation": "per-channel, training subset mean and unbiased std" if standardise else "none"}
    return Dataset(name=name, x_train=x_train, y_train=y_train[indices], x_test=x_test, y_test=y_test,
                   input_shape=tuple(x_train.shape[1:]), num_classes=num_classes, info=info)
