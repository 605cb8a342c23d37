"""``--dataset imagefolder:PATH``: a torchvision ``ImageFolder`` tree read once into tensors.

PATH holds ``train/`` and ``test/``, each with one folder per class (``train/<class>/<image>``, torchvision's layout);
labels number the training split's class folders in sorted order, and the test split's folders must be among them.
Every image is decoded once (PIL, through torchvision's ImageFolder) into a uint8 tensor (n, C, H, W): C is 1 when
every image is greyscale, else 3 (greyscale images are then repeated to RGB). Images are resized only when asked
(``--dataset-arg size=32`` or ``size=[32,48]``, bilinear, torchvision's ``Resize``); without it they must all have
one size. Pixels become floats in [0, 1] (``ToTensor``'s scale) and are then standardised per channel like the
registry's datasets (``experiments.data``), unless ``--dataset-arg standardise=false``.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch

from experiments.data import DataError

__all__ = ["ARGS", "load_imagefolder"]

#: the --dataset-arg keys an image folder takes, with their defaults
ARGS = {"size": None, "standardise": True}


def check_args(args: dict) -> None:
    """Refuse --dataset-arg keys and values an image folder does not take (one line, before anything is read)."""
    unknown = sorted(set(args) - set(ARGS))
    if unknown:
        raise DataError(f"--dataset-arg {', '.join(unknown)}: an imagefolder dataset takes only "
                        f"{', '.join(ARGS)} (size=32 resizes every image to 32x32; standardise=false keeps [0, 1])")
    size = args.get("size")
    valid = (isinstance(size, int) and not isinstance(size, bool) and size > 0) or size is None or (
        isinstance(size, list) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size))
    if not valid:
        raise DataError(f"--dataset-arg size must be a positive integer or [height, width], got {size!r}")
    if not isinstance(args.get("standardise", True), bool):
        raise DataError(f"--dataset-arg standardise must be true or false, got {args['standardise']!r}")


def _split_folder(root: Path, split: str) -> Path:
    folder = root / split
    if not folder.is_dir():
        there = ", ".join(sorted(p.name for p in root.iterdir())[:8]) or "nothing"
        raise DataError(f"imagefolder {root} has no {split}/ folder (it holds: {there}); expected {root}/train/<class>/"
                        f"<image> and {root}/test/<class>/<image>")
    return folder


def _read_split(folder: Path, classes: list[str] | None):
    """(images as a list of PIL images, labels, class names) of one split folder."""
    import torchvision
    try:
        found = torchvision.datasets.ImageFolder(str(folder))
    except (FileNotFoundError, OSError) as exc:  # no class folders, or class folders without images
        raise DataError(f"imagefolder {folder}: {exc}") from None
    mapping = {c: i for i, c in enumerate(classes)} if classes is not None else found.class_to_idx
    unknown = sorted(set(found.classes) - set(mapping))
    if unknown:
        raise DataError(f"imagefolder {folder} has classes the training split lacks: {', '.join(unknown)}; "
                        f"every test class needs a folder of training images of the same name")
    images, labels = [], []
    for path, index in found.samples:
        try:
            image = _open(path)
        except OSError as exc:
            raise DataError(f"imagefolder: cannot read {path} as an image ({exc})") from None
        images.append(image)
        labels.append(mapping[found.classes[index]])
    return images, labels, found.classes


def _open(path: str):
    from PIL import Image
    with Image.open(path) as image:
        image.load()
        return image.copy()


def _to_tensor(images: list, mode: str, size, where: Path) -> torch.Tensor:
    import numpy as np
    from torchvision.transforms import functional as TF
    out = []
    for image in images:
        image = image.convert(mode)
        if size is not None:
            image = TF.resize(image, size if isinstance(size, list) else [size, size], antialias=True)
        array = np.asarray(image, dtype=np.uint8)
        out.append(torch.from_numpy(array.copy()).reshape(array.shape[0], array.shape[1], -1).permute(2, 0, 1))
    shapes = sorted({tuple(t.shape[1:]) for t in out})
    if len(shapes) > 1:
        sizes = " vs ".join("x".join(map(str, s)) for s in shapes[:3])
        raise DataError(f"imagefolder {where}: images differ in size ({sizes}); pass --dataset-arg size=N to resize "
                        f"them all to NxN")
    return torch.stack(out)


@functools.lru_cache(maxsize=2)
def _load(root: str, size_key) -> tuple:
    size = list(size_key) if isinstance(size_key, tuple) else size_key
    path = Path(root)
    if not path.is_dir():
        raise DataError(f"imagefolder {root} is not a folder; give a folder holding train/<class>/<image> and "
                        f"test/<class>/<image>")
    train_images, y_train, classes = _read_split(_split_folder(path, "train"), None)
    test_images, y_test, _ = _read_split(_split_folder(path, "test"), classes)
    # greyscale when every image is (PIL modes L, 1, I, F), else RGB for all
    grey = all(im.mode in ("L", "1", "I", "I;16", "F") for im in train_images + test_images)
    mode = "L" if grey else "RGB"
    x_train = _to_tensor(train_images, mode, size, path / "train")
    x_test = _to_tensor(test_images, mode, size, path / "test")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(f"imagefolder {root}: training images are {tuple(x_train.shape[1:])}, test images "
                        f"{tuple(x_test.shape[1:])}; pass --dataset-arg size=N to resize both")
    info = {"source": "imagefolder", "path": root, "classes": list(classes), "mode": mode,
            "resized_to": size, "pixels": "uint8 / 255"}
    return x_train, torch.tensor(y_train), x_test, torch.tensor(y_test), info


def load_imagefolder(root: str, args: dict) -> tuple:
    """(x_train, y_train, x_test, y_test, num_classes, info, standardise) of the tree at ``root``; x as floats in
    [0, 1] of shape (n, C, H, W). Cached per process (root, size)."""
    check_args(args)
    size = args.get("size")
    x_train, y_train, x_test, y_test, info = _load(root, tuple(size) if isinstance(size, list) else size)
    return (x_train.float() / 255, y_train, x_test.float() / 255, y_test, len(info["classes"]), dict(info),
            args.get("standardise", True))
