"""Training-loop throughput against a minimal hand-written PyTorch loop, and the default study's time budget.

    python benchmarks/bench_training.py              # loop throughput (about a minute)
    python benchmarks/bench_training.py --study-dir results/fashion-mnist-bn   # + time shares of a finished study
    python benchmarks/bench_training.py --gd         # full-batch GD step on 5,000 images (edge-of-stability preset)

Throughput: `experiments.training.train_run` with every measurement switched off except the per-epoch ones, whose
time is booked separately in timing.json, so its "train" seconds are the SGD steps alone (sampling, forward,
backward, update, step records). The reference is the loop a researcher would write over the same preloaded
tensors and the same batch indices. Targets (issue 3): ratio >= 0.9; the default `smoothness-lab run` under 10 min.
"""
from __future__ import annotations

import argparse
import json
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
from experiments.training import train_run


def hand_loop(cfg: RunConfig, data) -> float:
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, input_shape=data.input_shape)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    n = data.x_train.shape[0]
    steps = cfg.total_steps(n)
    model.train()
    start = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(n, (cfg.batch_size,), generator=gen)
        loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - start


def ours(cfg: RunConfig) -> float:
    """Seconds of SGD steps alone (timing.json books the per-epoch measurements separately)."""
    with tempfile.TemporaryDirectory() as root:
        outcome = train_run(cfg, Path(root))
        return json.loads((outcome.path / "timing.json").read_text())["train"]


def throughput(repeats: int, threads: int) -> list:
    torch.set_num_threads(threads)
    rows = []
    for model in ("convnet", "bn-convnet"):
        cfg = RunConfig(model=model, epochs=1, probe_every=0, sharpness_samples=64, local_smoothness_samples=64)
        data = load_dataset(cfg.dataset, subset=cfg.subset, seed=cfg.seed)
        hand, mine = [], []
        for _ in range(repeats):  # interleaved, median: the machine's noise hits both alike
            hand.append(hand_loop(cfg, data))
            mine.append(ours(cfg))
        steps = cfg.steps_per_epoch(data.x_train.shape[0])
        h, m = statistics.median(hand), statistics.median(mine)
        rows.append((model, steps / h, steps / m, h / m))
    return rows


GD_CONFIG = dict(model="fc-tanh", loss="mse", batch_size=0, subset=5000 / 60000, epochs=300, eval_every=300,
                 probe_every=0, sharpness_samples=64, local_smoothness_samples=64, lr=0.04)


def hand_gd(cfg: RunConfig, data) -> float:
    """Full-batch gradient descent as a researcher would write it, same model, loss and data."""
    from experiments.losses import get_loss
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, input_shape=data.input_shape)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    loss_fn = get_loss(cfg.loss)
    model.train()
    start = time.perf_counter()
    for _ in range(cfg.epochs):
        loss = loss_fn(model(data.x_train), data.y_train)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - start


def gd_throughput(repeats: int, threads: int) -> tuple:
    """Steps/s of train_run's full-batch GD (its "train" seconds: steps and step records) vs ``hand_gd``."""
    torch.set_num_threads(threads)
    cfg = RunConfig(**GD_CONFIG)
    data = load_dataset(cfg.dataset, subset=cfg.subset, seed=cfg.seed)
    hand, mine = [], []
    for _ in range(repeats):
        hand.append(hand_gd(cfg, data))
        mine.append(ours(cfg))
    h, m = statistics.median(hand), statistics.median(mine)
    return data.x_train.shape[0], cfg.epochs / h, cfg.epochs / m, h / m


def study_shares(study_dir: Path) -> dict:
    totals = {}
    for timing in study_dir.glob("*/timing.json"):
        for k, v in json.loads(timing.read_text()).items():
            totals[k] = totals.get(k, 0.0) + v
    return totals


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--study-dir", type=Path, default=None, help="a finished study whose time shares to report")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "training.md")
    ap.add_argument("--gd", action="store_true", help="only the full-batch GD comparison, into results/gd_step.md")
    args = ap.parse_args(argv)
    if args.gd:
        n, h, m, r = gd_throughput(args.repeats, args.threads)
        text = "\n".join([
            f"# Full-batch GD step: fc-tanh, square loss, {n} FashionMNIST images ({args.threads} thread(s), "
            f"{GD_CONFIG['epochs']} steps, median of {args.repeats} interleaved runs)", "",
            "| hand-written loop (steps/s) | train_run (steps/s) | ratio (target >= 0.9) |", "|---|---|---|",
            f"| {h:.1f} | {m:.1f} | {r:.2f} {'PASS' if r >= 0.9 else 'FAIL'} |"]) + "\n"
        print(text)
        out = args.out.with_name("gd_step.md") if args.out.name == "training.md" else args.out
        out.write_text(text)
        return 0
    lines = [f"# Training-loop throughput (1 pass of the default config, {args.threads} thread(s), "
             f"median of {args.repeats})", "", "| model | hand-written loop (steps/s) | train_run (steps/s) | "
             "ratio (target >= 0.9) |", "|---|---|---|---|"]
    for model, h, m, r in throughput(args.repeats, args.threads):
        lines.append(f"| {model} | {h:.1f} | {m:.1f} | {r:.2f} {'PASS' if r >= 0.9 else 'FAIL'} |")
    if args.study_dir is not None:
        totals = study_shares(args.study_dir)
        total = totals.pop("total", sum(totals.values()))
        path = args.study_dir / "launch.json"
        launches = json.loads(path.read_text())["launches"] if path.exists() else []
        trained = [x for x in launches if set(x["runs"]) - {"skipped"}]  # a relaunch that only skipped says nothing
        launch = trained[-1] if trained else {}
        lines += ["", f"# Time shares of {args.study_dir} (summed over runs: {total:.0f} s of run time)", "",
                  "| phase | seconds | share |", "|---|---|---|"]
        for k, v in sorted(totals.items(), key=lambda kv: -kv[1]):
            lines.append(f"| {k} | {v:.1f} | {100 * v / total:.1f}% |")
        if launch:
            lines += ["", f"Wall time of the whole `smoothness-lab run`: {launch['wall_seconds']:.0f} s "
                      f"({launch['executor']}, {launch['workers']} workers x {launch['threads']} threads, "
                      f"{launch['cpu_count']} cores; target < 600 s: "
                      f"{'PASS' if launch['wall_seconds'] < 600 else 'FAIL'})"]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
