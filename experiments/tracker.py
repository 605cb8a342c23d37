"""The built-in loop's measurements, in a training loop the user writes: ``experiments.Tracker``.

A plain PyTorch loop calls the tracker around its optimizer step (``with tracker.step(batch) as s: ...``,
``s.record(loss, out)``, then ``end_epoch``, ``checkpoint`` and ``close``); the tracker writes the records the
built-in loop writes, on the same schedule, into a run directory of the same layout, so every command reads it as it
reads any run. After a crash, ``tracker.resume()`` continues to exactly the records of an uninterrupted run.

Details: docs/explanation/modules.md#tracker
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from contextlib import ExitStack
from pathlib import Path
from typing import Callable, Optional, Tuple

import torch
from torch import nn

import smoothness

from experiments import optim
from experiments import plugins
from experiments.models import MODELS, build_model
from experiments.normalization import batch_coupled
from experiments.study import normalization_of
from experiments.config import ConfigError, RunConfig
from experiments.data import Dataset
from experiments.input_checks import frozen_or_empty, missing_linear, non_finite, single_class, weights_mismatch
from experiments.loop import Diverged, StepRecords, StepState, Timer, run_hooks
from experiments.plugins import tensor_fingerprint
from experiments.store import DATASET, TRACKER, RunStore, StoreError, run_lock, timing_of
from experiments.training import build_measurements, sample_order

__all__ = ["Tracker", "StepRecorder", "run_config", "optimizer_fields", "own_model_config", "model_name"]

#: torch optimizer classes RunConfig can describe, by its ``optimizer`` name
OPTIMIZER_NAMES = {torch.optim.SGD: "sgd", torch.optim.Adam: "adam", torch.optim.AdamW: "adamw"}


def optimizer_fields(optimizer: torch.optim.Optimizer) -> dict:
    """The RunConfig fields that describe a torch SGD, Adam or AdamW optimizer (its first parameter group)."""
    name = OPTIMIZER_NAMES.get(type(optimizer))
    if name is None:
        raise ConfigError(f"RunConfig describes torch.optim.SGD, Adam and AdamW; got {type(optimizer).__name__}. "
                          f"Track a loop with one of those (other optimizers need a RunConfig field to name them)")
    g = optimizer.param_groups[0]
    lr = float(g.get("initial_lr", g["lr"]))  # a scheduler moves "lr"; the run is named by its base rate
    out = {"optimizer": name, "lr": lr, "weight_decay": float(g.get("weight_decay", 0.0))}
    if name == "sgd":
        out.update(momentum=float(g.get("momentum", 0.0)), nesterov=bool(g.get("nesterov", False)))
    else:
        out.update(adam_beta1=float(g["betas"][0]), adam_beta2=float(g["betas"][1]), adam_eps=float(g["eps"]))
    return out


def run_config(optimizer: torch.optim.Optimizer, **fields) -> RunConfig:
    """A RunConfig for a tracked loop: the optimizer's fields (`optimizer_fields`) and ``fields`` (study, model,
    dataset, seed, batch_size, epochs, the tracking options, ...)."""
    return RunConfig(**{**optimizer_fields(optimizer), **fields})


def class_import_string(model: nn.Module) -> str:
    """``module:QualName`` of the network's class: the run's ``model`` when the network is not a registered one."""
    cls = type(model)
    name = cls.__qualname__ if cls.__qualname__.isidentifier() else cls.__name__   # a nested or local class
    return f"{cls.__module__}:{name}"


def model_name(model: str) -> str:
    """The label of a run's model: a registered name as it is, an import string by its class (``mymod:Net`` ->
    ``Net``)."""
    return model.rpartition(":")[2] if model not in MODELS and ":" in model else model


def _is_registered(model: nn.Module, name: str, norm, input_shape, num_classes: int) -> bool:
    """Whether ``model`` is the registered network ``name`` (same class, same parameter names and shapes)."""
    if name not in MODELS:
        return False
    try:
        ref = build_model(name, norm=norm, input_shape=input_shape, num_classes=num_classes)
    except (ValueError, RuntimeError):
        return False
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    return type(ref) is type(model) and shapes(ref) == shapes(model)


def own_model_config(cfg: RunConfig, model: nn.Module, input_shape, num_classes: int,
                     model_args: Optional[dict] = None) -> RunConfig:
    """The config of a tracked run of ``model`` as it is: unchanged when ``cfg.model`` names a registered network
    that ``model`` is; otherwise ``model`` becomes the import string of the network's class (``module:QualName``,
    so the run is named after it and `experiments.study.rebuild` builds it as ``QualName(**model_args)``) and
    ``norm`` is left to the network (read from its layers into tracker.json)."""
    if model_args is None and _is_registered(model, cfg.model, cfg.norm, input_shape, num_classes):
        return cfg
    if plugins.is_user_model(cfg.model) and not model_args and cfg.model == class_import_string(model):
        return cfg
    return dataclasses.replace(cfg, model=class_import_string(model), norm=None, model_args=dict(model_args or {}))


def _tensors(data, what: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) from a pair of tensors or a map-style Dataset of (input, target) pairs, stacked once."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        x, y = data
    elif isinstance(data, torch.utils.data.Dataset) and hasattr(data, "__len__"):
        items = [data[i] for i in range(len(data))]
        x = torch.stack([torch.as_tensor(i[0]) for i in items])
        y = torch.stack([torch.as_tensor(i[1]) for i in items])
    else:
        raise TypeError(f"{what} must be a pair (inputs, targets) of tensors or a map-style torch Dataset of "
                        f"(input, target) pairs; got {type(data).__name__}")
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"{what}: {x.shape[0]} inputs but {y.shape[0]} targets; expected the same positive number")
    return x, y


def _functional(loss_fn: Callable) -> Callable:
    """``loss_fn`` as a function taking ``reduction=`` (evaluation sums over chunks): torch loss modules such as
    ``nn.CrossEntropyLoss()`` become a copy with that reduction."""
    if not isinstance(loss_fn, nn.modules.loss._Loss):
        return loss_fn

    def fn(output, target, reduction: str = "mean"):
        module = copy.copy(loss_fn)
        module.reduction = reduction
        return module(output, target)
    return fn


class StepRecorder:
    """What ``with tracker.step(batch) as s`` yields: ``s.record(loss, output)`` gives the step's record."""

    def __init__(self):
        self.loss: Optional[torch.Tensor] = None
        self.output: Optional[torch.Tensor] = None

    def record(self, loss: torch.Tensor, output: Optional[torch.Tensor] = None) -> None:
        """The step's training loss (as backpropagated) and, for accuracy, the model's outputs on the batch."""
        self.loss, self.output = loss, output


