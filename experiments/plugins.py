"""Your model, your data: ``--model MODULE:FACTORY`` and ``--dataset MODULE:FACTORY`` (or ``imagefolder:PATH``).

Tells import strings from built-in ``model:norm`` entries, calls the factories, reads user datasets once into
tensors (not standardised), puts the import strings in the run id and the factories' source hashes and the data's
fingerprint in the run directory, and checks data and models before anything is written (`check_runs`: a one-line
`PluginError` naming what to fix).

Details: docs/explanation/modules.md#plugins
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import json
import os
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from experiments.data import DATASETS, DataError, Dataset, from_tensors, load_dataset
from experiments.imagefolder import load_imagefolder
from experiments.input_checks import frozen_or_empty, missing_linear, non_finite, one_line, single_class
from experiments.models import MODELS, build_model

__all__ = ["IMAGEFOLDER", "PluginError", "build_run_model", "check_run", "check_runs", "code_changes", "code_info",
           "is_imagefolder", "is_user_dataset", "is_user_model", "load_run_dataset", "parse_args", "run_id_stem",
           "split_model_spec", "tensor_fingerprint"]

IMAGEFOLDER = "imagefolder"
_EXTRA_MODEL_ARGS = ("input_shape", "num_classes")


class PluginError(DataError):
    """A user model or dataset cannot be used; the one-line message says what to fix."""


# --------------------------------------------------------------------------------------------------------------
# Syntax: which strings are import strings (no import happens here)

def is_user_model(model: str) -> bool:
    """``MODULE:FACTORY`` (the part before the colon not a registry model; ``convnet:noisy`` is a norm variant)."""
    return ":" in model and model.partition(":")[0] not in MODELS


def is_imagefolder(dataset: str) -> bool:
    return dataset.partition(":")[0] == IMAGEFOLDER and ":" in dataset


def is_user_dataset(dataset: str) -> bool:
    return ":" in dataset and dataset not in DATASETS and not is_imagefolder(dataset)


def split_model_spec(spec: str) -> tuple[str, Optional[str]]:
    """A ``--models`` entry as (model, norm): ``convnet:noisy`` -> (convnet, noisy), ``mod:fn`` -> (mod:fn, None)."""
    if is_user_model(spec):
        return spec, None
    model, _, norm = spec.partition(":")
    return model, norm or None


def check_syntax(spec: str, option: str) -> None:
    """MODULE:FACTORY with a dotted module name and an attribute name (imports nothing)."""
    module, _, attr = spec.partition(":")
    if not all(part.isidentifier() for part in module.split(".")) or not attr.isidentifier():
        raise PluginError(f"{option} {spec!r} is not an import string MODULE:FACTORY (e.g. small_resnet:resnet, "
                          f"mypkg.models:net)")


def run_id_stem(model: str) -> str:
    """The model's part of a run directory name: ``small_resnet:resnet`` -> ``small_resnet.resnet`` (no colon in
    folder names: they break PATH-like lists and other file systems)."""
    return model.replace(":", ".")


def normal_dataset(dataset: str) -> str:
    """``imagefolder:PATH`` with PATH made absolute (a run launched from another folder reads the same tree)."""
    if is_imagefolder(dataset):
        return f"{IMAGEFOLDER}:{os.path.abspath(os.path.expanduser(dataset.partition(':')[2]))}"
    return dataset


def parse_args(values: Sequence[str], option: str) -> dict:
    """``KEY=VALUE`` strings as a dict: VALUE as JSON where it parses (16, 0.5, true, [32, 32], "x"), else the
    string itself (bn)."""
    out = {}
    for item in values:
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq or not key.isidentifier():
            raise PluginError(f"{option} {item!r} is not KEY=VALUE with KEY a Python name (e.g. {option} width=16)")
        if key in out:
            raise PluginError(f"{option} {key} is given twice")
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw
    return dict(sorted(out.items()))


# --------------------------------------------------------------------------------------------------------------
# Resolution: import the module, find the factory

def _resolve(spec: str, option: str) -> tuple[Callable, str]:
    """(the factory, its source file) for ``MODULE:FACTORY``."""
    check_syntax(spec, option)
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise PluginError(f"{option} {spec}: no module named {module_name!r} is importable; put the folder that "
                              f"holds {module_name.split('.')[0]} on PYTHONPATH (e.g. PYTHONPATH=examples)") from None
        raise PluginError(f"{option} {spec}: importing {module_name} failed: {exc} (a package it needs is not "
                          f"installed)") from None
    except Exception as exc:  # the user's module raised while it was imported
        raise PluginError(f"{option} {spec}: importing {module_name} raised {type(exc).__name__}: {exc}") from None
    factory = getattr(module, attr, None)
    if factory is None:
        public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                        and getattr(v, "__module__", None) == module.__name__)
        raise PluginError(f"{option} {spec}: module {module_name} ({getattr(module, '__file__', '?')}) has no "
                          f"attribute {attr!r}; it defines: {', '.join(public) or 'no functions'}")
    if not callable(factory):
        raise PluginError(f"{option} {spec}: {module_name}.{attr} is a {type(factory).__name__}, not a callable "
                          f"factory")
    try:
        source = inspect.getsourcefile(factory) or module.__file__
    except TypeError:  # a builtin or a C extension: the module's file is what can change
        source = getattr(module, "__file__", None)
    return factory, str(Path(source).resolve()) if source else ""


def _call(factory: Callable, spec: str, option: str, args: dict, extra: dict):
    """Call ``factory(**args, **extra)``, passing each of ``extra`` only where the signature takes it."""
    clash = sorted(set(args) & set(extra))
    if clash:
        raise PluginError(f"{option.replace('--model', '--model-arg').replace('--dataset', '--dataset-arg')} "
                          f"{', '.join(clash)}: set from the dataset, not an argument")
    kwargs = dict(args)
    try:
        params = inspect.signature(factory).parameters
        takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        kwargs.update({k: v for k, v in extra.items() if takes_all or k in params})
    except (TypeError, ValueError):  # no signature to read: pass only what the user gave
        pass
    try:
        return factory(**kwargs)
    except Exception as exc:
        called = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        raise PluginError(f"{option} {spec} raised {type(exc).__name__}: {exc} (called as "
                          f"{spec.partition(':')[2]}({called}))") from None


def _sha256(path: str) -> Optional[str]:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


# --------------------------------------------------------------------------------------------------------------
# Datasets

def _label(value, where: str) -> int:
    if isinstance(value, torch.Tensor) and value.ndim == 0 and not value.is_floating_point() \
            and value.dtype is not torch.bool:
        value = value.item()
    elif hasattr(value, "dtype") and getattr(value, "shape", None) == () and "int" in str(value.dtype):
        value = int(value)  # a numpy integer
    if isinstance(value, bool) or not isinstance(value, int):
        raise PluginError(f"{where}: the label is a {type(value).__name__} ({value!r}), expected an int class index")
    if value < 0:
        raise PluginError(f"{where}: the label is {value}, expected a class index 0, 1, ...")
    return value


def _split_tensors(split, name: str, spec: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Read every item of one split once: (inputs (n, *shape) float32, labels (n,) int64)."""
    where = f"--dataset {spec}: the {name} set"
    try:
        n = len(split)
        first = split[0] if n else None
    except TypeError:
        raise PluginError(f"{where} is a {type(split).__name__}, not a map-style torch Dataset (len() and [i]); "
                          f"return (train, test) Datasets") from None
    except Exception as exc:
        raise PluginError(f"{where}: reading item 0 raised {type(exc).__name__}: {exc}") from None
    if n == 0:
        raise PluginError(f"{where} is empty")
    xs, ys, shape = [], [], None
    for i in range(n):
        try:
            item = first if i == 0 else split[i]
        except Exception as exc:
            raise PluginError(f"{where}: reading item {i} raised {type(exc).__name__}: {exc}") from None
        here = f"{where}, item {i}"
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise PluginError(f"{here} is a {type(item).__name__}, expected a pair (tensor, int label)")
        x, y = item
        if not isinstance(x, torch.Tensor):
            if type(x).__module__ == "numpy":
                x = torch.as_tensor(x)
            else:
                hint = " (a PIL image: add torchvision.transforms.ToTensor() to its transform)" \
                    if type(x).__module__.startswith("PIL") else ""
                raise PluginError(f"{here}: the input is a {type(x).__name__}, expected a tensor{hint}")
        if shape is None:
            shape = tuple(x.shape)
        elif tuple(x.shape) != shape:
            raise PluginError(f"{here}: the input has shape {tuple(x.shape)}, item 0 {shape}; every input must have "
                              f"one shape (resize in the dataset's transform)")
        if x.ndim == 0:
            raise PluginError(f"{here}: the input is a scalar, expected a tensor of features or pixels")
        xs.append(x)
        ys.append(_label(y, here))
    x = torch.stack(xs)
    problem = non_finite(x.float())
    if problem:   # a NaN input reads as a run diverged at step 0, an inf test input as a test loss of null
        too_large = " (finite as given, but too large for float32, whose largest is 3.4e38)" if non_finite(x) is None \
            else ""
        raise PluginError(f"{where}'s {problem}{too_large}; fix the data (or its transform): nothing can be trained "
                          f"or measured on non-finite inputs")
    return x.float(), torch.tensor(ys, dtype=torch.int64)


