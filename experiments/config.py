"""Run and study configuration: frozen dataclasses, validated on creation, saved as JSON, hashed into run ids."""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import math
import numbers
import typing
from dataclasses import dataclass, field
from typing import Optional, Tuple

SAMPLING = ("replacement", "shuffle")
PROBE_DIRECTIONS = ("gradient", "update")
SHARPNESS_STARTS = ("cold", "warm")
# fields that say where/how a run executes but not what it computes: recorded, never hashed
EXECUTION_FIELDS = ("study", "device", "tensorboard")
# Fields added after runs were published (optimizers, schedules, full-batch GD, step-wise and warm-started sharpness,
# the Hessian spectrum). They
# enter the hash only when set to something other than these defaults, which reproduce what runs did before the
# fields existed, so every earlier run keeps its id (and a finished run is still found and skipped).
HASHED_WHEN_SET = {"loss": "cross-entropy", "optimizer": "sgd", "momentum": 0.0, "nesterov": False,
                   "weight_decay": 0.0, "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_eps": 1e-8,
                   "lr_schedule": "constant", "warmup_steps": 0, "lr_decay_every": 0, "lr_decay_factor": 0.1,
                   "probe_direction": "gradient", "eval_every": 1, "sharpness_every": 0, "sharpness_start": "cold",
                   "spectrum_every": 0, "target_train_loss": 0.0, "generalization_every": 0,
                   "generalization_samples": 1000, "per_layer": False}


# Lanczos stops when the residual is at most tol x the eigenvalue (smoothness.lanczos), which bounds the sharpness's
# error by about that fraction: beyond 10% the number is no longer a measurement (tol 2 gave 19.1 for 33.1).
MAX_SHARPNESS_TOL = 0.1


class ConfigError(ValueError):
    """A bad option value; the message names the command-line option."""


def option_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _shown(value) -> str:
    return f"{value!r} (a {type(value).__name__})" if isinstance(value, (str, bool)) else repr(value)


def coerce(name: str, value, kind, option: Optional[str] = None):
    """``value`` as the declared type ``kind`` (bool, int, float, str or Optional[str]), or a ConfigError.

    Coercion makes the run id a function of the computation, not of how a number was spelled: 1 and 1.0 are the same
    learning rate, 3.0 the same epoch count as 3. Anything that is not that number is refused rather than guessed:
    3.5 for an integer, the string "0.1" for a float, and above all "false" for a boolean (bool("false") is True).
    """
    option = option or option_name(name)
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{option} must be true or false, got {_shown(value)}")
    if kind is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
        if isinstance(value, numbers.Real) and not isinstance(value, bool) and float(value).is_integer():
            return int(value)
        raise ConfigError(f"{option} must be an integer, got {_shown(value)}")
    if kind is float:
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{option} must be a number, got {_shown(value)}")
    if kind is str or kind == Optional[str]:
        if isinstance(value, str) or (value is None and kind != str):
            return value
        raise ConfigError(f"{option} must be a string, got {_shown(value)}")
    raise TypeError(f"no coercion for {name}: {kind}")  # pragma: no cover - a new field type needs a rule here


