"""FashionMNIST as torch Datasets from the local files: a dataset from outside the package, for smoothness-lab.

    PYTHONPATH=examples smoothness-lab train --dataset fashion_subset:fashion --dataset-arg n_train=2000 --subset 1

The images come from smoothness-lab's own reader (``experiments.data``: the four .gz files, md5-checked, from
./data, $SMOOTHNESS_DATA or /usr/share/datasets/fashion-mnist; nothing is downloaded), and the factory returns what
``torchvision.datasets.FashionMNIST`` with ``ToTensor()`` and ``Normalize`` would: (train, test) Datasets whose items
are (a (1, 28, 28) float tensor, an int label), with the ten class names as ``classes``. ``n_train`` / ``n_test``
images are drawn once with ``seed`` (smoothness-lab's ``--subset`` and seed then choose among the ``n_train``).
"""
from __future__ import annotations

import torch
import torchvision

MEAN, STD = 0.2860, 0.3530  # FashionMNIST's pixel mean and std in [0, 1], as torchvision's Normalize takes them


class ImageTensors(torch.utils.data.Dataset):
    """uint8 images (n, 1, 28, 28) and labels; item i is (normalised float image, int label)."""

    classes = torchvision.datasets.FashionMNIST.classes

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return (self.images[i].float() / 255 - MEAN) / STD, int(self.labels[i])


def fashion(n_train: int = 2000, n_test: int = 1000, seed: int = 0):
    """(train, test): ``n_train`` of the 60,000 training images and ``n_test`` of the 10,000 test images."""
    from experiments.data import DATASETS
    full = DATASETS["fashion-mnist"].load(None, False)  # (data_dir, download): the local files only
    generator = torch.Generator().manual_seed(seed)
    train = torch.randperm(len(full.y_train), generator=generator)[:n_train]
    test = torch.randperm(len(full.y_test), generator=generator)[:n_test]
    return (ImageTensors(full.x_train[train], full.y_train[train]),
            ImageTensors(full.x_test[test], full.y_test[test]))