@functools.lru_cache(maxsize=4)
def _user_splits(spec: str, args_json: str) -> tuple:
    """The factory's (x_train, y_train, x_test, y_test, num_classes, info), read once per process."""
    factory, source = _resolve(spec, "--dataset")
    args = json.loads(args_json)
    out = _call(factory, spec, "--dataset", args, {})
    if isinstance(out, dict) and set(out) >= {"train", "test"}:
        train, test = out["train"], out["test"]
    elif isinstance(out, (tuple, list)) and len(out) == 2:
        train, test = out
    else:
        shown = f"a dict with keys {sorted(map(str, out))}" if isinstance(out, dict) else f"a {type(out).__name__}"
        raise PluginError(f"--dataset {spec} returned {shown}; expected (train, test) torch Datasets or "
                          f"{{'train': ..., 'test': ...}}")
    x_train, y_train = _split_tensors(train, "training", spec)
    x_test, y_test = _split_tensors(test, "test", spec)
    if x_train.shape[1:] != x_test.shape[1:]:
        raise PluginError(f"--dataset {spec}: training inputs have shape {tuple(x_train.shape[1:])}, test inputs "
                          f"{tuple(x_test.shape[1:])}; both splits must have one shape")
    classes = getattr(train, "classes", None)
    largest = int(max(y_train.max(), y_test.max())) + 1
    num_classes = len(classes) if isinstance(classes, (list, tuple)) and classes else largest
    if largest > num_classes:
        raise PluginError(f"--dataset {spec}: a label is {largest - 1}, but the training set's classes list "
                          f"{num_classes} classes")
    info = {"source": "import", "factory": spec, "args": args, "file": source, "sha256": _sha256(source),
            "n_classes": num_classes}
    return x_train, y_train, x_test, y_test, num_classes, info