@functools.lru_cache(maxsize=None)
def _declared_types(cls) -> Tuple[Tuple[str, object], ...]:
    hints = typing.get_type_hints(cls)
    return tuple((f.name, hints[f.name]) for f in dataclasses.fields(cls))


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines one training run's numbers (one model, one lr, one seed)."""

    model: str = "convnet"
    norm: Optional[str] = None              # None: the model's default (bn-convnet: torch BatchNorm)
    dataset: str = "fashion-mnist"
    subset: float = 0.1
    seed: int = 0
    lr: float = 0.04
    batch_size: int = 32                    # 0 = full batch: every step uses the whole training subset (GD)
    epochs: int = 10
    sampling: str = "replacement"
    naive_init: bool = False                # the seed MLP's uniform(-1, 1) initialisation
    loss: str = "cross-entropy"             # or "mse": Cohen et al.'s square loss (experiments.losses)
    # The optimizer (experiments.optim): torch's SGD, Adam or AdamW, and the learning-rate schedule, stepped per step
    optimizer: str = "sgd"
    momentum: float = 0.0                   # SGD only (torch's heavy ball; Nesterov's with nesterov=True)
    nesterov: bool = False
    weight_decay: float = 0.0               # L2 in the gradient for sgd and adam, decoupled for adamw
    adam_beta1: float = 0.9                 # Adam and AdamW only
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    lr_schedule: str = "constant"           # constant, cosine (to 0 at the last step) or step
    warmup_steps: int = 0                   # linear warmup lr·(t+1)/W over the first W steps
    lr_decay_every: int = 0                 # step schedule: steps between decays
    lr_decay_factor: float = 0.1            # step schedule: the factor of each decay
    probe_every: int = 10                   # Santurkar line probe every N steps (0 = never)
    probe_steps: int = 8                    # K step sizes ...
    probe_min: float = 0.5                  # ... evenly spaced in [probe_min, probe_max] x lr
    probe_max: float = 4.0
    probe_bn_mode: str = "batch"
    probe_direction: str = "gradient"       # d = −g (Santurkar) or "update": the optimizer's own step
    # Per-epoch measurements on fixed samples of the training subset. Seed 003 used the whole subset (0 here) for
    # the local smoothness; on a 2-core CPU that alone is 40% of a run, so the default samples 2,000 images.
    eval_every: int = 1                     # passes between evaluations (eval + smoothness records, checkpoint)
    local_smoothness_samples: int = 2000    # 0 = the whole training subset (seed 003)
    sharpness_samples: int = 256            # fixed training sample for the top Hessian eigenvalue (0 = whole subset)
    sharpness_every: int = 0                # steps between sharpness records (0 = once per evaluation instead)
    sharpness_tol: float = 1e-3
    sharpness_start: str = "cold"           # "warm": start Lanczos from the previous sharpness measurement's vector
    spectrum_every: int = 0                 # Hessian density, top eigenvalues, gradient concentration (0 = off)
    # Sharpness vs generalisation (experiments.generalization): stop at a training loss, measure the final weights
    target_train_loss: float = 0.0          # stop at the first evaluation whose training loss is at most this (0 = off)
    generalization_every: int = 0           # passes between generalisation measures, and at the end (0 = off)
    generalization_samples: int = 1000      # fixed training images the generalisation measures use
    per_layer: bool = False                 # per-module λ_max and trace of H and GGN, λ_min(H) (experiments.per_layer)
    study: str = "fashion-mnist-bn"
    device: str = "auto"
    tensorboard: bool = False

    def __post_init__(self):
        if isinstance(self.batch_size, str) and self.batch_size.strip().lower() == "full":
            object.__setattr__(self, "batch_size", 0)  # as written in sweep files and presets: full-batch GD
        for name, kind in _declared_types(type(self)):
            object.__setattr__(self, name, coerce(name, getattr(self, name), kind))
        from .models import MODELS, resolve_norm
        from .norms import NORMS
        if self.model not in MODELS:
            raise ConfigError(f"unknown model {self.model!r} (--model); choose one of: {', '.join(MODELS)}")
        object.__setattr__(self, "norm", resolve_norm(self.model, self.norm))
        if self.norm not in NORMS:
            raise ConfigError(f"unknown norm {self.norm!r} (--norm); choose one of: {', '.join(NORMS)}")
        from .data import DATASETS
        if self.dataset not in DATASETS:
            raise ConfigError(f"unknown dataset {self.dataset!r} (--dataset); choose one of: {', '.join(DATASETS)}")
        # types are already coerced above: what is left to check is the range
        for name in ("lr", "probe_min", "probe_max", "sharpness_tol", "adam_eps", "lr_decay_factor"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{option_name(name)} must be a positive number, got {value!r}")
        for name in ("epochs", "probe_steps", "eval_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{option_name(name)} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("batch_size", "probe_every", "local_smoothness_samples", "sharpness_samples", "seed",
                     "warmup_steps", "lr_decay_every", "sharpness_every", "spectrum_every", "generalization_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{option_name(name)} must be a non-negative integer, got {getattr(self, name)!r}")
        if not self.sharpness_tol <= MAX_SHARPNESS_TOL:
            raise ConfigError(f"--sharpness-tol must be in (0, {MAX_SHARPNESS_TOL:g}], got {self.sharpness_tol!r}: it "
                              f"is the Lanczos residual relative to the eigenvalue, so the sharpness is only known "
                              f"to within about that fraction (the default {RunConfig.sharpness_tol:g} gives 0.1%)")
        if self.generalization_samples <= 0:
            raise ConfigError(f"--generalization-samples must be a positive integer, got {self.generalization_samples!r}")
        if not (math.isfinite(self.target_train_loss) and self.target_train_loss >= 0):
            raise ConfigError(f"--target-train-loss must be a non-negative number (0 = train all --epochs), got "
                              f"{self.target_train_loss!r}")
        if not 0 < self.subset <= 1:
            raise ConfigError(f"--subset must be in (0, 1], got {self.subset!r}")
        if self.probe_min > self.probe_max:
            raise ConfigError(f"--probe-min ({self.probe_min}) must not exceed --probe-max ({self.probe_max})")
        if self.sampling not in SAMPLING:
            raise ConfigError(f"unknown --sampling {self.sampling!r}; choose one of: {', '.join(SAMPLING)}")
        from smoothness import BN_MODES  # the one home of the modes; imported here so that --help stays fast
        if self.probe_bn_mode not in BN_MODES:
            raise ConfigError(f"unknown --probe-bn-mode {self.probe_bn_mode!r}; choose one of: {', '.join(BN_MODES)}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.spectrum_every and self.spectrum_every % self.eval_every:
            raise ConfigError(f"--spectrum-every ({self.spectrum_every}) must be a multiple of --eval-every "
                              f"({self.eval_every}): the spectrum is measured at evaluation points")
        self._check_optimizer()

    def _check_optimizer(self) -> None:
        from .losses import LOSSES
        from .optim import OPTIMIZERS, SCHEDULES
        for name, choices in (("loss", LOSSES), ("optimizer", OPTIMIZERS), ("lr_schedule", SCHEDULES),
                              ("probe_direction", PROBE_DIRECTIONS), ("sharpness_start", SHARPNESS_STARTS)):
            if getattr(self, name) not in choices:
                raise ConfigError(f"unknown {option_name(name)} {getattr(self, name)!r}; choose one of: "
                                  f"{', '.join(choices)}")
        for name in ("momentum", "adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 <= value < 1):
                raise ConfigError(f"{option_name(name)} must be in [0, 1), got {value!r}")
        if not (isinstance(self.weight_decay, (int, float)) and math.isfinite(self.weight_decay)
                and self.weight_decay >= 0):
            raise ConfigError(f"--weight-decay must be a non-negative number, got {self.weight_decay!r}")
        if self.optimizer == "sgd":
            changed = [option_name(n) for n in ("adam_beta1", "adam_beta2", "adam_eps")
                       if getattr(self, n) != HASHED_WHEN_SET[n]]
            if changed:
                raise ConfigError(f"{', '.join(changed)} apply to --optimizer adam or adamw, not sgd")
            if self.nesterov and self.momentum == 0:
                raise ConfigError("--nesterov needs a positive --momentum")
        elif self.momentum or self.nesterov:
            raise ConfigError(f"--momentum and --nesterov apply to --optimizer sgd; {self.optimizer}'s momentum is "
                              f"--adam-beta1")
        if self.lr_schedule == "step" and self.lr_decay_every == 0:
            raise ConfigError("--lr-schedule step needs --lr-decay-every N (steps between decays)")
        if self.lr_schedule != "step" and self.lr_decay_every:
            raise ConfigError(f"--lr-decay-every applies to --lr-schedule step, not {self.lr_schedule}")

    # -- identity ---------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def hashed_dict(self) -> dict:
        """What the run id hashes: every field but the execution ones, and the later fields only where set
        (``HASHED_WHEN_SET``)."""
        return {k: v for k, v in self.to_dict().items()
                if k not in EXECUTION_FIELDS and not (k in HASHED_WHEN_SET and v == HASHED_WHEN_SET[k])}

    @property
    def config_hash(self) -> str:
        blob = json.dumps(self.hashed_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    @property
    def run_id(self) -> str:
        from .models import MODELS
        norm = "" if self.norm == MODELS[self.model].default_norm else f"-{self.norm}"
        return f"{self.model}{norm}-lr{self.lr:g}-s{self.seed}-{self.config_hash}"

    @property
    def full_batch(self) -> bool:
        return self.batch_size == 0

    def steps_per_epoch(self, n_train: int) -> int:
        """Steps in one pass over ``n_train`` training examples: round(n / batch), at least one (the seed's
        convention, results/README.md); one for full-batch GD. The one place this formula lives."""
        return 1 if self.full_batch else max(1, round(n_train / self.batch_size))

    def total_steps(self, n_train: int) -> int:
        return self.steps_per_epoch(n_train) * self.epochs

    def check_training_set(self, n_train: int) -> None:
        """The range checks that need the size of the training subset (``n_train`` images), made before a run
        directory is written: a minibatch no larger than the subset (whatever the sampling: a larger one would be
        drawn with replacement, or silently cut to the subset when shuffling), a warmup shorter than the run."""
        if self.batch_size > n_train:
            raise ConfigError(f"--batch-size {self.batch_size} is larger than the training subset ({n_train} images "
                              f"of {self.dataset} at --subset {self.subset:g}); use --batch-size {n_train} or less, "
                              f"or --batch-size full for full-batch gradient descent")
        total = self.total_steps(n_train)
        if self.warmup_steps >= total:
            raise ConfigError(f"--warmup-steps {self.warmup_steps} is not shorter than the run, which has {total} "
                              f"steps ({self.epochs} epochs x {self.steps_per_epoch(n_train)}); use at most "
                              f"{total - 1}, or more --epochs")

    @property
    def step_sizes(self) -> Tuple[float, ...]:
        return self.step_sizes_at(self.lr)

    def step_sizes_at(self, lr: float) -> Tuple[float, ...]:
        """The K probe step sizes evenly spaced in [probe_min, probe_max] × ``lr`` (the scheduled rate of a step)."""
        k = self.probe_steps
        if k == 1:
            return (self.probe_min * lr,)
        return tuple(lr * (self.probe_min + (self.probe_max - self.probe_min) * i / (k - 1)) for i in range(k))

    @classmethod
    def from_dict(cls, data: dict) -> "RunConfig":
        """The config saved as ``config.json`` (or written in a sweep file); ``run_id`` and ``config_hash`` are
        derived, so they are accepted and ignored here (`experiments.store.read_config` checks them)."""
        if not isinstance(data, dict):
            raise ConfigError(f"a run config must be a JSON object of options, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names - {"run_id", "config_hash"}
        if unknown:
            raise ConfigError(f"unknown config keys: {sorted(unknown)}; known: {', '.join(sorted(names))}")
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class StudyConfig:
    """A grid of runs: models x learning rates x seeds (x any further ``axes``), sharing the other options of
    ``base``. ``axes`` holds (RunConfig field, values) pairs, e.g. (("batch_size", (32, 128)),), for grids over more
    options (the generalization preset's batch size and weight decay)."""

    name: str = "fashion-mnist-bn"
    models: Tuple[str, ...] = ("convnet", "bn-convnet")
    lrs: Tuple[float, ...] = (0.04,)
    seeds: Tuple[int, ...] = (0, 1, 2)
    base: RunConfig = field(default_factory=RunConfig)
    axes: Tuple[Tuple[str, Tuple], ...] = ()

    def __post_init__(self):
        for name, kind in (("models", str), ("lrs", float), ("seeds", int)):
            values = getattr(self, name)
            if isinstance(values, (str, bytes)) or not isinstance(values, (tuple, list)):
                raise ConfigError(f"--{name} must be a list, got {_shown(values)}")
            object.__setattr__(self, name, tuple(coerce(name, v, kind, f"--{name}") for v in values))
        if not isinstance(self.base, RunConfig):
            raise ConfigError(f"a study's base must be a RunConfig, got {type(self.base).__name__}")
        if not self.models or not self.lrs or not self.seeds:
            empty = [n for n in ("models", "lrs", "seeds") if not getattr(self, n)]
            raise ConfigError(f"the grid is empty: no {', '.join(empty)} given")
        for name in ("models", "lrs", "seeds"):
            values = getattr(self, name)
            if len(set(values)) != len(values):
                raise ConfigError(f"--{name} lists a value twice: {list(values)}")
        object.__setattr__(self, "axes", tuple((str(k), tuple(v)) for k, v in dict(self.axes).items()))
        fields = {f.name for f in dataclasses.fields(RunConfig)} - {"model", "norm", "lr", "seed", "study"}
        for name, values in self.axes:
            if name not in fields:
                raise ConfigError(f"a study axis must be a run option other than model, lr and seed; got {name!r}")
            if not values or len(set(values)) != len(values):
                raise ConfigError(f"study axis {name!r} must list distinct values, got {list(values)}")
            for v in values:  # each value must make a valid run
                dataclasses.replace(self.base, **{name: v})

    def runs(self) -> Tuple[RunConfig, ...]:
        """One RunConfig per (model, lr, seed). A model may carry a norm as ``model:norm`` (``convnet:noisy``)."""
        out = []
        names = [name for name, _ in self.axes]
        for spec in self.models:
            model, _, norm = spec.partition(":")
            for lr in self.lrs:
                for values in itertools.product(*(v for _, v in self.axes)):
                    for seed in self.seeds:
                        out.append(dataclasses.replace(self.base, model=model, norm=norm or None, lr=lr, seed=seed,
                                                       study=self.name, **dict(zip(names, values))))
        return tuple(out)

    def to_dict(self) -> dict:
        extra = {"axes": {name: list(values) for name, values in self.axes}} if self.axes else {}
        return {"name": self.name, "models": list(self.models), "lrs": list(self.lrs), "seeds": list(self.seeds),
                "base": self.base.to_dict(), **extra}

    @classmethod
    def from_dict(cls, data: dict) -> "StudyConfig":
        """The inverse of :meth:`to_dict`; fields a grid was written without take their defaults (as in
        :meth:`RunConfig.from_dict`), so a grid saved before a field existed equals the same grid saved after."""
        return cls(name=data["name"], models=tuple(data["models"]), lrs=tuple(data["lrs"]),
                   seeds=tuple(data["seeds"]), base=RunConfig.from_dict(data["base"]),
                   axes=tuple(data.get("axes", {}).items()))
