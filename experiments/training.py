"""One training run, top to bottom: data → model → optimizer and schedule → the loop (experiments/loop.py), with
every measurement a hook on a schedule:

| hook | when | record |
|---|---|---|
| (the loop) | every step, before the update, on the step's batch | ``step``: loss, accuracy (and ``lr`` under a schedule) |
| ``probe`` | every ``probe_every`` steps, on the step's batch | ``probe``: Santurkar's line probe along −g, or along the optimizer's update (``probe_direction``) |
| ``sharpness`` | every ``sharpness_every`` steps, gradient known | ``sharpness``: λ_max on the fixed sharpness sample, the optimizer's stability threshold, Adam's λ_max(P⁻¹H) |
| ``measure`` | at initialisation, every ``eval_every`` passes and at the end | ``eval``, ``spectrum`` (every ``spectrum_every`` passes), ``smoothness``, ``per_layer`` (``--per-layer``), then a checkpoint |

Records go to the run's store as they are produced (results/README.md). A checkpoint holds everything the rest of
the run depends on (weights and BatchNorm statistics, optimizer and scheduler state, the minibatch sampler, torch's
RNGs, the last sharpness vector a warm start begins from) and the records it covers (its records mark), so
``resume=True`` continues from it to the same records as an uninterrupted run, replaying nothing.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from . import generalization, optim, per_layer, spectrum, tracking
from .config import ConfigError, RunConfig
from .data import load_dataset
from .losses import get_loss
from .loop import Diverged, Hook, StepState, StopTraining, Timer, run_steps
from .models import build_model
from .store import RunStore, StoreError, atomic_write_json

Progress = Callable[[str, int, int], None]   # (run_id, steps done, total steps)


@dataclass(frozen=True)
class RunOutcome:
    run_id: str
    status: str            # "done", "diverged" or "skipped" (already finished)
    steps: int
    seconds: float
    path: Path


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA device is available; use --device cpu or auto")
    return torch.device(name)


def _tensorboard(store: RunStore, enabled: bool):
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("--tensorboard needs the tensorboard package: pip install tensorboard "
                          "(or pip install '.[dev]')") from None
    return SummaryWriter(log_dir=str(store.dir / "tb"))


def make_optimizer(cfg: RunConfig, model: torch.nn.Module, total_steps: int):
    """The run's torch optimizer and learning-rate scheduler (None for a constant rate)."""
    optimizer = optim.build_optimizer(model.parameters(), cfg.optimizer, lr=cfg.lr, momentum=cfg.momentum,
                                      nesterov=cfg.nesterov, weight_decay=cfg.weight_decay,
                                      betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
    try:
        scheduler = optim.build_schedule(optimizer, cfg.lr_schedule, total_steps=total_steps,
                                         warmup_steps=cfg.warmup_steps, decay_every=cfg.lr_decay_every,
                                         decay_factor=cfg.lr_decay_factor)
    except ValueError as exc:
        raise ConfigError(f"{exc} (--lr-schedule {cfg.lr_schedule}, --warmup-steps {cfg.warmup_steps}; the run has "
                          f"{total_steps} steps)") from None
    return optimizer, scheduler


class _Batches:
    """Step t's minibatch: the whole subset (full-batch GD), a fresh draw with replacement (the seed's), or the next
    slice of a permutation drawn at the start of each pass. Called after the point hooks of step t, which may also
    draw from ``sampler``: the order of draws is part of what makes a resumed run identical."""

    def __init__(self, cfg: RunConfig, x: torch.Tensor, y: torch.Tensor, sampler: torch.Generator, per_epoch: int):
        self.cfg, self.x, self.y, self.sampler, self.per_epoch = cfg, x, y, sampler, per_epoch
        self.n = x.shape[0]
        self.perm = None

    def __call__(self, step: int):
        b = self.cfg.batch_size
        if b == 0:
            return self.x, self.y
        i = step % self.per_epoch
        if self.cfg.sampling == "shuffle":
            if i == 0 or self.perm is None:
                self.perm = torch.randperm(self.n, generator=self.sampler)
            idx = self.perm[i * b:(i + 1) * b]
        else:
            idx = torch.randint(self.n, (b,), generator=self.sampler)
        idx = idx.to(self.x.device)
        return self.x[idx], self.y[idx]


def train_run(cfg: RunConfig, results_root: Path, *, resume: bool = False, data_dir: Optional[str] = None,
              progress: Optional[Progress] = None) -> RunOutcome:
    """Train one (model, lr, seed) and record everything in ``results_root/<run id>/``."""
    store = RunStore(results_root, cfg)
    if store.done:
        return RunOutcome(cfg.run_id, "skipped", 0, 0.0, store.dir)
    device = resolve_device(cfg.device)
    start_time = time.perf_counter()
    store.open()
    if store.has_progress() and not resume:
        raise StoreError(f"{store.dir} holds an interrupted run of this config; pass --resume to continue it "
                         f"from its last checkpoint (or move the directory away to start over)")

    data = load_dataset(cfg.dataset, subset=cfg.subset, seed=cfg.seed, data_dir=data_dir)
    atomic_write_json(store.dir / "dataset.json", data.info)  # which files were read (checksums), preprocessing
    data = dataclasses.replace(data, x_train=data.x_train.to(device), y_train=data.y_train.to(device),
                               x_test=data.x_test.to(device), y_test=data.y_test.to(device))
    x_train, y_train = data.x_train, data.y_train
    n = x_train.shape[0]
    cfg.check_training_set(n)   # the CLI checks it before writing; here for callers of the library
    per_epoch, total = cfg.steps_per_epoch(n), cfg.total_steps(n)
    loss_fn = get_loss(cfg.loss)

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, norm=cfg.norm, input_shape=data.input_shape, num_classes=data.num_classes,
                        naive_init=cfg.naive_init).to(device)
    init_state = {k: v.detach().clone() for k, v in model.state_dict().items()}  # the same on resume: same seed
    optimizer, scheduler = make_optimizer(cfg, model, total)
    sampler = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + 10_000)).to(device)
    sharp_idx = order[:cfg.sharpness_samples] if cfg.sharpness_samples else order
    sharp_batch = tracking.sharpness_batch(model, x_train[sharp_idx], y_train[sharp_idx])
    ls_idx = order[:cfg.local_smoothness_samples] if cfg.local_smoothness_samples else None
    spec_idx = order[:spectrum.SAMPLES]
    gen_idx = order[:cfg.generalization_samples]
    timer = Timer(device)
    warm = tracking.WarmStart(cfg.sharpness_start == "warm")
    start = 0
    # A checkpoint holds everything the rest of the run depends on and the records it covers: resuming replays
    # nothing (store.restore cuts records.jsonl back to the checkpoint's records mark).
    checkpoint = store.restore() if resume else None
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        if checkpoint.get("optimizer") is not None:  # (checkpoints of plain-SGD runs once held none: no state)
            optimizer.load_state_dict(checkpoint["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(checkpoint["scheduler"])
        sampler.set_state(checkpoint["sampler"])
        torch.set_rng_state(checkpoint["torch_rng"])
        if device.type == "cuda" and checkpoint.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(checkpoint["cuda_rng"], device)
        start = checkpoint["step"]
        timer.seconds = dict(checkpoint.get("timing", {}))
        warm.set_state(checkpoint.get("sharpness_start"))
    writer = _tensorboard(store, cfg.tensorboard)
    named = dict(model.named_parameters())
    epoch_of = lambda step: step // per_epoch  # noqa: E731

    def emit(record: dict) -> None:
        store.append(record)
        if writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                    writer.add_scalar(f"{record['kind']}/{key}", value, record["step"])

    lookahead_at = {}

    def ahead(state: StepState) -> optim.Lookahead:
        """The optimizer's next step, computed once per step for every hook that needs it."""
        if state.step not in lookahead_at:
            lookahead_at.clear()
            lookahead_at[state.step] = optim.lookahead(optimizer, named)
        return lookahead_at[state.step]

    def probe(state: StepState) -> dict:
        lr = optim.current_lr(optimizer)
        direction = None
        if cfg.probe_direction == "update":  # d = Δw/η: the step sizes stay multiples of η, and s = η is the step
            step = ahead(state)
            direction = {name: u / step.lr for name, u in step.update.items()}
        rec = tracking.probe_record(model, state.batch, cfg.step_sizes_at(lr), cfg.probe_bn_mode,
                                    direction=direction, loss_fn=loss_fn)
        return {"step": state.step, "epoch": epoch_of(state.step), **rec}

    def sharpness(state: StepState) -> dict:
        lr = optim.current_lr(optimizer)
        threshold = optim.stability_threshold(cfg.optimizer, lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                              beta1=cfg.adam_beta1)
        pre = ahead(state).preconditioner if cfg.optimizer in ("adam", "adamw") else None
        rec = tracking.sharpness_record(model, sharp_batch, cfg.sharpness_tol, threshold=threshold, lr=lr,
                                        preconditioner=pre, loss_fn=loss_fn, warm=warm)
        return {"step": state.step, "epoch": epoch_of(state.step), **rec}

    def measure(state: StepState) -> None:
        step, epoch = state.step, epoch_of(state.step)
        with timer("eval"):
            rec = tracking.eval_record(model, data, loss_fn)
        emit({"step": step, "epoch": epoch, **rec})
        if not torch.isfinite(torch.tensor(rec["train_loss"])):
            raise Diverged(step, "non-finite training loss in evaluation")
        smooth = {"kind": "smoothness", "step": step, "epoch": epoch, "bn_mode": "batch"}
        with timer("local_smoothness"):
            if cfg.batch_size:
                mb = torch.randint(n, (cfg.batch_size,), generator=sampler).to(device)
                minibatch = (x_train[mb], y_train[mb])
            else:  # full-batch GD: u = −η·(the full gradient), the step GD takes
                minibatch = (x_train, y_train)
            full = (x_train, y_train) if ls_idx is None else (x_train[ls_idx], y_train[ls_idx])
            smooth["local_smoothness"] = tracking.local_smoothness(model, minibatch, full, cfg.lr, loss_fn)
        if not cfg.sharpness_every:  # else the sharpness hook measures it, every few steps
            with timer("sharpness"):
                eig = tracking.sharpness(model, sharp_batch, cfg.sharpness_tol, loss_fn, warm=warm)
            smooth.update(sharpness=eig.values[0], sharpness_n_hvp=eig.n_hvp)
        if spectrum.due(cfg.spectrum_every, epoch, cfg.epochs):
            with timer("spectrum"):
                for rec in spectrum.measure(model, (x_train[spec_idx], y_train[spec_idx]), cfg.norm, loss_fn):
                    emit({"step": step, "epoch": epoch, **rec})
        emit(smooth)
        if cfg.per_layer:  # on the sharpness's own sample (experiments.per_layer)
            with timer("per_layer"):
                for record in per_layer.measure(model, sharp_batch, loss_fn):
                    emit({"step": step, "epoch": epoch, **record})
        reached = bool(cfg.target_train_loss) and rec["train_loss"] <= cfg.target_train_loss
        if generalization.due(cfg.generalization_every, epoch, cfg.epochs) or (cfg.generalization_every and reached):
            with timer("generalization"):
                emit({"step": step, "epoch": epoch, **generalization.measure(
                    model, (x_train[gen_idx], y_train[gen_idx]), loss_fn, init_state, data.input_shape)})
        if cfg.target_train_loss and (reached or step == total):
            emit({"kind": "target", "step": step, "epoch": epoch, "reached": reached,
                  "target": cfg.target_train_loss, "train_loss": rec["train_loss"]})
            if reached:  # before the checkpoint: a resume replays from the last one and stops here again
                raise StopTraining(step)
        with timer("checkpoint"):
            store.save_checkpoint(epoch, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": None if scheduler is None else scheduler.state_dict(), "sampler": sampler.get_state(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                "epoch": epoch, "step": step, "timing": timer.seconds, "sharpness_start": warm.get_state()})
        store.write_timing({**timer.seconds, "total": sum(timer.seconds.values())})

    hooks = [
        Hook("probe", cfg.probe_every, "before" if cfg.probe_direction == "gradient" else "gradient", probe,
             what="a line probe"),
        Hook("sharpness", cfg.sharpness_every, "gradient", sharpness, what="a sharpness measurement"),
        Hook("measure", per_epoch * cfg.eval_every, "point", measure, timed=False,  # times its parts itself
             what="a smoothness measurement"),
    ]
    scheduled = scheduler is not None
    try:
        if checkpoint is None:
            store.save_weights("init", model.state_dict())
        run_steps(model, optimizer, scheduler, _Batches(cfg, x_train, y_train, sampler, per_epoch), start=start,
                  total=total, hooks=hooks, emit=emit, epoch_of=epoch_of, timer=timer, loss_fn=loss_fn,
                  skip_first_point=checkpoint is not None,
                  on_flush=None if progress is None else (lambda done: progress(cfg.run_id, done, total)),
                  extra_records=(lambda t: {"lr": optim.current_lr(optimizer)}) if scheduled else None)
    except StopTraining as s:
        store.close()
        store.write_timing({**timer.seconds, "total": sum(timer.seconds.values())})
        store.save_weights("final", model.state_dict())
        store.mark_done()
        return RunOutcome(cfg.run_id, "done", s.step, time.perf_counter() - start_time, store.dir)
    except Diverged as d:
        store.append({"kind": "diverged", "step": d.step, "epoch": epoch_of(d.step), "bn_mode": "batch",
                      "loss": None, "reason": d.reason})
        store.write_timing({**timer.seconds, "total": sum(timer.seconds.values())})
        store.mark_done()
        return RunOutcome(cfg.run_id, "diverged", d.step, time.perf_counter() - start_time, store.dir)
    finally:
        store.close()
        if writer is not None:
            writer.close()
    store.save_weights("final", model.state_dict())
    store.mark_done()
    return RunOutcome(cfg.run_id, "done", total, time.perf_counter() - start_time, store.dir)