class Tracker:
    """Measurements of the built-in loop for a loop of one's own (module docstring); one run directory,
    ``root/<config.run_id>``. Nothing is written until the first step or `resume`."""

    def __init__(self, root, model: nn.Module, loss_fn: Callable, optimizer: torch.optim.Optimizer, *,
                 train_data, test_data, config: RunConfig, model_label: Optional[str] = None,
                 dataset_label: Optional[str] = None, generator: Optional[torch.Generator] = None,
                 model_args: Optional[dict] = None):
        if not isinstance(config, RunConfig):
            raise TypeError(f"config must be an experiments.config.RunConfig (see experiments.tracker.run_config), got "
                            f"{type(config).__name__}")
        (x, y), (xt, yt) = _tensors(train_data, "train_data"), _tensors(test_data, "test_data")
        self.config = cfg = own_model_config(config, model, tuple(x.shape[1:]), int(max(int(y.max()), int(yt.max())))
                                             + 1 if not y.is_floating_point() else 0, model_args)
        self.model, self.optimizer, self.loss_fn = model, optimizer, _functional(loss_fn)
        self._check(cfg, model, optimizer)
        self.device = next(model.parameters()).device
        self._check_inputs(x, y, xt)
        self.labels = {"model": model_label or model_name(cfg.model), "dataset": dataset_label or cfg.dataset}
        self.data = Dataset(name=cfg.dataset, x_train=x.to(self.device), y_train=y.to(self.device),
                            x_test=xt.to(self.device), y_test=yt.to(self.device), input_shape=tuple(x.shape[1:]),
                            num_classes=int(max(int(y.max()), int(yt.max())) + 1) if not y.is_floating_point() else 0,
                            info={"source": "experiments.Tracker", "label": self.labels["dataset"],
                                  "n_train": int(x.shape[0]), "n_test": int(xt.shape[0]),
                                  "input_shape": list(x.shape[1:]), "fingerprint": tensor_fingerprint(x, y, xt, yt)})
        n = x.shape[0]
        self.generator = generator if generator is not None else torch.Generator().manual_seed(cfg.seed)
        self.store = RunStore(Path(root), cfg)
        self.timer = Timer(self.device)
        self.step_index = 0          # the step about to be taken (= updates taken so far)
        self.epoch = 0               # passes completed (end_epoch calls)
        # the point hooks that ran at step ``_points_at`` (a point's hooks run once, whichever call reaches it)
        self._points_at: Optional[int] = None
        self._points_done: set = set()
        self._batch = None
        self._lr = None
        self._gradient_done = False
        self._exit: Optional[ExitStack] = None
        self.finished = False
        # step records: buffered, written before any other record (experiments/loop.py); a step belongs to the pass
        # under way (end_epoch writes the buffer before it counts the pass)
        self._steps = StepRecords(self.store.append, lambda step: self.epoch)
        # the built-in loop's measurements, built as train_run builds them (experiments.training.build_measurements)
        self.measuring = build_measurements(
            cfg, model=model, data=self.data, loss_fn=self.loss_fn, optimizer=optimizer, device=self.device,
            timer=self.timer, sampler=self.generator, order=sample_order(cfg, n, self.device), init_state={},
            per_epoch=cfg.steps_per_epoch(n), total=cfg.total_steps(n), epoch_of=lambda step: self.epoch,
            emit=self._emit)
        self.hooks = self.measuring.hooks

    # -- checks --------------------------------------------------------------------------------------------------
    @staticmethod
    def _check(cfg: RunConfig, model: nn.Module, optimizer) -> None:
        fields = optimizer_fields(optimizer)
        differ = [f"{k}: config {getattr(cfg, k)!r}, optimizer {v!r}" for k, v in fields.items()
                  if not (getattr(cfg, k) == v or (isinstance(v, float) and math.isclose(getattr(cfg, k), v)))]
        if differ:
            raise ConfigError(f"the config does not describe the optimizer the loop steps ({'; '.join(differ)}); "
                              f"build it with experiments.tracker.run_config(optimizer, ...)")
        if cfg.target_train_loss or cfg.tensorboard:
            raise ConfigError("target_train_loss and tensorboard are options of the built-in loop: the Tracker cannot "
                              "stop your loop at a target loss, nor write TensorBoard logs; leave them at 0 / False "
                              "(stop your loop yourself on the 'eval' records' train_loss)")
        problem = frozen_or_empty(model) or (missing_linear(model, "generalization_every")
                                             if getattr(cfg, "generalization_every", 0) else None)
        if problem:
            raise ConfigError(f"the model {problem}")
        if cfg.model in MODELS and batch_coupled(model) and cfg.norm == "none":
            raise ConfigError(f"the model normalises with batch statistics but the config says norm='none' "
                              f"(model {cfg.model!r}); name a normalising model or norm (e.g. norm='torch') so that "
                              f"config.json and the BN-mode measurements say what was trained")

    @staticmethod
    def _check_inputs(x: torch.Tensor, y: torch.Tensor, x_test: torch.Tensor) -> None:
        """Inputs no run can use (as the CLI's pre-launch checks, experiments.plugins.check_runs), before writing."""
        for name, inputs in (("train_data", x), ("test_data", x_test)):
            problem = non_finite(inputs)
            if problem:   # a NaN input reads as a diverged run, an inf test input as a test loss of null
                raise ValueError(f"{name}'s {problem}; fix the data (or its transform): nothing can be trained or "
                                 f"measured on non-finite inputs")
        problem = single_class(y)
        if problem:
            raise ValueError(f"train_data {problem}")

    # -- lifecycle -----------------------------------------------------------------------------------------------
    def _begin(self, resuming: bool) -> Optional[dict]:
        """Open the run directory (under its lock) through the store's lifecycle (`RunStore.start`, `begin`); on
        resume restore the newest checkpoint, refusing other data, another model or optimizer."""
        if self._exit is not None:
            raise RuntimeError("the tracker has already started; resume() must come before the first step")
        store = self.store
        self._exit = ExitStack()
        if not self._exit.enter_context(run_lock(store.dir)):
            self._exit.close()
            self._exit = None
            raise StoreError(f"{store.dir} is being written by another live process; wait for it to finish")
        self._exit.callback(store.close)
        init_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        try:
            store.start(resume=resuming, how="call tracker.resume() before the loop")
            checkpoint = store.begin({DATASET: self.data.info, TRACKER: {
                "loop": "experiments.Tracker", "model_label": self.labels["model"],
                "dataset_label": self.labels["dataset"],
                "model_class": f"{type(self.model).__module__}.{type(self.model).__qualname__}",
                "parameters": sum(p.numel() for p in self.model.parameters()),
                "normalization": normalization_of(self.model),
                "optimizer_class": type(self.optimizer).__name__}}, init_state)
        except BaseException:
            self.close_files()
            raise
        if checkpoint is None:
            self.measuring.ctx.init_state = init_state
            with self._diverging():  # the point measurements at initialisation, before any batch is drawn
                self._point(final=False)
            return None
        fits = weights_mismatch(self.model, checkpoint["model"])
        if fits is not None:
            raise StoreError(f"the weights in {store.dir}'s last checkpoint do not fit the model given to the Tracker "
                             f"({fits}): build the model as it was when the run started to resume it, or move "
                             f"{store.dir} away to start it over")
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        torch.set_rng_state(checkpoint["torch_rng"])
        if self.device.type == "cuda" and checkpoint.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(checkpoint["cuda_rng"], self.device)
        self.load_state_dict(checkpoint["tracker"])
        self.measuring.ctx.init_state = store.load_init_weights(self.device)
        return checkpoint.get("extra") or {}

    def resume(self) -> Optional[dict]:
        """Continue an interrupted run from its last `checkpoint` (module docstring): returns that checkpoint's
        ``extra``, or None when there is none (a fresh start). Call it before the first step."""
        return self._begin(resuming=True)

    def close_files(self) -> None:
        """Release the run directory without finishing the run (after an error in the loop)."""
        if self._exit is not None:
            self._exit.close()
            self._exit = None

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is None:
            self.close()
        else:
            self.close_files()

    def close(self) -> None:
        """The point measurements at the final weights (unless already taken there), final weights, ``done``.
        Closing before pass ``config.epochs`` ended does not finish the run: the step records are written, the
        directory released, and RuntimeError says so (``tracker.resume()`` continues from the last checkpoint)."""
        if self.finished:
            return
        if self._exit is None:
            self._begin(resuming=False)
        with self._diverging():
            self._steps.flush()
        if self.finished:  # diverged in the last steps
            return
        if self.epoch < self.config.epochs:
            self.close_files()
            raise RuntimeError(f"closed after {self.epoch} of {self.config.epochs} epochs: the run in "
                               f"{self.store.dir} is not finished (not marked done); continue it with "
                               f"tracker.resume() from its last checkpoint, or train it for the config's epochs")
        with self._diverging():
            self._point(final=True)
        if self.finished:  # diverged while measuring
            return
        self.store.finish(self.model.state_dict(), self.timer)
        self.finished = True
        self.close_files()

    # -- state -----------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The tracker's own state (a `checkpoint` holds it): step, epoch, the point hooks that ran at the last
        point, its generator, timing, and what the measurements keep between calls (``RunContext.checkpointed``:
        the sharpness warm start's vectors, ...)."""
        return {"step": self.step_index, "epoch": self.epoch, "measured_at": self._points_at,
                "points_done": sorted(self._points_done), "generator": self.generator.get_state(),
                "timing": dict(self.timer.seconds), **self.measuring.checkpoint_state()}

    def load_state_dict(self, state: dict) -> None:
        self.step_index, self.epoch, self._points_at = state["step"], state["epoch"], state["measured_at"]
        done = state.get("points_done")
        if done is None:   # written before the tracker kept them: every point hook ran there
            done = [h.name for h in self.hooks if h.when == "point"] if self._points_at is not None else []
        self._points_done = set(done)
        self.generator.set_state(state["generator"])
        self.timer.seconds = dict(state["timing"])
        self.measuring.restore(state)

    def checkpoint(self, extra: Optional[dict] = None) -> Path:
        """Write ``checkpoints/epoch-<epoch>.pt`` (records first, with their mark): model, optimizer, torch RNG,
        the tracker's state and ``extra`` (your scheduler's and data order's state; module docstring)."""
        self._ensure_started()
        with self._diverging():
            self._steps.flush()
        self.store.checkpoint(self.epoch, {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            "step": self.step_index, "epoch": self.epoch, "tracker": self.state_dict(), "extra": extra}, self.timer)
        return self.store.checkpoints / f"epoch-{self.epoch:03d}.pt"

    @property
    def run_dir(self) -> Path:
        return self.store.dir

    # -- the step ----------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def step(self, batch):
        """One training step on ``batch`` = (inputs, targets) (module docstring); yields a `StepRecorder`."""
        recorder = StepRecorder()
        self.begin_step(batch)
        handle = self.optimizer.register_step_pre_hook(self._pre_hook)
        try:
            yield recorder
        finally:
            handle.remove()
        if recorder.loss is None:
            raise RuntimeError("a tracked step ended without its loss: call s.record(loss, outputs) in the "
                               "`with tracker.step(batch) as s:` block")
        self.end_step(recorder.loss, recorder.output)

    def _pre_hook(self, optimizer, args, kwargs) -> None:
        if len(args) > 1 or kwargs.get("closure") is not None:  # args[0] is the optimizer itself
            raise RuntimeError("optimizer.step(closure) computes the gradient after the tracker's measurements would "
                               "run; the Tracker supports optimizers stepped without a closure")
        self.gradient_ready()

    def _ensure_started(self) -> None:
        if self._exit is None:
            self._begin(resuming=False)
        if self.finished:
            raise RuntimeError(f"the run in {self.store.dir} is finished (closed or diverged); start a new Tracker")

    def begin_step(self, batch) -> None:
        """At w_t, before the forward pass: the point measurements at t = 0 (on starting), then the "before" hooks
        due at t on the batch (the line probe along −g)."""
        self._ensure_started()
        self._batch, self._gradient_done = tuple(batch), False
        self._lr = optim.current_lr(self.optimizer)
        self._run("before", StepState(self.step_index, self.model, self.optimizer, self._batch))

    def gradient_ready(self) -> None:
        """After backward, before ``optimizer.step()``: the "gradient" hooks due at t (line probe along the
        update, sharpness)."""
        if self._batch is None or self._gradient_done:
            return
        self._gradient_done = True
        self._run("gradient", StepState(self.step_index, self.model, self.optimizer, self._batch))

    def end_step(self, loss: torch.Tensor, output: Optional[torch.Tensor] = None) -> None:
        """After the update: the step record (loss; accuracy when ``output`` holds class scores)."""
        if self._batch is None:
            raise RuntimeError("end_step without begin_step: call begin_step(batch) before the forward pass")
        y = self._batch[1]
        if output is not None and output.ndim == 2 and not y.is_floating_point() and y.ndim == 1:
            accuracy = (output.detach().argmax(1) == y).float().mean()
        else:
            accuracy = torch.tensor(float("nan"), device=loss.device)
        extra = {"lr": self._lr} if self._scheduled else {}
        self._steps.add(self.step_index, loss.detach().reshape(()), accuracy.to(loss.device), extra)
        self.step_index += 1
        self._batch = None
        if self._steps.full:
            with self._diverging():
                self._steps.flush()

    def end_epoch(self) -> None:
        """A pass boundary: the point measurements due there (every ``eval_every`` passes), all of them after pass
        ``epochs``."""
        self._ensure_started()
        if self.epoch >= self.config.epochs:
            raise RuntimeError(f"end_epoch for pass {self.epoch + 1}, but the config says epochs={self.config.epochs} "
                               f"(the run ended after pass {self.config.epochs}); loop over "
                               f"range(tracker.epoch, config.epochs), or track a config with more epochs")
        with self._diverging():
            self._steps.flush()   # the steps of the pass that ends here
            self.epoch += 1
            self._point(final=self.epoch == self.config.epochs)

    # -- measurements: the registry's hooks (experiments/features/), at the tracker's moments ----------------
    @property
    def _scheduled(self) -> bool:
        return self.config.lr_schedule != "constant" or self.config.warmup_steps >= 2

    def _emit(self, record: dict) -> None:
        self._steps.flush()
        self.store.append(record)

    def _run(self, when: str, state: StepState) -> None:
        """The ``before`` or ``gradient`` hooks due at this step, as the built-in loop runs them."""
        with self._diverging():
            run_hooks(self.hooks, when, state, lambda hook: hook.due(state.step), timer=self.timer,
                      steps=self._steps, emit=self._emit)

    def _point(self, final: bool) -> None:
        """The point hooks at the current weights, each at most once per step: those due after ``epoch`` passes
        (in steps of the built-in loop, ``epoch * steps_per_epoch``: every ``eval_every`` passes), or, at the final
        point, every one that has not run here (as the built-in loop runs them all at its last step)."""
        step, ctx = self.step_index, self.measuring.ctx
        if self._points_at != step:
            self._points_at, self._points_done = step, set()
        if final:
            ctx.total = step   # the run ends here: hooks that act at the end (state.step == ctx.total) see it
        nominal = self.epoch * ctx.per_epoch
        done = self._points_done
        ran = run_hooks(self.hooks, "point", StepState(step, self.model, self.optimizer),
                        lambda hook: hook.name not in done and (final or hook.due(nominal)), timer=self.timer,
                        steps=self._steps, emit=self._emit)
        done.update(ran)
        if ran:
            self.store.write_timing(timing_of(self.timer))

    @contextlib.contextmanager
    def _diverging(self):
        """A non-finite loss ends the run as in the built-in loop: a ``diverged`` record, ``done``, `Diverged`."""
        try:
            try:
                yield
            except smoothness.NonFiniteLossError:
                raise Diverged(self.step_index, "non-finite loss in a measurement") from None
        except Diverged as d:
            self._steps.pending = []
            self.store.diverged(d.step, self.epoch, d.reason, self.timer)
            self.finished = True
            self.close_files()
            raise

