"""One training run, top to bottom: data → model → optimizer and schedule → the loop (experiments/loop.py), with
every measurement a hook on a schedule, built from the measurement registry (experiments/features/) in registry
order. Records go to the run's store as they are produced; a checkpoint holds everything the rest of the run depends
on, so ``resume=True`` continues to the same records as an uninterrupted run.

Details: docs/explanation/modules.md#training
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from experiments import optim, plugins
from experiments.config import ConfigError, RunConfig
from experiments.input_checks import weights_mismatch
from experiments.losses import get_loss
from experiments.loop import Diverged, Hook, StepState, StopTraining, Timer, run_steps
from experiments.features import MEASUREMENTS, RunContext
from experiments.launch_result import RunOutcome
from experiments.store import CODE, DATASET, RunState, RunStore, StoreError

Progress = Callable[[str, int, int], None]   # (run_id, steps done, total steps)


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


#: the seed offset of a run's fixed sample order (the sharpness, local smoothness, spectrum and generalisation samples)
ORDER_SEED_OFFSET = 10_000


def sample_order(cfg: RunConfig, n: int, device) -> torch.Tensor:
    """The run's fixed permutation of its ``n`` training images (``RunContext.order``), drawn from its own generator
    so that the run's RNG streams are untouched."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + ORDER_SEED_OFFSET)).to(device)


@dataclass
class Measuring:
    """The measurements of one run: their `RunContext`, their hooks in registry order, and the state they keep
    between calls that a checkpoint must hold (``ctx.checkpointed``)."""

    ctx: RunContext
    hooks: List[Hook]

    def checkpoint_state(self) -> Dict[str, object]:
        """name -> state, for a checkpoint (saved beside the checkpoint's other entries)."""
        return {name: get() for name, (get, _) in self.ctx.checkpointed.items()}

    def restore(self, saved: dict) -> None:
        """Give each measurement back its state from a checkpoint (None for what the checkpoint lacks)."""
        for name, (_, set_state) in self.ctx.checkpointed.items():
            set_state(saved.get(name))


def build_measurements(cfg: RunConfig, *, model, data, loss_fn, optimizer, device, timer: Timer,
                       sampler: torch.Generator, order: torch.Tensor, init_state, per_epoch: int, total: int,
                       epoch_of: Callable[[int], int], emit: Callable[[dict], None]) -> Measuring:
    """The registry's hooks for a run (every measurement in `MEASUREMENTS`, in order), built from its
    `RunContext`; `train_run` and `experiments.tracker.Tracker` both measure through it."""
    named = dict(model.named_parameters())
    lookahead_at = {}

    def ahead(state: StepState) -> optim.Lookahead:
        """The optimizer's next step, computed once per step for every hook that needs it."""
        if state.step not in lookahead_at:
            lookahead_at.clear()
            lookahead_at[state.step] = optim.lookahead(optimizer, named)
        return lookahead_at[state.step]

    ctx = RunContext(cfg=cfg, model=model, data=data, loss_fn=loss_fn, optimizer=optimizer, device=device,
                     timer=timer, sampler=sampler, order=order, init_state=init_state, per_epoch=per_epoch,
                     total=total, epoch_of=epoch_of, lookahead=ahead, emit=emit)
    hooks = [hook for m in MEASUREMENTS.values() if m.hooks is not None for hook in m.hooks(ctx)]
    return Measuring(ctx, hooks)


