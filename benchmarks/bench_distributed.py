"""Top Hessian eigenvalue over a dataset split across 2 ranks (gloo, 1 thread each) vs one process (1 thread).

The seed ConvNet at initialisation, ``--n`` FashionMNIST training images in chunks of ``--chunk``. One process runs
``top_eigenvalues(model, F.cross_entropy, chunks, tol=1e-3)`` over every chunk; two processes
(``torch.multiprocessing.spawn``, gloo, ``init_method=file://``) each pass half the chunks and ``group=WORLD``.
Timed from a barrier after ``init_process_group`` to the result (process start-up and imports, a few seconds paid
once per job, are not counted; they are reported apart). Both must return the same value (to 1e-6 relative: the
sums run in another order, float32). Goal: speed-up >= 1.6x. Writes benchmarks/results/distributed.md.

    python benchmarks/bench_distributed.py [--n 2048] [--chunk 256] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

import smoothness  # noqa: E402
from experiments.data import load_dataset  # noqa: E402
from experiments.models import build_model  # noqa: E402

GOAL = 1.6
WORLD = 2


def setup(n: int, chunk: int):
    torch.manual_seed(0)
    model = build_model("convnet")
    ds = load_dataset("fashion-mnist", subset=0.1, seed=0)
    x, y = ds.x_train[:n], ds.y_train[:n]
    return model, [(x[i:i + chunk], y[i:i + chunk]) for i in range(0, n, chunk)]


def run(model, chunks, group=None):
    if group is not None:
        dist.barrier(group)
    c, t = time.process_time(), time.perf_counter()
    out = smoothness.top_eigenvalues(model, F.cross_entropy, chunks, k=1, tol=1e-3, bn_mode="running", group=group)
    return out, time.perf_counter() - t, time.process_time() - c


def _rank(rank: int, init_file: str, out_dir: str, n: int, chunk: int, repeats: int, started: float) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        startup = time.time() - started
        model, chunks = setup(n, chunk)
        shard = chunks[rank::WORLD]
        runs = [run(model, shard, dist.group.WORLD) for _ in range(repeats)]
        torch.save({"runs": [(r.values, r.n_hvp, r.batch_size, wall, cpu) for r, wall, cpu in runs],
                    "startup": startup}, f"{out_dir}/rank{rank}.pt")
        dist.barrier()   # both ranks are done before either tears gloo down
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "distributed.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, chunks = setup(args.n, args.chunk)
    single = [run(model, chunks) for _ in range(args.repeats)]
    with tempfile.TemporaryDirectory() as tmp:
        started = time.time()
        mp.spawn(_rank, args=(os.path.join(tmp, "init"), tmp, args.n, args.chunk, args.repeats, started),
                 nprocs=WORLD, join=True)
        ranks = [torch.load(f"{tmp}/rank{r}.pt", weights_only=False) for r in range(WORLD)]
    one_wall = statistics.median(w for _, w, _ in single)
    # a distributed run takes as long as its slowest rank
    two_wall = statistics.median(max(rk["runs"][i][3] for rk in ranks) for i in range(args.repeats))
    value, n_hvp = single[0][0].values[0], single[0][0].n_hvp
    rank_values = [rk["runs"][0][0][0] for rk in ranks]
    agree = max(abs(v - value) / abs(value) for v in rank_values)
    speedup = one_wall / two_wall
    cpu_speedup = (statistics.median(c for _, _, c in single)
                   / max(statistics.median(x[4] for x in rk["runs"]) for rk in ranks))
    lines = [
        "# Top eigenvalue over data split across 2 ranks vs one process (CPU, 1 thread per process)", "",
        "Written by `python benchmarks/bench_distributed.py`"
        f" (--n {args.n} --chunk {args.chunk} --repeats {args.repeats}). Seed ConvNet at initialisation, "
        f"{args.n} FashionMNIST training images in chunks of {args.chunk}, `top_eigenvalues(k=1, tol=1e-3, "
        "bn_mode='running')`; 2 ranks: gloo on one machine, each rank half the chunks and `group=WORLD`. Median "
        "wall time of the runs; a 2-rank run counts its slower rank. Process start-up (spawn, imports, "
        "init_process_group) is not counted (reported below).", "",
        "| setup | λ_max | products | wall s (median) | CPU s per process (median) |",
        "|---|---:|---:|---:|---:|",
        f"| 1 process, all {args.n} images | {value:.6g} | {n_hvp} | {one_wall:.2f} | "
        f"{statistics.median(c for _, _, c in single):.2f} |",
    ]
    for r, rk in enumerate(ranks):
        mine = sum(len(c[1]) for c in chunks[r::WORLD])
        lines.append(f"| rank {r} of 2, {mine} of {rk['runs'][0][2]} images | {rk['runs'][0][0][0]:.6g} | "
                     f"{rk['runs'][0][1]} | {statistics.median(x[3] for x in rk['runs']):.2f} | "
                     f"{statistics.median(x[4] for x in rk['runs']):.2f} |")
    lines += ["", f"Speed-up (1 process / 2 ranks, wall): **{speedup:.2f}x** (goal {GOAL}x: "
                  f"{'met' if speedup >= GOAL else 'not met'}); in CPU time per process, {cpu_speedup:.2f}x. Largest relative difference of a rank's λ_max from "
                  f"the one-process value: {agree:.1e}. Start-up of the 2 ranks until init_process_group returned: "
                  f"{max(rk['startup'] for rk in ranks):.1f} s.",
              f"Machine: {os.cpu_count()} CPUs visible, load average {os.getloadavg()[0]:.1f} at the end "
              "(other jobs share the machine: the speed-up is bounded by the free cores)."]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
