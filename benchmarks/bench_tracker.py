"""The Tracker's cost: a tracked plain loop against `train_run`, and the tracker's per-step overhead on a bare loop.

    python benchmarks/bench_tracker.py                    # about 10 minutes on a loaded 2-core machine
    python benchmarks/bench_tracker.py --repeats 1        # a quick look

1. Same schedule: the seed ConvNet on 6,000 FashionMNIST images (subset 0.1), batch 32, two passes (375 steps),
   the default measurements (line probe every 10 steps, evaluation, local smoothness and sharpness after every
   pass), once by `train_run` and once by a plain loop with the Tracker that draws its batches as `train_run` does
   (so both do the same work and write the same records). Wall time of the whole run, data already loaded.
   Goal: tracked / train_run <= 1.05.
2. Overhead: the same loop, 375 steps, with every measurement off (``probe_every=0``; the point measurements the
   tracker takes when it starts and closes are outside the timed steps), against the same loop without a tracker.
   Goal: tracked / bare <= 1.02.

Single-threaded torch; the two sides of each comparison alternate, repeat after repeat, and the table reports
medians of the per-pair ratios. Both the process's CPU time (``time.process_time``: what this process computed,
nearly blind to other processes on a shared machine) and wall time are measured; the goals are judged on CPU time,
because on a loaded machine single wall timings wander by more than the effect measured (a first run here, load
average 10 on 2 cores, gave bare-loop wall times from 4 to 12 s for the same 375 steps).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from experiments.config import RunConfig
from experiments.data import load_dataset
from experiments.models import build_model
from experiments.tracker import Tracker
from experiments.training import make_optimizer, train_run

CFG = RunConfig(model="convnet", dataset="fashion-mnist", subset=0.1, epochs=2, batch_size=32, study="bench-tracker",
                device="cpu")


def _setup(cfg: RunConfig, data):
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, norm=cfg.norm, input_shape=data.input_shape, num_classes=data.num_classes)
    optimizer, _ = make_optimizer(cfg, model, cfg.total_steps(data.x_train.shape[0]))
    return model, optimizer, torch.Generator().manual_seed(cfg.seed)


def _now():
    return time.perf_counter(), time.process_time()


def _since(start):
    wall, cpu = _now()
    return wall - start[0], cpu - start[1]


def tracked(cfg: RunConfig, data, root: Path, *, steps_only: bool = False):
    """(wall, CPU) seconds of a plain loop with the Tracker (whole run; with ``steps_only``, the steps alone)."""
    start = _now()
    model, optimizer, sampler = _setup(cfg, data)
    x, y = data.x_train, data.y_train
    n, per_epoch = x.shape[0], cfg.steps_per_epoch(x.shape[0])
    tracker = Tracker(root, model, F.cross_entropy, optimizer, train_data=(x, y), test_data=(data.x_test, data.y_test),
                      config=cfg, generator=sampler)
    tracker.resume()
    if steps_only:
        start = _now()
    for epoch in range(cfg.epochs):
        for _ in range(per_epoch):
            idx = torch.randint(n, (cfg.batch_size,), generator=sampler)
            xb, yb = x[idx], y[idx]
            with tracker.step((xb, yb)) as s:
                model.train()
                out = model(xb)
                loss = F.cross_entropy(out, yb)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                s.record(loss, out)
        if not steps_only:
            tracker.end_epoch()
            tracker.checkpoint({"sampler": sampler.get_state()})
    seconds = _since(start)
    if steps_only:   # no end_epoch: not a complete run (close would refuse to mark it done)
        tracker.close_files()
    else:
        tracker.close()
    return seconds if steps_only else _since(start)


def bare(cfg: RunConfig, data):
    """(wall, CPU) seconds of the same loop's steps without a tracker."""
    model, optimizer, sampler = _setup(cfg, data)
    x, y = data.x_train, data.y_train
    n, per_epoch = x.shape[0], cfg.steps_per_epoch(x.shape[0])
    start = _now()
    for _ in range(cfg.epochs * per_epoch):
        idx = torch.randint(n, (cfg.batch_size,), generator=sampler)
        xb, yb = x[idx], y[idx]
        model.train()
        out = model(xb)
        loss = F.cross_entropy(out, yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return _since(start)


def built_in(cfg: RunConfig, root: Path):
    start = _now()
    train_run(cfg, root)
    return _since(start)


def _row(name: str, a: list, b: list, goal: float) -> str:
    """CPU-time ratio a/b (median over pairs, range) against ``goal``, and the wall-time ratio beside it."""
    cpu = [x[1] / y[1] for x, y in zip(a, b)]
    wall = [x[0] / y[0] for x, y in zip(a, b)]
    r = statistics.median(cpu)
    return (f"| {name} | {statistics.median(y[1] for y in b):.2f} | {statistics.median(x[1] for x in a):.2f} | "
            f"{r:.3f} ({min(cpu):.3f} to {max(cpu):.3f}) | {statistics.median(wall):.3f} | "
            f"<= {goal} {'PASS' if r <= goal else 'MISS'} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="pairs per comparison (overhead: twice as many)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "tracker.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    data = load_dataset(CFG.dataset, subset=CFG.subset, seed=CFG.seed)   # loaded once (cached per process)
    off = RunConfig(**{**CFG.to_dict(), "probe_every": 0})
    built, track, plain, light = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):    # interleaved: each pair ran under the same load
            built.append(built_in(CFG, Path(tmp) / f"built-{i}"))
            track.append(tracked(CFG, data, Path(tmp) / f"tracked-{i}"))
            print(f"same schedule, repeat {i}: (wall, CPU) train_run {built[-1]}, tracked {track[-1]}", flush=True)
        for i in range(2 * args.repeats):
            plain.append(bare(off, data))
            light.append(tracked(off, data, Path(tmp) / f"off-{i}", steps_only=True))
            print(f"overhead, repeat {i}: (wall, CPU) bare {plain[-1]}, tracked {light[-1]}", flush=True)
    steps = CFG.total_steps(data.x_train.shape[0])
    lines = [f"# Tracker cost (ConvNet, 6,000 FashionMNIST images, batch 32, {steps} steps, 1 thread; medians of "
             f"{args.repeats} and {2 * args.repeats} interleaved pairs)", "",
             "| comparison | reference, CPU s | tracked, CPU s | CPU-time ratio (min to max) | wall-time ratio | goal "
             "(CPU) |", "|---|---|---|---|---|---|",
             _row("tracked plain loop vs train_run, default schedule (whole run)", track, built, 1.05),
             _row("tracker with every measurement off vs bare loop (steps)", light, plain, 1.02), "",
             f"Machine: {torch.get_num_threads()} torch thread, shared 2-core CPU "
             f"(`python benchmarks/bench_tracker.py --repeats {args.repeats}`)."]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