def load_run_dataset(cfg, data_dir: Optional[str] = None) -> Dataset:
    """The run's dataset (``cfg``: a RunConfig): a registry name, ``imagefolder:PATH`` or ``MODULE:FACTORY``."""
    if not (is_imagefolder(cfg.dataset) or is_user_dataset(cfg.dataset)):
        return load_dataset(cfg.dataset, subset=cfg.subset, seed=cfg.seed, data_dir=data_dir)
    if is_imagefolder(cfg.dataset):
        x_train, y_train, x_test, y_test, classes, info, standardise = load_imagefolder(
            cfg.dataset.partition(":")[2], cfg.dataset_args)
    else:
        x_train, y_train, x_test, y_test, classes, info = _user_splits(
            cfg.dataset, json.dumps(cfg.dataset_args, sort_keys=True))
        standardise = False
    # the content read, so that a resume on changed files or a changed factory output is refused (store.begin)
    info = {**info, "fingerprint": tensor_fingerprint(x_train, y_train, x_test, y_test)}
    return from_tensors(cfg.dataset, x_train, y_train, x_test, y_test, num_classes=classes, subset=cfg.subset,
                        seed=cfg.seed, info=info, standardise=standardise)


# --------------------------------------------------------------------------------------------------------------
# Models

def build_run_model(cfg, data: Dataset) -> nn.Module:
    """The run's model for ``data`` (call under the run's torch seed: the initialisation draws from it)."""
    if not is_user_model(cfg.model):
        return build_model(cfg.model, norm=cfg.norm, input_shape=data.input_shape, num_classes=data.num_classes,
                           naive_init=cfg.naive_init)
    factory, _ = _resolve(cfg.model, "--model")
    model = _call(factory, cfg.model, "--model", cfg.model_args,
                  {"input_shape": tuple(data.input_shape), "num_classes": data.num_classes})
    if not isinstance(model, nn.Module):
        raise PluginError(f"--model {cfg.model} returned a {type(model).__name__}; expected a torch.nn.Module "
                          f"whose outputs are the logits")
    return model


