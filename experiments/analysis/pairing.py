"""Which runs may be averaged together, and which runs of two models form a pair.

Runs are averaged only when they differ in nothing but the seed. Two runs of different models pair when they share
the seed, the learning rate and every other option: seed s draws the same training subset and the same batch order
for every model (``experiments.data``, ``experiments.training``), so the per-seed difference b − a removes the
subset-to-subset variation that an unpaired test would count as noise.

The options of a run are its config.json minus the model, norm, seed and lr, the run id and hash, and the execution
fields (``experiments.config.EXECUTION_FIELDS``: where and how a run executed, not what it computed). Keys that are
not known today are kept: two runs that may differ are never pooled. Numbers are compared as floats, so ``1`` and
``1.0`` are the same option.

When a study folder holds several configurations of one model (say the same grid relaunched with another
``--probe-every``), the options that differ within the folder become the run's ``variant``, and its group label is
``model [variant]``: ``convnet [probe_every=5]``. Every table and figure groups by that label.
"""
from __future__ import annotations

import hashlib
import json

import pandas as pd

from experiments.config import EXECUTION_FIELDS
from experiments.analysis.errors import AnalysisError

NOT_OPTIONS = frozenset({"model", "norm", "seed", "lr", "run_id", "config_hash", *EXECUTION_FIELDS})
PAIR_ON = ["lr", "seed", "options"]  # with the model (or norm) the only difference, runs on these keys pair
_MISSING = "<unset>"


def _canonical(value):
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in sorted(value.items())}
    return str(value)


def options_of(config: dict) -> dict:
    """The options two runs must share (besides seed and lr) to be averaged or paired, in canonical form."""
    return {k: _canonical(v) for k, v in sorted(config.items()) if k not in NOT_OPTIONS}


def options_key(config: dict) -> str:
    """12 hex characters identifying ``options_of(config)``."""
    blob = json.dumps(options_of(config), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def _show(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return value if isinstance(value, str) else json.dumps(value)


def variant_labels(configs: list[dict]) -> list[str]:
    """Per config: ``"k=v, ..."`` over the options that are not the same in every config given ("" if none)."""
    options = [options_of(c) for c in configs]
    keys = sorted(set().union(*options)) if options else []
    varying = [k for k in keys if len({json.dumps(o.get(k, _MISSING)) for o in options}) > 1]
    return [", ".join(f"{k}={_show(o.get(k, _MISSING))}" for k in varying) for o in options]


def group_label(model: str, variant: str) -> str:
    return f"{model} [{variant}]" if variant else model


def base_model(group: str, variant: str) -> str:
    """The model label of a group label (its variant suffix removed)."""
    suffix = f" [{variant}]" if variant else ""
    return group[: len(group) - len(suffix)] if suffix and group.endswith(suffix) else group


def comparison_pairs(runs: pd.DataFrame, compare=None) -> list[tuple[str, str]]:
    """Pairs (a, b) of group labels to compare, b − a.

    Default: (X, bn-X) for every model X whose "bn-" counterpart ran with the same options (one pair per variant).
    ``compare=(a, b)`` names two groups, or two models (then one pair per variant that holds both).
    """
    groups = runs.drop_duplicates("model")[["model", "variant"]]
    by_variant: dict[str, list[str]] = {}
    for group, variant in zip(groups["model"], groups["variant"]):
        by_variant.setdefault(variant, []).append(base_model(group, variant))
    labels = list(groups["model"])
    if compare is not None:
        compare = tuple(compare)
        if len(compare) == 2 and all(c in labels for c in compare):
            return [compare]
        pairs = [(group_label(compare[0], v), group_label(compare[1], v)) for v, models in by_variant.items()
                 if len(compare) == 2 and compare[0] in models and compare[1] in models]
        if not pairs:
            raise AnalysisError(f"compare={compare!r}: expected two of the study's models {labels}")
        return pairs
    return [(group_label(m, v), group_label(f"bn-{m}", v)) for v, models in by_variant.items()
            for m in models if f"bn-{m}" in models]


def pair_up(a: pd.DataFrame, b: pd.DataFrame, column: str) -> pd.DataFrame:
    """Per-run values of two groups matched on ``PAIR_ON``: columns a, b (only pairs where both are numbers)."""
    merged = a[PAIR_ON + [column]].merge(b[PAIR_ON + [column]], on=PAIR_ON, suffixes=("_a", "_b"))
    merged = merged.rename(columns={f"{column}_a": "a", f"{column}_b": "b"}).dropna(subset=["a", "b"])
    return merged.sort_values(PAIR_ON, ignore_index=True)
