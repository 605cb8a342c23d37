"""A small ResNet, with and without BatchNorm: a model from outside the package, for smoothness-lab's import strings.

    PYTHONPATH=examples smoothness-lab train --model small_resnet:resnet --model-arg norm=none --model-arg width=8

A stem conv, three stages of basic blocks (widths w, 2w, 4w; the second and third halve the resolution), global
average pooling and a linear head: He et al.'s (2016) CIFAR ResNet shape at a CPU-sized width and depth. ``norm="bn"``
puts a BatchNorm2d after every conv (the usual ResNet), ``norm="none"`` leaves the convs bare (with biases) and
nothing else changes. Every factory takes ``input_shape`` and ``num_classes``, which smoothness-lab passes from the
dataset, so the network fits any image set: (C, H, W) with H, W at least 4.
"""
from __future__ import annotations

from torch import nn

NORMS = ("bn", "none")


def _norm(norm: str, channels: int) -> nn.Module:
    return nn.BatchNorm2d(channels) if norm == "bn" else nn.Identity()


class BasicBlock(nn.Module):
    """relu(x' + norm(conv(relu(norm(conv(x)))))), x' the input through a 1x1 conv where the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int, norm: str):
        super().__init__()
        bias = norm == "none"  # a BatchNorm's shift replaces the bias
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=bias)
        self.norm1 = _norm(norm, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=bias)
        self.norm2 = _norm(norm, c_out)
        self.shortcut = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride=stride, bias=bias), _norm(norm, c_out))
        self.relu = nn.ReLU()

    def forward(self, x):
        h = self.relu(self.norm1(self.conv1(x)))
        return self.relu(self.shortcut(x) + self.norm2(self.conv2(h)))


class SmallResNet(nn.Module):
    def __init__(self, norm: str = "bn", width: int = 16, blocks: int = 1, in_channels: int = 1,
                 num_classes: int = 10):
        super().__init__()
        layers = [nn.Conv2d(in_channels, width, 3, padding=1, bias=norm == "none"), _norm(norm, width), nn.ReLU()]
        c = width
        for stage, c_out in enumerate((width, 2 * width, 4 * width)):
            for i in range(blocks):
                layers.append(BasicBlock(c, c_out, 2 if stage and i == 0 else 1, norm))
                c = c_out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


def resnet(norm: str = "bn", width: int = 16, blocks: int = 1, input_shape=(1, 28, 28), num_classes: int = 10):
    """The factory: ``norm`` "bn" or "none", ``width`` channels in the first stage, ``blocks`` per stage."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
    if len(input_shape) != 3:
        raise ValueError(f"expects images (channels, height, width), got inputs of shape {tuple(input_shape)}")
    return SmallResNet(norm, int(width), int(blocks), in_channels=input_shape[0], num_classes=num_classes)


def resnet_bn(width: int = 16, blocks: int = 1, input_shape=(1, 28, 28), num_classes: int = 10):
    """``resnet(norm="bn")``: a factory of its own, so that one sweep lists both networks in --models."""
    return resnet("bn", width, blocks, input_shape, num_classes)


def resnet_plain(width: int = 16, blocks: int = 1, input_shape=(1, 28, 28), num_classes: int = 10):
    """``resnet(norm="none")``."""
    return resnet("none", width, blocks, input_shape, num_classes)
