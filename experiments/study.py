"""What every study command asks of a run directory beyond its records: whether it is the run its name says, whether
a finished run still holds its records, whether its network normalises with batch statistics (the BN axis), and the
run itself rebuilt (model at the weights of an epoch, loss, data, config).

- `identity_problem`: a folder whose config.json does not hash to the folder's name (``RunConfig.run_id``; a copied
  run folder keeps the ``run_id`` of the original) is not the run its name says; `analysis.load.read_study` skips and
  names it, `status` calls it corrupt.
- `records_problem`: a finished run whose records.jsonl no longer holds what it finished with (``store.check_finished``:
  ``done``'s records mark, or the last checkpoint's); the loader skips and names it.
- `batch_normalised`: from the network, not its name: the normalisation recorded at run start (code.json's model
  entry, tracker.json), else the config's norm for a built-in model, else the rebuilt network's layers.
- `rebuild`: built-in, ``MODULE:FACTORY`` (models and datasets), ``imagefolder:PATH`` and tracked runs whose model
  is an import string (the Tracker names a run after its model's class). The user's code must be importable: a
  one-line `RebuildError` says how to point at it (PYTHONPATH).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from experiments import store
from experiments.config import ConfigError, RunConfig, option_names

__all__ = ["RebuildError", "Rebuilt", "identity_problem", "records_problem", "normalization_of", "batch_normalised",
           "rebuild", "rebuild_model", "run_data", "model_for"]


class RebuildError(ValueError):
    """A run that cannot be rebuilt here; the message says why and what to do."""


def _as_config(data: dict) -> Optional[RunConfig]:
    """The RunConfig of a config.json object, or None when this version cannot read it (an older or foreign key)."""
    names = option_names()
    try:
        return RunConfig.from_dict({k: v for k, v in data.items() if k in names | {"run_id", "config_hash"}})
    except (ConfigError, TypeError, ValueError, KeyError, AttributeError):
        return None


def identity_problem(run_dir, data: dict) -> Optional[str]:
    """Why the folder ``run_dir`` does not hold the run its config describes (None when it does): the config names
    another run, or its options hash to another run id (``RunConfig.run_id``)."""
    name = Path(run_dir).name
    recorded = data.get("run_id")
    if recorded is not None and recorded != name:
        return (f"{store.CONFIG}: it is the config of run {recorded}, not of {name} (a copied or renamed run "
                f"folder: its records would count twice)")
    cfg = _as_config(data)
    if cfg is not None and cfg.run_id != name:
        return (f"{store.CONFIG}: its options give run id {cfg.run_id}, not the folder's name {name} (a renamed "
                f"folder, or an edited config)")
    return None


def records_problem(run_dir) -> Optional[str]:
    """For a finished run: one line saying its records.jsonl was cut or changed since it finished (None if not)."""
    found = store.check_finished(run_dir)
    return None if found is None else f"{found.state}: {found.problem}"


# -- the BN axis: from the network ----------------------------------------------------------------------------------
def normalization_of(model) -> str:
    """The normalisation layers of a network: ``"batch"`` when its train-mode output couples the samples of a batch
    (BatchNorm and the toolkit's batch norms), else ``"none"``."""
    from experiments.normalization import batch_coupled
    return "batch" if batch_coupled(model) else "none"


def _recorded_normalization(run_dir) -> Optional[str]:
    if run_dir is None:
        return None
    code = store.read_code(run_dir) or {}
    model = code.get("model") if isinstance(code, dict) else None
    if isinstance(model, dict) and model.get("normalization") in ("batch", "none"):
        return model["normalization"]
    tracked = store.read_tracker_info(run_dir) or {}
    value = tracked.get("normalization")
    return value if value in ("batch", "none") else None


def batch_normalised(config: dict, run_dir=None) -> bool:
    """Whether the run's network normalises with batch statistics: recorded at run start, else the config's norm
    (built-in models), else the network rebuilt from the run (`rebuild_model`)."""
    recorded = _recorded_normalization(run_dir)
    if recorded is not None:
        return recorded == "batch"
    from experiments.models import MODELS, resolve_norm
    from experiments.normalization import make_norm
    if config.get("model") in MODELS:
        return normalization_of(make_norm(resolve_norm(config["model"], config.get("norm")), 4, 1)) == "batch"
    if run_dir is None:
        raise RebuildError(f"model {config.get('model')!r}: its normalisation is not recorded; give the run folder")
    return normalization_of(rebuild_model(run_dir)) == "batch"


# -- one way to rebuild a run ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rebuilt:
    """A run rebuilt from its directory: ``model`` at the weights of ``epoch`` (CPU, eval mode left to the caller),
    ``loss_fn(output, target, reduction=...)``, ``data`` (`experiments.data.Dataset`), ``config``."""
    config: RunConfig
    model: Any
    loss_fn: Callable
    data: Any
    epoch: str
    weights_path: Path
    weights_sha256: str


def _config(run_dir: Path) -> RunConfig:
    path = store.config_path(run_dir)
    if not path.exists():
        raise RebuildError(f"{run_dir} is not a run directory (no {path.name}); give results/<study>/<run-id>")
    try:
        return store.read_config(path)
    except store.StoreError as exc:
        raise RebuildError(str(exc)) from None


def _user_code(cfg: RunConfig, call):
    """``call()``, with a failed import of the user's code turned into a one-line RebuildError."""
    from experiments.plugins import PluginError
    try:
        return call()
    except PluginError as exc:
        raise RebuildError(f"{exc}; the run's code must be importable here: add its folder to PYTHONPATH (the "
                           f"folder of the files code.json names)") from None


def _data(cfg: RunConfig, data_dir: Optional[str]):
    from experiments.plugins import load_run_dataset
    return _user_code(cfg, lambda: load_run_dataset(cfg, data_dir))


def _fresh_model(cfg: RunConfig, data):
    import torch

    from experiments.plugins import build_run_model
    state = torch.get_rng_state()
    try:
        torch.manual_seed(cfg.seed)
        return _user_code(cfg, lambda: build_run_model(cfg, data))
    finally:
        torch.set_rng_state(state)


def _shapes(cfg: RunConfig, run_dir: Path, data_dir: Optional[str]):
    """A stand-in for the run's data holding only what a model is built from (input shape, classes), without loading
    the data where the run recorded them."""
    from experiments.data import DATASETS
    if cfg.dataset in DATASETS:
        spec = DATASETS[cfg.dataset]
        return _Shapes(tuple(spec.input_shape), spec.num_classes)
    info = store.read_dataset_info(run_dir) or {}
    shape, classes = info.get("input_shape"), info.get("n_classes")
    if isinstance(shape, list) and isinstance(classes, int):
        return _Shapes(tuple(shape), classes)
    return _data(cfg, data_dir)


@dataclass(frozen=True)
class _Shapes:
    input_shape: tuple
    num_classes: int


def run_data(cfg: RunConfig, data_dir: Optional[str] = None):
    """The run's data (`experiments.data.Dataset`): a registered dataset, ``imagefolder:PATH`` or ``MODULE:FACTORY``."""
    return _data(cfg, data_dir)


def model_for(cfg: RunConfig, input_shape, num_classes: int, state: Optional[dict] = None, source="the weights"):
    """The run's network for inputs of ``input_shape`` and ``num_classes`` outputs, with ``state`` loaded (weights
    from ``source``, named in the error when they belong to another network)."""
    model = _fresh_model(cfg, _Shapes(tuple(input_shape), int(num_classes)))
    if state is not None:
        _load(model, cfg, source, state)
    return model


def rebuild_model(run_dir, epoch: Optional[str] = None, data=None, data_dir: Optional[str] = None):
    """The run's network (its initialisation when ``epoch`` is None, else the weights of ``epoch``: "init",
    "final" or a kept checkpoint's number), on CPU."""
    run_dir = Path(run_dir)
    cfg = _config(run_dir)
    model = _fresh_model(cfg, data if data is not None else _shapes(cfg, run_dir, data_dir))
    if epoch is not None:
        path, state, _ = _weights(run_dir, epoch)
        _load(model, cfg, path, state)
    return model


def _weights(run_dir: Path, epoch: str):
    try:
        path = store.weights_file(run_dir, epoch)
        state, sha = store.load_weights(path)
    except store.StoreError as exc:
        raise RebuildError(str(exc)) from None
    return path, state, sha


def _load(model, cfg: RunConfig, path: Path, state: dict) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        lines = str(exc).splitlines()
        first = (lines[1] if len(lines) > 1 else lines[0]).strip()[:200]
        raise RebuildError(f"{path} does not hold weights of this run's model ({cfg.model}, norm {cfg.norm}): "
                           f"{first}; it belongs to another run: restore the run's own file, or retrain it") \
            from None


def rebuild(run_dir, epoch: str = "final", data_dir: Optional[str] = None) -> Rebuilt:
    """The run in ``run_dir`` rebuilt (module docstring): config, model at ``epoch``'s weights, loss, data."""
    from experiments.losses import get_loss
    run_dir = Path(run_dir)
    cfg = _config(run_dir)
    data = _data(cfg, data_dir)
    model = _fresh_model(cfg, data)
    path, state, sha = _weights(run_dir, epoch)
    _load(model, cfg, path, state)
    return Rebuilt(cfg, model, get_loss(cfg.loss), data, epoch, path, sha)