def train_run(cfg: RunConfig, results_root: Path, *, resume: bool = False, data_dir: Optional[str] = None,
              progress: Optional[Progress] = None) -> RunOutcome:
    """Train one (model, lr, seed) and record everything in ``results_root/<run id>/``, through the run store's
    lifecycle (`RunStore.start`, `begin`, `checkpoint`, `diverged` / `finish`)."""
    store = RunStore(results_root, cfg)
    start_time = time.perf_counter()
    if store.done:
        return RunOutcome(cfg.run_id, RunState.SKIPPED, path=store.dir)
    device = resolve_device(cfg.device)
    store.start(resume=resume)

    data = plugins.load_run_dataset(cfg, data_dir)  # a registry name, imagefolder:PATH or MODULE:FACTORY
    # what the run starts with: which files were read (checksums, fingerprint), preprocessing; the sha256 of a
    # user's factories' source. A resume compares them with those the run started with.
    provenance = {DATASET: data.info, CODE: plugins.code_info(cfg) or None}
    data = dataclasses.replace(data, x_train=data.x_train.to(device), y_train=data.y_train.to(device),
                               x_test=data.x_test.to(device), y_test=data.y_test.to(device))
    x_train, y_train = data.x_train, data.y_train
    n = x_train.shape[0]
    cfg.check_training_set(n)   # the CLI checks it before writing; here for callers of the library
    per_epoch, total = cfg.steps_per_epoch(n), cfg.total_steps(n)
    loss_fn = get_loss(cfg.loss)

    torch.manual_seed(cfg.seed)
    model = plugins.build_run_model(cfg, data).to(device)
    if provenance[CODE] and "model" in provenance[CODE]:   # the BN axis of a user's network, read from its layers
        from experiments.study import normalization_of
        provenance[CODE]["model"]["normalization"] = normalization_of(model)
    init_state = {k: v.detach().clone() for k, v in model.state_dict().items()}  # the same on resume: same seed
    optimizer, scheduler = make_optimizer(cfg, model, total)
    sampler = torch.Generator().manual_seed(cfg.seed)
    order = sample_order(cfg, n, device)
    timer = Timer(device)
    writer = None   # TensorBoard, once the run has begun
    epoch_of = lambda step: step // per_epoch  # noqa: E731

    def emit(record: dict) -> None:
        store.append(record)
        if writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                    writer.add_scalar(f"{record['kind']}/{key}", value, record["step"])

    measuring = build_measurements(cfg, model=model, data=data, loss_fn=loss_fn, optimizer=optimizer, device=device,
                                   timer=timer, sampler=sampler, order=order, init_state=init_state,
                                   per_epoch=per_epoch, total=total, epoch_of=epoch_of, emit=emit)
    ctx, hooks = measuring.ctx, measuring.hooks

    def checkpoint(state: StepState) -> None:
        """Last at every evaluation point: the state from which the next step starts."""
        store.checkpoint(epoch_of(state.step), {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": None if scheduler is None else scheduler.state_dict(), "sampler": sampler.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "epoch": epoch_of(state.step), "step": state.step, "timing": timer.seconds,
            **measuring.checkpoint_state()}, timer)

    hooks.append(Hook("checkpoint", ctx.per_eval, "point", checkpoint, timed=False))
    start = 0
    # A checkpoint holds everything the rest of the run depends on and the records it covers: resuming replays
    # nothing (store.begin cuts records.jsonl back to the checkpoint's records mark).
    saved = store.begin(provenance, init_state)
    writer = _tensorboard(store, cfg.tensorboard)
    if saved is not None:
        fits = weights_mismatch(model, saved["model"])
        if fits is not None:   # the factory's code or the model's arguments changed since the run started
            raise StoreError(f"the weights in {store.dir}'s last checkpoint do not fit the model {cfg.model} builds "
                             f"now ({fits}): restore the model's code as it was when the run started to resume it, "
                             f"or move {store.dir} away to start it over")
        model.load_state_dict(saved["model"])
        if saved.get("optimizer") is not None:  # (checkpoints of plain-SGD runs once held none: no state)
            optimizer.load_state_dict(saved["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(saved["scheduler"])
        sampler.set_state(saved["sampler"])
        torch.set_rng_state(saved["torch_rng"])
        if device.type == "cuda" and saved.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(saved["cuda_rng"], device)
        start = saved["step"]
        timer.seconds = dict(saved.get("timing", {}))
        measuring.restore(saved)
    scheduled = scheduler is not None
    steps = total
    try:
        run_steps(model, optimizer, scheduler, _Batches(cfg, x_train, y_train, sampler, per_epoch), start=start,
                  total=total, hooks=hooks, emit=emit, epoch_of=epoch_of, timer=timer, loss_fn=loss_fn,
                  skip_first_point=saved is not None,
                  on_flush=None if progress is None else (lambda done: progress(cfg.run_id, done, total)),
                  extra_records=(lambda t: {"lr": optim.current_lr(optimizer)}) if scheduled else None)
    except StopTraining as s:
        steps = s.step
    except Diverged as d:
        store.diverged(d.step, epoch_of(d.step), d.reason, timer)
        return RunOutcome(cfg.run_id, RunState.DIVERGED, time.perf_counter() - start_time, steps=d.step, path=store.dir)
    finally:
        store.close()
        if writer is not None:
            writer.close()
    store.finish(model.state_dict(), timer)
    return RunOutcome(cfg.run_id, RunState.DONE, time.perf_counter() - start_time, steps=steps, path=store.dir)
