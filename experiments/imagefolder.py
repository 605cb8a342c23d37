"""``--dataset imagefolder:PATH``: a torchvision ``ImageFolder`` tree read once into tensors.

PATH holds ``train/`` and ``test/``, each with one folder per class (``train/<class>/<image>``, torchvision's layout);
labels number the training split's class folders in sorted order, and the test split's folders must be among them.
Only regular files with an image extension are read (a FIFO, socket or device named ``*.png`` is refused, never
opened: opening a FIFO waits for a writer). Every image is decoded once (PIL) into an integer tensor (n, C, H, W): C
is 1 when every image is greyscale, else 3 (greyscale images are then repeated to RGB). Pixels keep their depth:
8-bit modes (L, RGB, P, ...) are divided by 255 (``ToTensor``'s scale), and when any image is 16-bit greyscale (PIL
``I;16``, as 16-bit PNGs open) every image is read on the 16-bit scale, divided by 65535 (an 8-bit value v is v·257).
Modes without a fixed range (``I``: 32-bit integers, ``F``: floats) are refused, naming the mode and the file.
Images are resized only when asked (``--dataset-arg size=32`` or ``size=[32,48]``, bilinear with antialiasing:
torchvision's ``Resize``, on the PIL image for 8-bit trees, on the tensor for 16-bit ones); without it they must all
have one size. Pixels in [0, 1] are then standardised per channel like the registry's datasets
(``experiments.data``), unless ``--dataset-arg standardise=false``.
"""
from __future__ import annotations

import functools
import os
import stat
from pathlib import Path

import torch

from experiments.data import DataError

__all__ = ["ARGS", "load_imagefolder"]

#: the --dataset-arg keys an image folder takes, with their defaults
ARGS = {"size": None, "standardise": True}
#: PIL modes read on the 8-bit scale (converted to L or RGB; alpha dropped), and the 16-bit greyscale ones
EIGHT_BIT = ("1", "L", "P", "LA", "La", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")
SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
GREY = ("1", "L") + SIXTEEN_BIT


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


def _image_file(path: str) -> bool:
    """ImageFolder's file filter: an image extension, and a regular file (checked by stat, never opened)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS
    if not path.lower().endswith(IMG_EXTENSIONS):
        return False
    try:
        kind = os.stat(path).st_mode
    except OSError as exc:   # a broken link
        raise DataError(f"imagefolder: cannot read {path} ({exc.strerror}); remove it or fix it") from None
    if not stat.S_ISREG(kind):
        what = ("a FIFO" if stat.S_ISFIFO(kind) else "a socket" if stat.S_ISSOCK(kind)
                else "a device" if stat.S_ISCHR(kind) or stat.S_ISBLK(kind) else "not a file")
        raise DataError(f"imagefolder: {path} is not a regular file ({what}); only image files are read: move it "
                        f"out of the tree")
    return True


def _read_split(folder: Path, classes: list[str] | None):
    """(images as a list of PIL images, labels, class names) of one split folder."""
    import torchvision
    try:
        found = torchvision.datasets.ImageFolder(str(folder), is_valid_file=_image_file)
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
        if image.mode not in EIGHT_BIT + SIXTEEN_BIT:
            what = {"I": "32-bit integers", "F": "32-bit floats"}.get(image.mode, "neither 8- nor 16-bit")
            raise DataError(f"imagefolder: {path} is a PIL mode {image.mode} image ({what}), which has no fixed range "
                            f"to scale to [0, 1]; save it as an 8- or 16-bit PNG")
        images.append(image)
        labels.append(mapping[found.classes[index]])
    return images, labels, found.classes


def _open(path: str):
    from PIL import Image
    with Image.open(path) as image:
        image.load()
        return image.copy()


def _pixels(image, mode: str, deep: bool):
    """The image as a (H, W, C) numpy array: uint8 values, or with ``deep`` int32 values on the 16-bit scale."""
    import numpy as np
    if image.mode in SIXTEEN_BIT:
        grey = np.asarray(image).astype(np.int32)[..., None]
        return np.repeat(grey, 3, axis=2) if mode == "RGB" else grey
    array = np.asarray(image.convert(mode), dtype=np.uint8)
    array = array.reshape(array.shape[0], array.shape[1], -1)
    return array.astype(np.int32) * 257 if deep else array


def _to_tensor(images: list, mode: str, size, where: Path, deep: bool) -> torch.Tensor:
    from torchvision.transforms import functional as TF
    out = []
    size = None if size is None else size if isinstance(size, list) else [size, size]
    for image in images:
        if size is not None and not deep:
            image = TF.resize(image.convert(mode), size, antialias=True)
        tensor = torch.from_numpy(_pixels(image, mode, deep).copy()).permute(2, 0, 1)
        if size is not None and deep:
            tensor = TF.resize(tensor.double(), size, antialias=True).round().clamp(0, 65535).to(torch.int32)
        out.append(tensor)
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
    # greyscale when every image is, else RGB for all; the 16-bit scale when any image is 16-bit
    mode = "L" if all(im.mode in GREY for im in train_images + test_images) else "RGB"
    deep = any(im.mode in SIXTEEN_BIT for im in train_images + test_images)
    x_train = _to_tensor(train_images, mode, size, path / "train", deep)
    x_test = _to_tensor(test_images, mode, size, path / "test", deep)
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(f"imagefolder {root}: training images are {tuple(x_train.shape[1:])}, test images "
                        f"{tuple(x_test.shape[1:])}; pass --dataset-arg size=N to resize both")
    info = {"source": "imagefolder", "path": root, "classes": list(classes), "mode": mode,
            "resized_to": size, "pixels": "uint16 / 65535" if deep else "uint8 / 255"}
    return x_train, torch.tensor(y_train), x_test, torch.tensor(y_test), info


def load_imagefolder(root: str, args: dict) -> tuple:
    """(x_train, y_train, x_test, y_test, num_classes, info, standardise) of the tree at ``root``; x as floats in
    [0, 1] of shape (n, C, H, W): the pixels over 255, or over 65535 for a 16-bit tree. Cached per process (root,
    size)."""
    check_args(args)
    size = args.get("size")
    x_train, y_train, x_test, y_test, info = _load(root, tuple(size) if isinstance(size, list) else size)
    scale = 65535 if info["pixels"].startswith("uint16") else 255
    return (x_train.float() / scale, y_train, x_test.float() / scale, y_test, len(info["classes"]), dict(info),
            args.get("standardise", True))
