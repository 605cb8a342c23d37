"""The model registry: the seed networks, with the normalisation layer as an option.

``MODELS`` maps a name to a :class:`ModelSpec`; ``build_model(name, norm=None, ...)`` builds it. ``norm`` is one of
``experiments.normalization.NORMS`` (none, torch, scratch, noisy, l1, l2, linf); each model has a default (``bn-convnet``
is ``convnet`` with torch BatchNorm).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn


def _norm(kind: str, num_features: int, dims: int) -> nn.Module:
    from experiments.normalization import make_norm  # imported here so the registry can be listed without building anything
    return make_norm(kind, num_features, dims)


def _check_input(input_shape: Tuple[int, ...], expected: Tuple[int, ...], model: str,
                 dims: str = "channels, height, width") -> None:
    if tuple(input_shape) != tuple(expected):
        raise ValueError(f"model {model!r} expects inputs of shape {tuple(expected)} ({dims}), got "
                         f"{tuple(input_shape)}; pick a dataset with that shape (an image folder: --dataset-arg "
                         f"size=N resizes its images)")


class ConvNet(nn.Module):
    """Seed 003's ConvNet: Conv(1→16, k5, p2) → ReLU → MaxPool2 → [norm] → Conv(16→32, k5, p2) → ReLU → MaxPool2 →
    [norm] → Linear(7·7·32 → 10). The normalisation sits after each MaxPool, as in the seed's BN-ConvNet."""

    def __init__(self, norm: str = "none", num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, kernel_size=5, padding=2), nn.ReLU(), nn.MaxPool2d(2), _norm(norm, 16, 2),
            nn.Conv2d(16, 32, kernel_size=5, padding=2), nn.ReLU(), nn.MaxPool2d(2), _norm(norm, 32, 2),
        )
        self.classifier = nn.Linear(7 * 7 * 32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class MLP(nn.Module):
    """Seed 000's MLP: in → 50 → 50 → 10 with ReLU, the norm after each hidden linear layer (before the ReLU).
    ``naive_init`` draws every weight and bias from U(−1, 1) as the seed lab does on purpose."""

    def __init__(self, norm: str = "none", num_classes: int = 10, in_features: int = 784,
                 hidden: Tuple[int, int] = (50, 50), naive_init: bool = False):
        super().__init__()
        h1, h2 = hidden
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(in_features, h1), _norm(norm, h1, 1), nn.ReLU(),
            nn.Linear(h1, h2), _norm(norm, h2, 1), nn.ReLU(), nn.Linear(h2, num_classes))
        if naive_init:
            for m in self.net:
                if isinstance(m, nn.Linear):
                    nn.init.uniform_(m.weight, -1.0, 1.0)
                    nn.init.uniform_(m.bias, -1.0, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LeNet5(nn.Module):
    """Seed 004's LeNet-5 for 3×32×32 inputs; the norm follows every conv and hidden linear layer (before ReLU)."""

    def __init__(self, norm: str = "none", num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 5), _norm(norm, 6, 2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), _norm(norm, 16, 2), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * 5 * 5, 120), _norm(norm, 120, 1), nn.ReLU(),
            nn.Linear(120, 84), _norm(norm, 84, 1), nn.ReLU(), nn.Linear(84, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class ResidualBlock(nn.Module):
    """h + Linear(ReLU(h)) with h = norm(x): as in seed 002's BatchNorm network, the stream itself is normalised
    before each residual branch, which is what keeps the activation variance flat through the blocks."""

    def __init__(self, hidden: int, norm: str):
        super().__init__()
        self.norm = _norm(norm, hidden, 1)
        self.linear = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return h + self.linear(torch.relu(h))


class ResidualMLP(nn.Module):
    """Seed 002's residual MLP: Linear(in → 100), five residual blocks, Linear(100 → 10); He (Kaiming uniform)
    weights and zero biases."""

    def __init__(self, norm: str = "none", num_classes: int = 10, in_features: int = 40, hidden: int = 100,
                 blocks: int = 5):
        super().__init__()
        self.flatten = nn.Flatten()
        self.stem = nn.Linear(in_features, hidden)
        self.blocks = nn.ModuleList(ResidualBlock(hidden, norm) for _ in range(blocks))
        self.head = nn.Linear(hidden, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.kaiming_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def residual_outputs(self, x: torch.Tensor):
        """The activations after each residual connection (for the variance diagnostic)."""
        h = self.stem(self.flatten(x))
        outs = [h]
        for block in self.blocks:
            h = block(h)
            outs.append(h)
        return outs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.residual_outputs(x)[-1])


class FCTanh(nn.Module):
    """Cohen et al.'s (2021) ``fc-tanh``: Flatten → Linear(in → 200) → tanh → Linear(200 → 200) → tanh →
    Linear(200 → classes), torch's default initialisation; a norm, if any, follows each tanh (their fc-bn)."""

    def __init__(self, norm: str = "none", num_classes: int = 10, in_features: int = 784, width: int = 200):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(in_features, width), nn.Tanh(), _norm(norm, width, 1),
            nn.Linear(width, width), nn.Tanh(), _norm(norm, width, 1), nn.Linear(width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


_VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG11(nn.Module):
    """VGG-11 for CIFAR-10 (Santurkar et al.'s network): 3×3 convs, the norm after each conv, one linear head."""

    def __init__(self, norm: str = "none", num_classes: int = 10):
        super().__init__()
        layers, channels = [], 3
        for v in _VGG11:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(channels, v, 3, padding=1), _norm(norm, v, 2), nn.ReLU()]
                channels = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


@dataclass(frozen=True)
class ModelSpec:
    build: Callable[..., nn.Module]   # build(norm, input_shape, num_classes, **options)
    default_norm: str
    description: str


def _convnet(norm, input_shape, num_classes, **_):
    _check_input(input_shape[1:], (28, 28), "convnet", "height, width; any number of channels")
    return ConvNet(norm, num_classes, in_channels=input_shape[0])


def _mlp(norm, input_shape, num_classes, naive_init=False, **_):
    return MLP(norm, num_classes, in_features=math.prod(input_shape), naive_init=naive_init)


def _lenet5(norm, input_shape, num_classes, **_):
    _check_input(input_shape, (3, 32, 32), "lenet5")
    return LeNet5(norm, num_classes)


def _resmlp(norm, input_shape, num_classes, **_):
    return ResidualMLP(norm, num_classes, in_features=math.prod(input_shape))


def _fc_tanh(norm, input_shape, num_classes, **_):
    return FCTanh(norm, num_classes, in_features=math.prod(input_shape))


def _vgg11(norm, input_shape, num_classes, **_):
    _check_input(input_shape, (3, 32, 32), "vgg11")
    return VGG11(norm, num_classes)


MODELS: Dict[str, ModelSpec] = {
    "convnet": ModelSpec(_convnet, "none", "seed 003 ConvNet, no normalisation"),
    "bn-convnet": ModelSpec(_convnet, "torch", "seed 003 ConvNet with BatchNorm2d after each MaxPool"),
    "mlp": ModelSpec(_mlp, "none", "seed 000 MLP 784-50-50-10"),
    "bn-mlp": ModelSpec(_mlp, "torch", "seed 000 MLP with BatchNorm1d after each hidden layer"),
    "lenet5": ModelSpec(_lenet5, "none", "seed 004 LeNet-5 for 3x32x32 inputs"),
    "bn-lenet5": ModelSpec(_lenet5, "torch", "seed 004 LeNet-5 with BatchNorm"),
    "resmlp": ModelSpec(_resmlp, "none", "seed 002 residual MLP (5 blocks, hidden 100, He init)"),
    "bn-resmlp": ModelSpec(_resmlp, "torch", "seed 002 residual MLP with BatchNorm before each branch"),
    "vgg11": ModelSpec(_vgg11, "none", "VGG-11 for CIFAR-10 (Santurkar et al.)"),
    "fc-tanh": ModelSpec(_fc_tanh, "none", "Cohen et al.'s fc-tanh: 2 hidden layers of 200, tanh (edge of stability)"),
    "bn-vgg11": ModelSpec(_vgg11, "torch", "VGG-11 with BatchNorm after each conv"),
}


def check_model_name(name: str) -> str:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    return name


def resolve_norm(name: str, norm: Optional[str]) -> str:
    return MODELS[check_model_name(name)].default_norm if norm in (None, "default") else norm


def build_model(name: str, *, norm: Optional[str] = None, input_shape: Tuple[int, ...] = (1, 28, 28),
                num_classes: int = 10, **options) -> nn.Module:
    spec = MODELS[check_model_name(name)]
    return spec.build(resolve_norm(name, norm), tuple(input_shape), num_classes, **options)
