"""What a measurement along training is, and the registry of them (docs/ARCHITECTURE.md, "Add a measurement").

A `Measurement` declares in one place everything the rest of the toolkit needs to know about it:

- its ``options``: `Option` (name, type, default, help, range check, whether and when it enters the run id). They
  become `RunConfig` fields (validated there), click options of `smoothness-lab run|sweep|train` and sweep-file keys;
- its ``records``: `Record` (kind, numeric fields, lists of numbers, BN mode), the record schema the run store checks
  (``experiments.store.RECORD_NUMBERS``) and results/README.md describes;
- its ``hooks``: a function of the run's `RunContext` that returns the `experiments.loop.Hook` objects it adds to the
  loop (the schedule lives there: every ``--*-every`` option is 0 = off);
- its ``metrics``: `Metric` rows of the report's table (`experiments.analysis.metrics`).

`register` adds one; the built-in ones are registered by ``experiments.features`` in loop order (hooks of the same
kind run in registration order, which is the order of their records). This module imports nothing heavy, so that
``--help`` stays fast: hook factories import torch and the estimators when a run builds them.
"""
from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple

#: Option.hashed: "always" for options every published run id includes, "when_set" for the others: they enter the
#: hash only when their value differs from ``legacy`` (what runs did before the option existed), so adding an option
#: or registering a measurement never changes an existing run id.
HASHED = ("always", "when_set")