def check_run(cfg, data_dir: Optional[str] = None) -> None:
    """`check_runs` for one run."""
    check_runs([cfg], data_dir)


def check_runs(runs: Sequence, data_dir: Optional[str] = None) -> None:
    """Everything that can go wrong with the runs' data and models, before anything is written (raises a one-line
    `PluginError`): each run's data is loaded (cached per process: the launch reads it again) and its training subset
    must hold two classes or more; each model is built once per dataset and probed (`_probe`); a run with
    ``--generalization-every`` needs an nn.Linear in its model."""
    data, probes = {}, {}
    for cfg in runs:
        key = (cfg.dataset, json.dumps(cfg.dataset_args, sort_keys=True), cfg.subset, cfg.seed)
        if key not in data:
            data[key] = load_run_dataset(cfg, data_dir)
            problem = single_class(data[key].y_train)
            if problem:
                part = "set" if cfg.subset == 1 else f"subset (--subset {cfg.subset}, seed {cfg.seed})"
                raise PluginError(f"--dataset {cfg.dataset}: the training {part} {problem}; give a dataset with more")
    for cfg in runs:
        run_data = data[(cfg.dataset, json.dumps(cfg.dataset_args, sort_keys=True), cfg.subset, cfg.seed)]
        smallest = _smallest_batch(cfg, len(run_data.x_train))
        key = (cfg.model, cfg.norm, json.dumps(cfg.model_args, sort_keys=True), cfg.naive_init, cfg.dataset,
               json.dumps(cfg.dataset_args, sort_keys=True), cfg.loss, smallest == 1)
        if key not in probes:
            probes[key] = _probe(cfg, run_data, smallest)
        every = getattr(cfg, "generalization_every", 0)
        problem = missing_linear(probes[key], "--generalization-every") if every else None
        if problem:
            raise PluginError(f"--model {cfg.model} {problem}")


def _smallest_batch(cfg, n: int) -> int:
    """The fewest inputs a training step of the run gets (``training._Batches``): the last slice of a shuffled pass
    can be shorter than the batch size."""
    if cfg.full_batch:
        return n
    if cfg.sampling == "shuffle":
        return max(1, min(cfg.batch_size, n - (cfg.steps_per_epoch(n) - 1) * cfg.batch_size))
    return min(cfg.batch_size, n)


