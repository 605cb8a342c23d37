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

from experiments import features as measurements
from experiments.features import find_option, option_name

SAMPLING = ("replacement", "shuffle")
# fields that say where/how a run executes but not what it computes: recorded, never hashed
EXECUTION_FIELDS = ("study", "device", "tensorboard")
# Fields added after runs were published (optimizers, schedules, full-batch GD; the measurements' options declare
# theirs, ``Option.hashed``). They enter the hash only when set to something other than these defaults, which
# reproduce what runs did before the fields existed, so every earlier run keeps its id (and a finished run is still
# found and skipped).
_CORE_HASHED_WHEN_SET = {"loss": "cross-entropy", "optimizer": "sgd", "momentum": 0.0, "nesterov": False,
                         "weight_decay": 0.0, "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_eps": 1e-8,
                         "lr_schedule": "constant", "warmup_steps": 0, "lr_decay_every": 0, "lr_decay_factor": 0.1,
                         "model_args": {}, "dataset_args": {}}
#: every option that enters the run id only when set, with the value that leaves it out (options whose legacy value
#: depends on other options, as --pass-sharpness, are not here: ``RunConfig.hashed_dict`` asks them)
HASHED_WHEN_SET = {**_CORE_HASHED_WHEN_SET,
                   **{o.name: o.legacy_value({}) for o in measurements.options()
                      if o.hashed == "when_set" and o.legacy_rule is None}}
#: the field holding the options of measurements registered after RunConfig was built
LATER_OPTIONS = "later_options"


class ConfigError(ValueError):
    """A bad option value; the message names the command-line option."""


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
    if kind is dict:  # a factory's arguments (experiments.plugins): JSON values under Python names, sorted
        if isinstance(value, dict) and all(isinstance(k, str) and k.isidentifier() for k in value):
            try:
                json.dumps(value, allow_nan=False)  # JSON values only (no NaN, no objects)
                return _as_json_value(dict(sorted(value.items())))
            except (TypeError, ValueError):
                pass
        raise ConfigError(f"{option} must be KEY=VALUE pairs with JSON values, got {_shown(value)}")
    if kind is str or kind == Optional[str]:
        if isinstance(value, str) or (value is None and kind != str):
            return value
        raise ConfigError(f"{option} must be a string, got {_shown(value)}")
    raise TypeError(f"no coercion for {name}: {kind}")  # pragma: no cover - a new field type needs a rule here


def _as_json_value(value):
    """``value`` as it reads back from JSON: tuples become lists, nested dicts keep their (sorted) keys."""
    if isinstance(value, dict):
        return {k: _as_json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_as_json_value(v) for v in value]
    return value


@functools.lru_cache(maxsize=None)
def _declared_types(cls) -> Tuple[Tuple[str, object], ...]:
    hints = typing.get_type_hints(cls)
    return tuple((f.name, hints[f.name]) for f in dataclasses.fields(cls) if f.name != LATER_OPTIONS)