def option_name(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class Option:
    """One option of a measurement: a RunConfig field, a click option ``--name-with-dashes``, a sweep-file key.

    ``check(value)`` returns what is wrong with a value of the right type ("must be a positive integer"), or None;
    ``choices`` restricts a string. ``legacy`` is the value a config written before the option existed implies: a
    constant (default: ``default``) or a function of the config's other values (a dict). ``from_dict`` fills a
    missing key with it, and a "when_set" option enters the run id only when its value differs from it."""

    name: str
    type: type
    default: Any
    help: str
    check: Optional[Callable[[Any], Optional[str]]] = None
    choices: Optional[Tuple[str, ...]] = None
    hashed: str = "when_set"
    legacy: Any = None
    legacy_rule: Optional[Callable[[dict], Any]] = None

    def __post_init__(self):
        if self.hashed not in HASHED:
            raise ValueError(f"option {self.name!r}: hashed must be one of {HASHED}, got {self.hashed!r}")
        if not self.name.isidentifier():
            raise ValueError(f"option {self.name!r}: the name must be a Python identifier (it is a RunConfig field)")

    def legacy_value(self, values: dict):
        """The value a config without this option meant (``values``: its other options)."""
        if self.legacy_rule is not None:
            return self.legacy_rule(values)
        return self.default if self.legacy is None else self.legacy

    def problem(self, value) -> Optional[str]:
        if self.choices is not None and value not in self.choices:
            return f"unknown {option_name(self.name)} {value!r}; choose one of: {', '.join(self.choices)}"
        message = self.check(value) if self.check is not None else None
        if message is None:
            return None
        got = f"got {value!r}"  # at "{got}" in the message, else at its end
        return f"{option_name(self.name)} " + (message.replace("{got}", got) if "{got}" in message else
                                               f"{message}, {got}")


# -- range checks, as Option.check -------------------------------------------------------------------------------
def positive(value) -> Optional[str]:
    return None if value == value and value > 0 and value != float("inf") else "must be a positive number"


def positive_int(value) -> Optional[str]:
    return None if value > 0 else "must be a positive integer"


def non_negative(value) -> Optional[str]:
    return None if value >= 0 else "must be a non-negative integer"


def every(value) -> Optional[str]:
    """A schedule ``--*-every N``: N > 0 steps or passes between measurements, 0 = off."""
    return None if value >= 0 else "must be a non-negative integer (0 = off)"


@dataclass(frozen=True)
class Record:
    """A record kind and its fields, declared once: the run store validates every record through this (and the
    analysis melts ``numbers`` into the long-form table). ``numbers``: numbers or null; ``number_lists``: lists of
    numbers; ``strings`` and ``integers``: required strings and non-negative integers; ``number_matrices``:
    required non-empty lists of non-empty lists of numbers, all of one record's of the same shape (per-probe
    quadrature nodes and weights); ``bn_mode``: "batch", "running", or "both" (one record per mode)."""

    kind: str
    numbers: Tuple[str, ...] = ()
    number_lists: Tuple[str, ...] = ()
    bn_mode: str = "batch"
    strings: Tuple[str, ...] = ()
    integers: Tuple[str, ...] = ()
    number_matrices: Tuple[str, ...] = ()


@dataclass(frozen=True)
class Metric:
    """One row of the report: a run's records of ``kind`` reduced to one number (``experiments.analysis.metrics``)."""

    name: str
    label: str   # may hold "{loss}": the runs' training loss, from their configs (``label_for``)
    kind: str
    field: str   # a record field, or "a-b": the difference of two fields of one record
    reduce: str  # "last", "median" or "p90"

    def label_for(self, df) -> str:
        return self.label.format(loss=loss_name(df))


def loss_name(df) -> str:
    """The training loss of the runs in ``df`` (a long-form DataFrame) as their configs name it ("cross-entropy",
    "mse"); "/"-joined if the runs differ."""
    names = sorted(df["loss"].dropna().unique()) if "loss" in df else []
    return "/".join(names) or "cross-entropy"


@dataclass
class RunContext:
    """What a measurement's hooks are built from: the run as `experiments.training.train_run` set it up.

    ``order`` is the run's fixed permutation of the training subset (the fixed samples measurements use are its
    first images); ``sampler`` the minibatch generator (a measurement that draws from it changes the run's batches:
    the order of draws is part of the record); ``lookahead(state)`` the optimizer's next step, computed once per
    step; ``emit`` writes a record at once (before raising, say); ``shared`` state measurements share (the
    sharpness sample and warm start); ``checkpointed`` name -> (get_state, set_state) of state a resumed run must
    get back; ``last_eval`` the latest ``eval`` record."""

    cfg: Any
    model: Any
    data: Any
    loss_fn: Callable
    optimizer: Any
    device: Any
    timer: Any
    sampler: Any
    order: Any
    init_state: Mapping
    per_epoch: int
    total: int
    epoch_of: Callable[[int], int]
    lookahead: Callable
    emit: Callable[[dict], None]            # write a record now (a hook may also return its records)
    shared: Dict[str, Any] = field(default_factory=dict)
    checkpointed: Dict[str, Tuple[Callable, Callable]] = field(default_factory=dict)
    last_eval: Optional[dict] = None

    @property
    def x_train(self):
        return self.data.x_train

    @property
    def y_train(self):
        return self.data.y_train

    @property
    def per_eval(self) -> int:
        """Steps between evaluation points (``--eval-every`` passes): the schedule of per-pass measurements."""
        return self.per_epoch * self.cfg.eval_every

    def at(self, step: int, record: dict) -> dict:
        """``record`` with the step and epoch it describes first, as every record has them."""
        return {"step": step, "epoch": self.epoch_of(step), **record}


@dataclass(frozen=True)
class Measurement:
    """One measurement along training (module docstring). ``check(cfg)`` returns what is wrong with a combination
    of options (or None); ``schedule`` says when it runs, for the docs and ``--help``."""

    name: str
    schedule: str
    options: Tuple[Option, ...] = ()
    records: Tuple[Record, ...] = ()
    hooks: Optional[Callable[[RunContext], Sequence[Any]]] = None
    metrics: Tuple[Metric, ...] = ()
    check: Optional[Callable[[Any], Optional[str]]] = None


#: One reference to something a feature provides: the object itself, or "package.module:attribute", imported only
#: when it is used (so that ``--help`` imports no plotting or statistics code).
Ref = Any


def resolve(ref: Ref):
    """The object ``ref`` names ("package.module:attribute"), or ``ref`` itself."""
    if not isinstance(ref, str):
        return ref
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class Feature:
    """Everything the toolkit knows about one feature, registered once with `register`:

    - ``measurement``: what a run measures along training (options, records, hooks, report metrics), or None for a
      feature that only reads runs (surfaces, the seed diagnostics);
    - ``figures``: writers `smoothness-lab plot` (``experiments.analysis.plot_study``) calls; each has
      ``applies(df, runs)`` and ``write(context) -> paths`` (``experiments.analysis.plots``);
    - ``report``: a function ``(df, runs, include_unfinished) -> list of markdown lines``, a section of report.md;
    - ``commands``: click commands added to ``smoothness-lab``.
    References may be strings "module:attribute" (see `resolve`)."""

    name: str
    summary: str = ""
    measurement: Optional[Measurement] = None
    figures: Tuple[Ref, ...] = ()
    report: Optional[Ref] = None
    commands: Tuple[Ref, ...] = ()

    @property
    def kinds(self) -> Tuple[str, ...]:
        """The record kinds this feature writes."""
        return tuple(r.kind for r in self.measurement.records) if self.measurement else ()


FEATURES: Dict[str, Feature] = {}
#: the measurements of the registered features, in registration order (a view kept in step with FEATURES)
MEASUREMENTS: Dict[str, Measurement] = {}


class RegistryError(ValueError):
    """A feature or measurement that cannot be registered as it is; the message says why."""


def _check_measurement(measurement: Measurement) -> None:
    if measurement.name in MEASUREMENTS:
        raise RegistryError(f"a measurement named {measurement.name!r} is already registered")
    taken = {o.name for m in MEASUREMENTS.values() for o in m.options} | _reserved
    clash = [o.name for o in measurement.options if o.name in taken]
    if clash:
        raise RegistryError(f"measurement {measurement.name!r}: options {clash} already exist")
    kinds = {r.kind for m in MEASUREMENTS.values() for r in m.records} | set(CORE_RECORD_NUMBERS)
    clash = [r.kind for r in measurement.records if r.kind in kinds]
    if clash:
        raise RegistryError(f"measurement {measurement.name!r}: record kinds {clash} already exist")


def register(feature):
    """Add a `Feature` (or a bare `Measurement`, made a feature of the same name) after the ones registered: its
    hooks run after theirs, its figures are drawn after theirs. Names, option names and record kinds must be new.
    Returns what was passed."""
    item = feature
    if isinstance(feature, Measurement):
        feature = Feature(feature.name, measurement=feature)
    if not isinstance(feature, Feature):
        raise RegistryError(f"register takes a Feature or a Measurement, got {type(item).__name__}")
    if feature.name in FEATURES:
        raise RegistryError(f"a feature named {feature.name!r} is already registered")
    if feature.measurement is not None:
        _check_measurement(feature.measurement)
        MEASUREMENTS[feature.measurement.name] = feature.measurement
    FEATURES[feature.name] = feature
    return item


def unregister(name: str) -> None:
    """Remove a feature (or the feature of a measurement) registered after the built-in ones (tests, notebooks)."""
    if name in _built_in:
        raise RegistryError(f"{name!r} is built in; it cannot be removed")
    feature = FEATURES.pop(name, None) or next((f for f in FEATURES.values() if f.measurement is not None
                                                and f.measurement.name == name), None)
    if feature is not None:
        FEATURES.pop(feature.name, None)
        if feature.measurement is not None:
            MEASUREMENTS.pop(feature.measurement.name, None)


#: where `load_plugins` finds features defined outside the package: modules named (comma-separated) in this
#: environment variable, and entry points of this group (``[options.entry_points] smoothness_lab.features = ...``)
PLUGINS_ENV = "SMOOTHNESS_LAB_FEATURES"
ENTRY_POINT_GROUP = "smoothness_lab.features"
_loaded_plugins: set = set()


def load_plugins() -> Tuple[str, ...]:
    """Import every feature module named by ``$SMOOTHNESS_LAB_FEATURES`` or an entry point of
    ``smoothness_lab.features``, and register its ``FEATURE`` unless importing it registered it already. The CLI
    calls this before it parses, and every worker before its task, so a feature outside the package reaches runs
    on every executor. Returns the modules loaded now."""
    import os
    from importlib.metadata import entry_points

    names = [n.strip() for n in os.environ.get(PLUGINS_ENV, "").split(",") if n.strip()]
    names += [ep.value.partition(":")[0] for ep in entry_points(group=ENTRY_POINT_GROUP)]
    loaded = []
    for name in names:
        if name in _loaded_plugins:
            continue
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            raise RegistryError(f"{PLUGINS_ENV} names the feature module {name!r}, which cannot be imported ({exc}); "
                                f"put its folder on PYTHONPATH") from None
        _loaded_plugins.add(name)
        feature = getattr(module, "FEATURE", None)
        if isinstance(feature, Feature) and feature.name not in FEATURES:
            register(feature)
        loaded.append(name)
    return tuple(loaded)


def freeze_built_in() -> Tuple[str, ...]:
    """Mark the measurements registered so far as built in (``experiments.features`` does, once): their options
    are RunConfig's generated fields, and they cannot be removed."""
    _built_in.update(FEATURES)
    _built_in.update(MEASUREMENTS)
    return tuple(FEATURES)


def reserve(names) -> None:
    """RunConfig's own fields (config.py): names no measurement option may take."""
    _reserved.update(names)


_built_in: set = set()
_reserved: set = set()
#: record kinds the loop itself writes, outside any measurement
CORE_RECORD_NUMBERS = {"diverged": ("loss",)}


def options() -> Iterator[Option]:
    for m in MEASUREMENTS.values():
        yield from m.options


def find_option(name: str) -> Optional[Option]:
    return next((o for o in options() if o.name == name), None)


def metrics() -> Tuple[Metric, ...]:
    return tuple(x for m in MEASUREMENTS.values() for x in m.metrics)


class RecordSchema(Mapping):
    """record kind -> its fields of one sort (``numbers`` or ``number_lists``), read from the registry on every
    look-up, so a measurement registered later is checked like a built-in one."""

    def __init__(self, attr: str, core: Mapping):
        self.attr, self.core = attr, dict(core)

    def _table(self) -> Dict[str, Tuple[str, ...]]:
        table = dict(self.core)
        for m in MEASUREMENTS.values():
            for r in m.records:
                if getattr(r, self.attr):
                    table[r.kind] = getattr(r, self.attr)
        return table

    def __getitem__(self, kind):
        return self._table()[kind]

    def __iter__(self):
        return iter(self._table())

    def __len__(self):
        return len(self._table())

    def __repr__(self):
        return f"RecordSchema({self._table()!r})"