def _probe(cfg, data: Dataset, smallest: int) -> nn.Module:
    """Build the run's model (on the CPU, under the run's seed; torch's RNG is left as it was) and check it: a
    trainable parameter; in eval mode, outputs of shape (2, num_classes) for two training inputs; in train mode, a
    forward and backward pass through the run's loss on a batch of 2 inputs, or of 1 when the run takes batches of one
    (BatchNorm cannot). Returns the model."""
    from experiments.losses import get_loss
    from experiments.normalization import batch_coupled
    state = torch.get_rng_state()
    x = data.x_train[:2]
    try:
        torch.manual_seed(cfg.seed)
        try:
            model = build_run_model(cfg, data)
        except ValueError as exc:    # a built-in model and inputs of another shape
            raise PluginError(f"--model {cfg.model} cannot take the inputs of --dataset {cfg.dataset}, of shape "
                              f"{tuple(data.input_shape)}: {' '.join(str(exc).split())}") from None
        problem = frozen_or_empty(model)
        if problem:
            raise PluginError(f"--model {cfg.model} {problem}")
        model.eval()
        try:
            with torch.no_grad():
                out = model(x)
        except Exception as exc:
            raise PluginError(f"--model {cfg.model}: its forward pass on inputs of shape {tuple(x.shape)} raised "
                              f"{one_line(exc)}") from None
        _check_outputs(cfg, data, out, len(x), "")
        model.train()
        batch = min(smallest, 2)
        try:
            out = model(data.x_train[:batch])
            _check_outputs(cfg, data, out, batch, " in train mode (model.train())")
            get_loss(cfg.loss)(out, data.y_train[:batch]).backward()
        except PluginError:
            raise
        except Exception as exc:
            if batch == 1 and batch_coupled(model):
                n = len(data.x_train)
                given = ("--batch-size 1" if cfg.batch_size == 1 else f"--batch-size full on {n} image"
                         if cfg.full_batch else f"--batch-size {cfg.batch_size} with --sampling shuffle (the last "
                         f"batch of each pass holds one of the {n} images)")
                raise PluginError(f"--model {cfg.model} normalises with batch statistics (BatchNorm), and {given} gives "
                                  f"it batches of one input: its train-mode forward pass raised {one_line(exc)}; use "
                                  f"--batch-size 2 or more") from None
            raise PluginError(f"--model {cfg.model}: its forward and backward pass in train mode (model.train()) on "
                              f"inputs of shape {tuple(data.x_train[:batch].shape)} raised {one_line(exc)}") from None
    finally:
        torch.set_rng_state(state)
    return model


def _check_outputs(cfg, data: Dataset, out, n: int, mode: str) -> None:
    expected = (n, data.num_classes)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
        got = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else f"a {type(out).__name__}"
        raise PluginError(f"--model {cfg.model} returns {got}{mode} for {n} inputs of {cfg.dataset}; expected a tensor "
                          f"of shape {expected}: one output per class ({data.num_classes} classes)")


# --------------------------------------------------------------------------------------------------------------
# Provenance: the factories' source files

def tensor_fingerprint(*tensors) -> str:
    """sha256 of tensors' dtypes, shapes and bytes (on CPU): dataset.json's ``fingerprint`` of the data a run
    trained and tested on, so that a resume on changed data is refused (``store.provenance_change``)."""
    sha = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        sha.update(f"{t.dtype}{tuple(t.shape)};".encode())
        sha.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()


def code_info(cfg) -> dict:
    """{"model"/"dataset": {"import", "file", "sha256"}} for the run's import strings ({} when it has none)."""
    out = {}
    for key, spec, user in (("model", cfg.model, is_user_model(cfg.model)),
                            ("dataset", cfg.dataset, is_user_dataset(cfg.dataset))):
        if user:
            _, source = _resolve(spec, f"--{key}")
            out[key] = {"import": spec, "file": source, "sha256": _sha256(source)}
    return out


def code_changes(recorded: Optional[dict]) -> tuple[list[str], list[str]]:
    """(changed, missing): of the factory source files recorded in a run's ``code.json`` (``store.read_code``),
    those that no longer have the recorded sha256, and those found neither at the recorded path nor on today's
    sys.path (nothing to compare)."""
    if recorded is None:
        return [], []
    changed, missing = [], []
    for entry in recorded.values() if isinstance(recorded, dict) else ():
        if not (isinstance(entry, dict) and entry.get("file")):
            continue
        source = entry["file"] if Path(entry["file"]).exists() else _find_source(entry.get("import", ""))
        if source is None:
            missing.append(Path(entry["file"]).name)
        elif _sha256(source) != entry.get("sha256"):
            changed.append(Path(source).name)
    # a model and a dataset from one file: named once
    return list(dict.fromkeys(changed)), list(dict.fromkeys(missing))


def _find_source(spec: str) -> Optional[str]:
    """The source file of MODULE in ``MODULE:FACTORY`` on today's sys.path (another checkout of the results), without
    running it; None if it cannot be found."""
    import importlib.util
    try:
        found = importlib.util.find_spec(spec.partition(":")[0])
    except (ImportError, ValueError):
        return None
    return found.origin if found is not None and found.origin and Path(found.origin).exists() else None
