"""Sharpness along training, cold vs warm-started Lanczos: Hessian-vector products and seconds per measurement at
the same accuracy (issue 12 §4, issue 13 performance).

    python benchmarks/bench_sharpness_warm.py          # both settings (~10 min on one core), results/sharpness_warm.md

Settings, each along one real training trajectory, measured both ways at every point (the measurements never change
the training, so cold and warm see the same weights):

- ``sgd``: the reference study's configuration (fashion-mnist-bn, seed 0, ConvNet and BN-ConvNet: SGD lr 0.04, batch 32),
  sharpness on its fixed 256-image sample once per pass (11 measurements), as ``smoothness-lab run`` does;
- ``gd``: the edge-of-stability preset's run (fc-tanh, square loss, full-batch GD lr 0.04, 5,000 images), sharpness
  on all 5,000 images in chunks of 1,000 every 20 steps over 1,000 steps (51 measurements).

Cold: top-1 from a random start vector (generator seeded 0), as ``--sharpness-start cold`` does. Warm: the top 2
from the previous warm measurement's top-2 vectors, as ``--sharpness-start warm`` does (its first measurement is a
cold top-2). ``--one-vector``: the top 1 from the previous top vector alone, to show why warm asks for two. Both stop at the toolkit's rule, residual <= tol·|θ| with tol = 1e-3, so each value is within
0.1% of an eigenvalue; the table reports the largest relative difference between cold and warm values too.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import smoothness  # noqa: E402
from experiments.config import RunConfig  # noqa: E402
from experiments.data import load_dataset  # noqa: E402
from experiments.losses import get_loss  # noqa: E402
from experiments.models import build_model  # noqa: E402
from experiments.features.lambda_max.compute import WarmStart, sharpness_batch  # noqa: E402

TOL = 1e-3
WARM_K = WarmStart.K


def measure(model, loss_fn, batch, start, k=1):
    t = time.perf_counter()
    e = smoothness.top_eigenvalues(model, loss_fn, batch, k=k, tol=TOL, start=start)
    return e, time.perf_counter() - t


def trajectory(cfg: RunConfig, every: int, steps: int):
    """(cold, warm) EigenResults and seconds at steps 0, every, 2·every, ... of the run's own training."""
    data = load_dataset(cfg.dataset, subset=cfg.subset, seed=cfg.seed)
    x, y = data.x_train, data.y_train
    n = x.shape[0]
    loss_fn = get_loss(cfg.loss)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, input_shape=data.input_shape, num_classes=data.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    sampler = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + 10_000))
    idx = order[:cfg.sharpness_samples] if cfg.sharpness_samples else order
    batch = sharpness_batch(model, x[idx], y[idx])
    rows, prev = [], None
    for t in range(steps + 1):
        if t % every == 0:
            cold, tc = measure(model, loss_fn, batch, None)
            warm, tw = measure(model, loss_fn, batch, prev, WARM_K)
            prev = warm.vectors[:WARM_K]
            rows.append((t, cold, tc, warm, tw))
        if t == steps:
            break
        b = slice(None) if cfg.batch_size == 0 else torch.randint(n, (cfg.batch_size,), generator=sampler)
        model.train()
        loss = loss_fn(model(x[b]), y[b])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return rows


def summarise(label, rows):
    later = rows[1:]  # the first warm measurement has nothing to start from
    hc = [r[1].n_hvp for r in later]
    hw = [r[3].n_hvp for r in later]
    sc = [r[2] for r in later]
    sw = [r[4] for r in later]
    diff = max(abs(r[3].values[0] - r[1].values[0]) / abs(r[1].values[0]) for r in rows)
    ok = all(r[1].converged and r[3].converged for r in rows)
    return (f"| {label} | {len(rows)} | {statistics.mean(hc):.1f} | {statistics.mean(hw):.1f} | "
            f"{statistics.mean(hw) / statistics.mean(hc):.2f} | {statistics.mean(sc):.2f} | {statistics.mean(sw):.2f} | "
            f"{diff:.1e} | {'yes' if ok else 'NO'} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--gd-steps", type=int, default=1000)
    ap.add_argument("--only", choices=["sgd", "gd"], default=None)
    ap.add_argument("--one-vector", action="store_true")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "sharpness_warm.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    global WARM_K
    if args.one_vector:
        WARM_K = 1
    lines = [f"# Sharpness along training: cold vs warm start (tol {TOL:g}, {args.threads} thread(s))", "",
             "Means over the measurements after the first. Products = Hessian-vector products; the largest relative "
             "difference between the cold and the warm value at the same weights shows both reach the same "
             "accuracy.", "",
             "| trajectory | measurements | products cold | products warm | warm / cold | s cold | s warm | "
             "max rel. diff | all converged |", "|---|---|---|---|---|---|---|---|---|"]
    for model in ("convnet", "bn-convnet") if args.only != "gd" else ():
        cfg = RunConfig(model=model)
        n = round(6000 / cfg.batch_size)
        rows = trajectory(cfg, every=n, steps=n * cfg.epochs)
        lines.append(summarise(f"SGD {model}, once per pass, 256 images", rows))
        print(lines[-1], flush=True)
    if args.only != "sgd":
        cfg = RunConfig(model="fc-tanh", loss="mse", batch_size=0, subset=5000 / 60000, lr=0.04, sharpness_samples=0)
        rows = trajectory(cfg, every=20, steps=args.gd_steps)
        guard = "warm: top 1 from 1 vector" if args.one_vector else "warm: top 2 from 2 vectors"
        lines.append(summarise(f"full-batch GD fc-tanh η=0.04, every 20 steps, 5,000 images in 5 chunks ({guard})",
                               rows))
        print(lines[-1], flush=True)
        worst = max(rows, key=lambda r: abs(r[3].values[0] - r[1].values[0]))
        lines.append(f"\nLargest cold-warm difference at step {worst[0]}: cold {worst[1].values[0]:.4f}, "
                     f"warm {worst[3].values[0]:.4f}.")
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
