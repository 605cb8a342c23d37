"""Loss-surface throughput (issue 14): `smoothness-lab surface` against the floor of N forward passes and a minimal
hand-written loop, on one worker and on two.

    python benchmarks/bench_surface.py [--run-dir RUN] [--grid 21] [--samples 1000]   # ~3 min; results/surface.md

A grid point costs one forward pass over the images (in ``running`` BN mode with the stored statistics, Li et al.'s
setting). Compared, on the same weights, images, directions and grid, all with 1 torch thread per worker:

- floor: N plain eval-mode forward passes at the centre weights (no weight update at all);
- minimal loop: for every point, ``p.copy_(w + a·d1 + b·d2)`` under no_grad, then a forward pass (what a researcher
  would write; it mutates the model);
- ``smoothness.loss_surface``: the library call (never writes the model; restores it bit for bit);
- ``compute_surfaces`` with the process executor and 1 and 2 workers: the CLI's path, including storing every row.

Goals: library and 1-worker CLI ≥ 0.9× the floor's points per second; 2 workers ≥ 1.7× that.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent.parent))
import smoothness  # noqa: E402
from experiments.features.surface.grid import (SurfaceSpec, build_run_model, compute_surfaces, evaluation_batch,  # noqa: E402
                                 load_state, read_run_config, weights_file)

DEFAULT_RUN = Path("results/fashion-mnist-bn")


def default_run() -> Path:
    runs = sorted(p for p in DEFAULT_RUN.glob("bn-convnet-*-s0-*") if (p / "weights-final.pt").exists())
    if not runs:
        raise SystemExit(f"no run with weights-final.pt under {DEFAULT_RUN}: pass --run-dir")
    return runs[0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, default=None)
    parser.add_argument("--grid", type=int, default=21)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "surface.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    run = args.run_dir or default_run()
    cfg = read_run_config(run)
    spec = SurfaceSpec(grid=args.grid, samples=args.samples)
    state, _ = load_state(weights_file(run, "final"))
    x, y = evaluation_batch(cfg, args.samples, None)
    model = build_run_model(cfg, state, tuple(x.shape[1:]), 10).eval()
    d1, d2 = (smoothness.random_direction(model, generator=torch.Generator().manual_seed(0)) for _ in range(2))
    axis = np.linspace(-1, 1, args.grid)
    n = args.grid ** 2
    rows = []

    def timed(label, fn, points=n):
        start = time.perf_counter()
        fn()
        seconds = time.perf_counter() - start
        rows.append((label, points, seconds))
        print(f"{label}: {seconds:.1f} s, {points / seconds:.1f} points/s", flush=True)

    @torch.no_grad()
    def floor():
        for _ in range(n):
            F.cross_entropy(model(x), y)

    @torch.no_grad()
    def minimal_loop():
        base = {k: p.detach().clone() for k, p in model.named_parameters()}
        for a in axis:
            for b in axis:
                for k, p in model.named_parameters():
                    p.copy_(base[k] + a * d1[k] + b * d2[k])
                F.cross_entropy(model(x), y)
        for k, p in model.named_parameters():
            p.copy_(base[k])

    def library():
        smoothness.loss_surface(model, F.cross_entropy, (x, y), [d1, d2], [axis, axis], bn_mode="running")

    timed("floor: N eval forward passes", floor)
    timed("minimal hand-written loop", minimal_loop)
    timed("smoothness.loss_surface (1 thread)", library)
    tmp = Path(tempfile.mkdtemp())
    try:
        for workers in (1, 2):
            copy = tmp / f"w{workers}" / run.name
            shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoints", "surfaces"))
            timed(f"smoothness-lab surface, process executor, {workers} worker(s)",
                  lambda: compute_surfaces([copy], spec, executor="process", workers=workers, quiet=True))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    floor_rate = rows[0][1] / rows[0][2]
    lines = [f"# Loss-surface throughput ({args.grid}×{args.grid} grid, {args.samples} images, `{run.name}`, "
             f"BN running/keep, 1 thread per worker)", "",
             f"`python benchmarks/bench_surface.py --grid {args.grid} --samples {args.samples}`", "",
             "| what | points | seconds | points/s | × floor |", "|---|---|---|---|---|"]
    for label, points, seconds in rows:
        lines.append(f"| {label} | {points} | {seconds:.1f} | {points / seconds:.1f} | "
                     f"{points / seconds / floor_rate:.2f} |")
    lines += ["", "Goals: library and 1 worker ≥ 0.90× the floor; 2 workers ≥ 1.7×.", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
