"""One training run, top to bottom: data -> model -> SGD steps, with smoothness measured on a schedule.

Every step: a ``step`` record. Every ``probe_every`` steps: a Santurkar line probe on that step's batch. At
initialisation and after every pass: ``eval`` and ``smoothness`` records, then a checkpoint. Records go to the run's
store as they are produced (see results/README.md); ``resume=True`` continues from the last checkpoint and gives
the same records as an uninterrupted run.
"""
from __future__ import annotations

import dataclasses
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

import smoothness

from . import spectrum, tracking
from .config import ConfigError, RunConfig
from .data import load_dataset
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


class _Timer:
    def __init__(self, device: torch.device, seconds: Optional[Dict[str, float]] = None):
        self.device = device
        self.seconds = dict(seconds or {})

    @contextmanager
    def __call__(self, phase: str):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


class _Diverged(Exception):
    def __init__(self, step: int, reason: str):
        super().__init__(reason)
        self.step, self.reason = step, reason


def _tensorboard(store: RunStore, enabled: bool):
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("--tensorboard needs the tensorboard package: pip install tensorboard "
                          "(or pip install '.[dev]')") from None
    return SummaryWriter(log_dir=str(store.dir / "tb"))


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
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    data = dataclasses.replace(data, x_train=x_train, y_train=y_train, x_test=data.x_test.to(device),
                               y_test=data.y_test.to(device))
    n = x_train.shape[0]
    steps_per_epoch = cfg.steps_per_epoch(n)
    total_steps = cfg.total_steps(n)

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, norm=cfg.norm, input_shape=data.input_shape, num_classes=data.num_classes,
                        naive_init=cfg.naive_init).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    sampler = torch.Generator().manual_seed(cfg.seed)
    fixed = torch.Generator().manual_seed(cfg.seed + 10_000)
    order = torch.randperm(n, generator=fixed)
    sharp_idx = order[:min(cfg.sharpness_samples, n)].to(device)
    ls_idx = order[:cfg.local_smoothness_samples].to(device) if cfg.local_smoothness_samples else None
    spec_idx = order[:spectrum.SAMPLES].to(device)
    timer = _Timer(device)
    # A checkpoint after pass E holds everything the rest of the run depends on: the weights (and BatchNorm
    # statistics), the optimizer state, the minibatch sampler, torch's global RNG (noisy modules draw from it; on
    # CUDA they draw from the device's) and the records it covers. Resuming from it replays nothing.
    checkpoint = store.restore() if resume else None
    start_epoch = 0
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        sampler.set_state(checkpoint["sampler"])
        torch.set_rng_state(checkpoint["torch_rng"])
        if device.type == "cuda" and checkpoint.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(checkpoint["cuda_rng"], device)
        start_epoch = checkpoint["epoch"]
        timer.seconds = dict(checkpoint.get("timing", {}))
    writer = _tensorboard(store, cfg.tensorboard)

    def emit(record: dict) -> None:
        store.append(record)
        if writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                    writer.add_scalar(f"{record['kind']}/{key}", value, record["step"])

    def measure(epoch: int) -> None:
        step = epoch * steps_per_epoch
        with timer("eval"):
            rec = tracking.eval_record(model, data)
        emit({"step": step, "epoch": epoch, **rec})
        if not torch.isfinite(torch.tensor(rec["train_loss"])):
            raise _Diverged(step, "non-finite training loss in evaluation")
        smooth = {"kind": "smoothness", "step": step, "epoch": epoch, "bn_mode": "batch"}
        try:
            with timer("local_smoothness"):
                mb = torch.randint(n, (cfg.batch_size,), generator=sampler).to(device)
                full = (x_train, y_train) if ls_idx is None else (x_train[ls_idx], y_train[ls_idx])
                smooth["local_smoothness"] = tracking.local_smoothness(model, (x_train[mb], y_train[mb]), full, cfg.lr)
            if cfg.sharpness_samples:
                with timer("sharpness"):
                    eig = tracking.sharpness(model, (x_train[sharp_idx], y_train[sharp_idx]), cfg.sharpness_tol)
                smooth.update(sharpness=eig.values[0], sharpness_n_hvp=eig.n_hvp)
            if spectrum.due(cfg.spectrum_every, epoch, cfg.epochs):
                with timer("spectrum"):
                    for rec in spectrum.measure(model, (x_train[spec_idx], y_train[spec_idx]), cfg.norm):
                        emit({"step": step, "epoch": epoch, **rec})
        except smoothness.NonFiniteLossError:
            raise _Diverged(step, "non-finite loss at a smoothness measurement") from None
        emit(smooth)
        with timer("checkpoint"):
            store.save_checkpoint(epoch, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "sampler": sampler.get_state(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                "epoch": epoch, "step": step, "timing": timer.seconds})
        store.write_timing({**timer.seconds, "total": sum(timer.seconds.values())})

    pending: List = []

    def flush(epoch: int) -> None:
        if not pending:
            return
        values = torch.stack([torch.stack([loss, acc]) for _, loss, acc in pending]).tolist()
        for (step, _, _), (loss, acc) in zip(pending, values):
            if not torch.isfinite(torch.tensor(loss)):
                pending.clear()
                raise _Diverged(step, "non-finite training loss")
            emit({"kind": "step", "step": step, "epoch": epoch, "bn_mode": "batch", "loss": loss, "accuracy": acc})
        if progress is not None:
            progress(cfg.run_id, step + 1, total_steps)
        pending.clear()

    step = start_epoch * steps_per_epoch
    try:
        if checkpoint is None:
            store.save_weights("init", model.state_dict())
            measure(0)
        for epoch in range(start_epoch, cfg.epochs):
            perm = torch.randperm(n, generator=sampler) if cfg.sampling == "shuffle" else None
            for i in range(steps_per_epoch):
                step = epoch * steps_per_epoch + i
                if perm is None:
                    idx = torch.randint(n, (cfg.batch_size,), generator=sampler)
                else:
                    idx = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]
                idx = idx.to(device)
                xb, yb = x_train[idx], y_train[idx]
                if cfg.probe_every and step % cfg.probe_every == 0:
                    flush(epoch)
                    try:
                        with timer("probe"):
                            rec = tracking.probe_record(model, (xb, yb), cfg.step_sizes, cfg.probe_bn_mode)
                    except smoothness.NonFiniteLossError:
                        raise _Diverged(step, "non-finite loss at a line probe") from None
                    emit({"step": step, "epoch": epoch, **rec})
                with timer("train"):
                    model.train()
                    out = model(xb)
                    loss = F.cross_entropy(out, yb)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    pending.append((step, loss.detach(), (out.argmax(1) == yb).float().mean()))
                if len(pending) >= 50:
                    flush(epoch)
            flush(epoch)
            measure(epoch + 1)
            step = (epoch + 1) * steps_per_epoch
    except _Diverged as d:
        store.append({"kind": "diverged", "step": d.step, "epoch": d.step // steps_per_epoch, "bn_mode": "batch",
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
    return RunOutcome(cfg.run_id, "done", total_steps, time.perf_counter() - start_time, store.dir)