@dataclass(frozen=True)
class RunConfigFields:
    """RunConfig's own fields: what is not an option of a measurement (experiments/features/). `RunConfig` is
    this class with one field per option of the built-in measurements, generated from the registry, and
    ``later_options`` for the options of measurements registered after it was built."""

    model: str = "convnet"
    norm: Optional[str] = None              # None: the model's default (bn-convnet: torch BatchNorm)
    dataset: str = "fashion-mnist"         # a registry name, imagefolder:PATH or MODULE:FACTORY (plugins.py)
    model_args: dict = field(default_factory=dict, hash=False)    # a MODULE:FACTORY model's --model-arg values
    dataset_args: dict = field(default_factory=dict, hash=False)  # --dataset-arg values
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
    study: str = "fashion-mnist-bn"
    device: str = "auto"
    tensorboard: bool = False

    def __post_init__(self):
        if isinstance(self.batch_size, str) and self.batch_size.strip().lower() == "full":
            object.__setattr__(self, "batch_size", 0)  # as written in sweep files and presets: full-batch GD
        for name, kind in _declared_types(type(self)):
            object.__setattr__(self, name, coerce(name, getattr(self, name), kind))
        self._check_later_options()
        from experiments.models import MODELS, resolve_norm
        from experiments.normalization import NORMS
        if not self._check_import_strings():  # a built-in model
            if self.model not in MODELS:
                raise ConfigError(f"unknown model {self.model!r} (--model); choose one of: {', '.join(MODELS)}, or "
                                  f"MODULE:FACTORY")
            object.__setattr__(self, "norm", resolve_norm(self.model, self.norm))
        if self.norm is not None and self.norm not in NORMS:
            raise ConfigError(f"unknown norm {self.norm!r} (--norm); choose one of: {', '.join(NORMS)}")
        from experiments.data import DATASETS
        if self.dataset not in DATASETS and ":" not in self.dataset:
            raise ConfigError(f"unknown dataset {self.dataset!r} (--dataset); choose one of: {', '.join(DATASETS)}")
        # types are already coerced above: what is left to check is the range
        for name in ("lr", "adam_eps", "lr_decay_factor"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{option_name(name)} must be a positive number, got {value!r}")
        if self.epochs <= 0:
            raise ConfigError(f"--epochs must be a positive integer, got {self.epochs!r}")
        for name in ("batch_size", "seed", "warmup_steps", "lr_decay_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{option_name(name)} must be a non-negative integer, got {getattr(self, name)!r}")
        if not 0 < self.subset <= 1:
            raise ConfigError(f"--subset must be in (0, 1], got {self.subset!r}")
        if self.sampling not in SAMPLING:
            raise ConfigError(f"unknown --sampling {self.sampling!r}; choose one of: {', '.join(SAMPLING)}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        self._check_optimizer()
        for option in measurements.options():
            problem = option.problem(getattr(self, option.name))
            if problem:
                raise ConfigError(problem)
        for m in measurements.MEASUREMENTS.values():
            problem = m.check(self) if m.check is not None else None
            if problem:
                raise ConfigError(problem)

    def _check_later_options(self) -> None:
        """``later_options`` as sorted (name, value) pairs of registered options, coerced, defaults left out."""
        later = {}
        for name, value in dict(getattr(self, LATER_OPTIONS, ())).items():
            option = find_option(name)
            if option is None:
                raise ConfigError(f"unknown option {option_name(name)}: no registered measurement declares it")
            value = coerce(name, value, option.type)
            if value != option.default:
                later[name] = value
        if hasattr(self, LATER_OPTIONS):
            object.__setattr__(self, LATER_OPTIONS, tuple(sorted(later.items())))

    def __getattr__(self, name):
        """The value of an option of a measurement registered after RunConfig was built (its default if unset)."""
        option = None if name.startswith("__") or name == LATER_OPTIONS else find_option(name)
        if option is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return dict(self.__dict__.get(LATER_OPTIONS, ())).get(name, option.default)

    def _check_import_strings(self) -> bool:
        """Syntax of MODULE:FACTORY and imagefolder:PATH and of their arguments (imports nothing: the factories are
        called by the CLI's checks before a launch, experiments.plugins.check_runs). True for a user model."""
        from experiments import plugins
        try:
            object.__setattr__(self, "dataset", plugins.normal_dataset(self.dataset))
            user_model = plugins.is_user_model(self.model)
            if user_model:
                plugins.check_syntax(self.model, "--model")
            if plugins.is_user_dataset(self.dataset):
                plugins.check_syntax(self.dataset, "--dataset")
        except plugins.PluginError as exc:
            raise ConfigError(str(exc)) from None
        if user_model and self.norm not in (None, "default"):
            raise ConfigError(f"--norm applies to the built-in models; {self.model}'s normalisation is up to its "
                              f"factory (e.g. --model-arg norm=bn)")
        if user_model and self.naive_init:
            raise ConfigError(f"--naive-init applies to the built-in MLPs, not to {self.model}")
        if user_model:
            object.__setattr__(self, "norm", None)
        if self.model_args and not user_model:
            raise ConfigError(f"--model-arg applies to a model given as MODULE:FACTORY, not to {self.model}")
        if self.dataset_args and ":" not in self.dataset:
            raise ConfigError(f"--dataset-arg applies to a dataset given as MODULE:FACTORY or imagefolder:PATH, not "
                              f"to {self.dataset}")
        return user_model

    def _check_optimizer(self) -> None:
        from experiments.losses import LOSSES
        from experiments.optim import OPTIMIZERS, SCHEDULES
        for name, choices in (("loss", LOSSES), ("optimizer", OPTIMIZERS), ("lr_schedule", SCHEDULES)):
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
        """Every option by name (those of later-registered measurements too, where set): config.json."""
        out = dataclasses.asdict(self)
        out.update(out.pop(LATER_OPTIONS, ()))
        return out

    def hashed_dict(self) -> dict:
        """What the run id hashes: every field but the execution ones, and the later fields (``HASHED_WHEN_SET``,
        the measurements' "when_set" options) only where they differ from what runs did before they existed."""
        values = self.to_dict()

        def left_out(key, value) -> bool:
            if key in EXECUTION_FIELDS:
                return True
            if key in HASHED_WHEN_SET:
                return value == HASHED_WHEN_SET[key]
            option = find_option(key)
            return option is not None and option.hashed == "when_set" and value == option.legacy_value(values)
        return {k: v for k, v in values.items() if not left_out(k, v)}

    @property
    def config_hash(self) -> str:
        blob = json.dumps(self.hashed_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    @property
    def run_id(self) -> str:
        from experiments.models import MODELS
        if self.model not in MODELS:  # MODULE:FACTORY (experiments.plugins)
            return f"{self.model.replace(':', '.')}-lr{self.lr:g}-s{self.seed}-{self.config_hash}"
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
        names = option_names()
        unknown = set(data) - names - {"run_id", "config_hash"}
        if unknown:
            raise ConfigError(f"unknown config keys: {sorted(unknown)}; known: {', '.join(sorted(names))}")
        data = {k: v for k, v in data.items() if k in names}
        for option in measurements.options():   # a config saved before the option existed means its legacy value
            if option.name not in data and option.legacy_rule is not None:
                data[option.name] = option.legacy_rule(data)
        return cls(**data)


def _build_run_config():
    """RunConfigFields plus one field per option of the registered measurements and ``later_options``; its
    constructor also takes options of measurements registered later, by name (they go to ``later_options``)."""
    measurements.base.reserve(f.name for f in dataclasses.fields(RunConfigFields))
    cls = dataclasses.make_dataclass(
        "RunConfig", [(o.name, o.type, o.default) for o in measurements.options()]
        + [(LATER_OPTIONS, tuple, ())], bases=(RunConfigFields,), frozen=True,
        namespace={"__module__": __name__, "__doc__": "Everything that determines one training run's numbers (one "
                   "model, one lr, one seed): RunConfigFields and the options of the measurements."})
    generated = cls.__init__
    fields = {f.name for f in dataclasses.fields(cls)}

    def __init__(self, *args, **kwargs):
        later = dict(kwargs.pop(LATER_OPTIONS, ()))
        later.update((k, kwargs.pop(k)) for k in [k for k in kwargs if k not in fields])
        generated(self, *args, **kwargs, **{LATER_OPTIONS: tuple(later.items())})
    __init__.__doc__ = generated.__doc__
    cls.__init__ = __init__
    return cls


RunConfig = _build_run_config()


def option_names() -> set:
    """Every option a RunConfig takes by name: its fields and the options of every registered measurement."""
    return ({f.name for f in dataclasses.fields(RunConfig)} - {LATER_OPTIONS}) | {o.name for o in
                                                                               measurements.options()}


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
        if not isinstance(self.base, RunConfig):  # noqa: the class is generated above
            raise ConfigError(f"a study's base must be a RunConfig, got {type(self.base).__name__}")
        if not self.models or not self.lrs or not self.seeds:
            empty = [n for n in ("models", "lrs", "seeds") if not getattr(self, n)]
            raise ConfigError(f"the grid is empty: no {', '.join(empty)} given")
        for name in ("models", "lrs", "seeds"):
            values = getattr(self, name)
            if len(set(values)) != len(values):
                raise ConfigError(f"--{name} lists a value twice: {list(values)}")
        object.__setattr__(self, "axes", tuple((str(k), tuple(v)) for k, v in dict(self.axes).items()))
        fields = option_names() - {"model", "norm", "lr", "seed", "study"}
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
        from experiments.plugins import is_user_model, split_model_spec
        for spec in self.models:
            model, norm = split_model_spec(spec)
            # --model-arg goes to the MODULE:FACTORY models of a list, not to the built-in ones beside them
            args = {"model_args": {}} if self.base.model_args and not is_user_model(model) else {}
            for lr in self.lrs:
                for values in itertools.product(*(v for _, v in self.axes)):
                    for seed in self.seeds:
                        out.append(dataclasses.replace(self.base, model=model, norm=norm or None, lr=lr, seed=seed,
                                                       study=self.name, **args, **dict(zip(names, values))))
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
