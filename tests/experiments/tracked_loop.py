"""A plain PyTorch loop tracked by `experiments.Tracker`, written to draw its batches as `train_run` does (a
generator seeded with the run's seed, with replacement), so that its records can be compared with the built-in
loop's. Run as a script (``python tracked_loop.py ROOT CONFIG_JSON [CRASH_AT_STEP]``) it is the process the
kill-and-resume test interrupts: it resumes whatever ROOT holds, checkpoints after every pass, and dies with
``os._exit`` (no cleanup, as a kill) before step CRASH_AT_STEP."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from experiments.config import RunConfig
from experiments.data import load_dataset
from experiments.losses import get_loss
from experiments.models import build_model
from experiments.tracker import Tracker
from experiments.training import make_optimizer


def tracked_run(cfg: RunConfig, root: Path, *, crash_at: int = -1, share_sampler: bool = True,
                track: bool = True, interrupt_at: int = -1) -> torch.nn.Module:
    """``crash_at``: die before that step (a killed process); ``interrupt_at``: release the run directory before that
    step and return, unfinished (an interruption in this process, for tests that register measurements)."""
    data = load_dataset(cfg.dataset, subset=cfg.subset, seed=cfg.seed)
    n = data.x_train.shape[0]
    per_epoch = cfg.steps_per_epoch(n)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, norm=cfg.norm, input_shape=data.input_shape, num_classes=data.num_classes)
    optimizer, scheduler = make_optimizer(cfg, model, cfg.total_steps(n))
    loss_fn = get_loss(cfg.loss)
    sampler = torch.Generator().manual_seed(cfg.seed)
    tracker = Tracker(root, model, loss_fn, optimizer, train_data=(data.x_train, data.y_train),
                      test_data=(data.x_test, data.y_test), config=cfg,
                      generator=sampler if share_sampler else None) if track else None
    extra = tracker.resume() if track else None
    if extra:
        sampler.set_state(extra["sampler"])
        if scheduler is not None:
            scheduler.load_state_dict(extra["scheduler"])
    start = tracker.epoch if track else 0
    for epoch in range(start, cfg.epochs):
        for i in range(per_epoch):
            step = epoch * per_epoch + i
            if step == crash_at:
                os._exit(3)
            if step == interrupt_at:
                tracker.close_files()
                return model
            idx = torch.randint(n, (cfg.batch_size,), generator=sampler)
            xb, yb = data.x_train[idx], data.y_train[idx]
            with tracker.step((xb, yb)) if track else _Untracked() as s:
                model.train()
                out = model(xb)
                loss = loss_fn(out, yb)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                s.record(loss, out)
        if track:
            tracker.end_epoch()
            tracker.checkpoint({"sampler": sampler.get_state(),
                                "scheduler": None if scheduler is None else scheduler.state_dict()})
    if track:
        tracker.close()
    return model


class _Untracked:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def record(self, loss, output=None):
        pass


if __name__ == "__main__":
    torch.set_num_threads(1)
    tracked_run(RunConfig.from_dict(json.loads(sys.argv[2])), Path(sys.argv[1]),
                crash_at=int(sys.argv[3]) if len(sys.argv) > 3 else -1)
