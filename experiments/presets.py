"""Named studies (``smoothness-lab run --study NAME``): the seed labs and Santurkar's controls as grids."""
from __future__ import annotations

from typing import Dict

from experiments.config import ConfigError, RunConfig, StudyConfig


def _study(name: str, models, lrs=(0.04,), seeds=(0, 1, 2), axes=(), **base) -> StudyConfig:
    return StudyConfig(name=name, models=tuple(models), lrs=tuple(lrs), seeds=tuple(seeds),
                       base=RunConfig(study=name, **base), axes=tuple(axes))


PRESETS: Dict[str, StudyConfig] = {}


def _register(study: StudyConfig, description: str) -> None:
    PRESETS[study.name] = study
    DESCRIPTIONS[study.name] = description


DESCRIPTIONS: Dict[str, str] = {}
_register(_study("fashion-mnist-bn", ["convnet", "bn-convnet"], seeds=(0, 1, 2, 3, 4)),
          "seed 003: ConvNet vs BN-ConvNet on 10% of FashionMNIST, lr 0.04, batch 32, 10 passes, 5 seeds")
_register(_study("fashion-mnist-bn-confirm", ["convnet", "bn-convnet"], seeds=(5, 6, 7, 8, 9)),
          "confirmation of fashion-mnist-bn on seeds never looked at (5-9), same config: the confirmatory test")
_register(_study("mnist-mlp-bn", ["mlp", "mlp:scratch-fn", "mlp:scratch", "bn-mlp"], lrs=(0.01,), epochs=20,
                 dataset="mnist", subset=1.0, batch_size=256, naive_init=True),
          "seed 000: MLP 784-50-50-10 with naive init, full MNIST, batch 256, lr 0.01, 20 epochs; no BN vs functional scratch BN vs "
          "module scratch BN vs torch BN")
_register(_study("lenet5-bn", ["lenet5", "bn-lenet5"], dataset="mnist-32x3"),
          "seed 004: LeNet-5 with and without BN on MNIST padded to 32x32x3")
_register(_study("lenet5-bn-svhn", ["lenet5", "bn-lenet5"], dataset="svhn"),
          "seed 004: LeNet-5 with and without BN on SVHN")
_register(_study("resmlp-variance", ["resmlp", "bn-resmlp"], dataset="mnist1d", subset=1.0),
          "seed 002: residual MLP on MNIST-1D (see also `smoothness-lab variance`)")
_register(_study("santurkar-vgg", ["vgg11", "bn-vgg11"], lrs=(0.1,), dataset="cifar10", subset=1.0,
                 batch_size=128, epochs=15),
          "Santurkar et al.: VGG-11 on CIFAR-10, lr 0.1, batch 128 (needs the data and a GPU)")
_register(_study("noisy-bn", ["convnet", "bn-convnet", "convnet:noisy"]),
          "Santurkar Fig. 2 control: BN with injected covariate shift (noisy BN) vs BN vs none, FashionMNIST")
_register(_study("lp-norms", ["convnet", "bn-convnet", "convnet:l1", "convnet:l2", "convnet:linf"]),
          "Santurkar section 3 control: l1, l2, linf normalisation vs BN vs none, FashionMNIST")
_register(_study("fashion-mnist-spectrum", ["convnet", "bn-convnet"], seeds=(0, 1, 2, 3, 4), spectrum_every=10),
          "Ghorbani et al. 2019: fashion-mnist-bn plus the Hessian density, top-10 eigenvalues and gradient "
          "concentration at init and after the last pass, both BN modes (about 50 min on 2 cores)")
_register(_study("edge-of-stability", ["fc-tanh"], lrs=(0.03, 0.04, 0.05), seeds=(0,), loss="mse",
                 batch_size=0, subset=5000 / 60000, epochs=2000, eval_every=100, probe_every=50,
                 sharpness_samples=0, sharpness_every=20, sharpness_start="warm", pass_sharpness=False,
                 local_smoothness_samples=0),
          "Cohen et al. 2021 Fig. 1: full-batch GD, fc-tanh, square loss, 5,000 FashionMNIST images, 2,000 steps, "
          "3 learning rates, sharpness on all 5,000 every 20 steps (about 22 min with --workers 1)")

_register(_study("generalization", ["mlp", "bn-mlp"], lrs=(0.05, 0.2), seeds=(0, 1),
                 axes=(("batch_size", (32, 128)), ("weight_decay", (0.0, 1e-4))),
                 subset=1000 / 60000, epochs=400, probe_every=0, target_train_loss=0.01, generalization_every=400),
          "Jiang et al. 2020 / Andriushchenko et al. 2023: MLP with and without BN on 1,000 FashionMNIST images, "
          "lr x batch size x weight decay x BN, 2 seeds, each trained to training cross-entropy 0.01, then every "
          "sharpness/flatness/norm measure (`smoothness-lab generalization`; about 10 min on 2 cores)")
# Measured every other pass and without line probes: a per-layer measurement costs about 10x a sharpness
# measurement, and the reference study had to fit a shared 2-core machine (docs/per-layer.md)
_register(_study("per-layer", ["convnet", "bn-convnet"], seeds=(0, 1, 2), per_layer=True, eval_every=2,
                 probe_every=0),
          "fashion-mnist-bn (3 seeds, no line probes) plus per-layer curvature every 2 passes: lambda_max and trace "
          "of each module's block of the Hessian and the GGN, lambda_min of the Hessian (`smoothness-lab per-layer`)")

# Minibatch units for both networks (like for like: the gradient SGD uses), example units beside them on the network
# without BatchNorm, where they are defined; the training configuration is the main study's
_register(_study("gradient-noise", ["convnet", "bn-convnet"], seeds=(0, 1, 2), gradient_noise_every=50,
                 gradient_noise_unit="both", gradient_noise_batches=8),
          "fashion-mnist-bn (3 seeds) plus gradient noise every 50 steps on 8 fixed minibatches of 32: the norm, "
          "inner-product and orthogonality tests, GSNR, noise scale and step quality (minibatch units for both "
          "networks, example units too without BatchNorm); `smoothness-lab plot` draws a dashboard per run")


def get_preset(name: str) -> StudyConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown study {name!r} (--study); choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]
