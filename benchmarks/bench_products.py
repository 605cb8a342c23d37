"""The cost of one curvature-matrix product, in units of one gradient, on the seed ConvNets (CPU, one thread).

For each model (ConvNet; BN-ConvNet in batch and running BN mode) at initialisation, on 256 FashionMNIST training
images, it times:

- **gradient**: one forward and one backward pass (fresh leaves, as ``Objective.loss_and_grad``): the unit;
- **Hessian, double backward (retained graph)**: ``HessianOperator.matvec_dict``, one backward pass through the
  graph of the first backward, which is built once (its setup, one forward + backward with ``create_graph``,
  reported apart);
- **Hessian, forward-over-reverse, linearize**: ``LinearizedHessianOperator.matvec_dict`` (``torch.func.linearize``
  of the gradient; the one-off trace reported apart);
- **Hessian, forward-over-reverse, jvp of grad**: ``torch.func.jvp(torch.func.grad(L), (w,), (v,))`` from
  scratch every product (no retained state);
- **GGN, jvp + vjp**: ``GGNOperator.matvec_dict`` (a forward-mode jvp through the model, the loss Hessian in the
  outputs, and a vjp through the forward graph kept from the setup);
- **empirical Fisher**: ``EmpiricalFisherOperator.matvec_dict`` (two matrix-vector products with the stored
  per-sample gradients; their computation by ``vmap(grad)`` reported as setup);
- the flat-vector overhead of the retained-graph product: ``matvec`` (flat in, flat out) minus ``matvec_dict``.

Each figure is the median over ``--repeats`` timings after one warm-up, in wall time and in CPU time of the
process (1 thread, so CPU time is the less noisy one on a shared machine). Writes benchmarks/results/products.md.

    python benchmarks/bench_products.py [--repeats 7] [--batch 256]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from experiments.data import load_dataset  # noqa: E402
from experiments.models import build_model  # noqa: E402
from smoothness._objective import Objective  # noqa: E402
from smoothness.fisher import EmpiricalFisherOperator  # noqa: E402
from smoothness.ggn import GGNOperator  # noqa: E402
from smoothness.hvp import HessianOperator, LinearizedHessianOperator  # noqa: E402


NOTES = """Reading. curvlinops reports about 2x a gradient for a GGN product and 3-4x for a Hessian product (GPU),
each computed from scratch, forward pass included. Our from-scratch Hessian product (jvp of grad) is in that range;
the operators the estimators use keep what does not depend on v from the setup: the retained-graph Hessian product
is one more backward pass, the linearized one only the tangent part (cheaper again on convolutions, after a trace
worth ~10 gradients, so it is used only when many products follow), and the GGN product is a jvp plus a backward
pass through the kept forward graph. The empirical Fisher pays its cost once (per-sample gradients by vmap) and its
products are then two matrix-vector products. Per-product overhead of the retained-graph operator: flat in/out vs
dict in/out differ by less than the noise, so flatten/unflatten costs nothing measurable; batching a block of
products with `is_grads_batched=True` was slower than a loop (0.6-0.8x, benchmarks/results/eigensolvers.md). No
cheap win left there; defaults unchanged."""


def timed(fn, repeats: int):
    """(median wall seconds, median CPU seconds) of fn() over ``repeats`` runs after one warm-up."""
    fn()
    walls, cpus = [], []
    for _ in range(repeats):
        c, t = time.process_time(), time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus)


def once(fn):
    c, t = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - t, time.process_time() - c


def measure(model, batch, bn_mode: str, repeats: int) -> list:
    objective = Objective(model, F.cross_entropy, batch, bn_mode)
    objective.loss_and_grad_at_w()  # the determinism check, outside every timing
    g = torch.Generator().manual_seed(0)
    v = {n: torch.randn(p.shape, generator=g) for n, p in objective.base.items()}
    w = dict(objective.base)

    grad = timed(lambda: objective.loss_and_grad(v, 0.0), repeats)
    rows = [("gradient (forward + backward)", grad, None)]

    retained_setup = once(lambda: HessianOperator(objective))
    retained = HessianOperator(objective)
    rows.append(("Hessian, double backward (retained graph)", timed(lambda: retained.matvec_dict(v), repeats),
                 retained_setup))
    flat = retained.flatten(v)
    rows.append(("  same, flat in/out (matvec)", timed(lambda: retained.matvec(flat), repeats), None))

    lin_setup = once(lambda: LinearizedHessianOperator(objective))
    linearized = LinearizedHessianOperator(objective)
    rows.append(("Hessian, forward-over-reverse (linearize)", timed(lambda: linearized.matvec_dict(v), repeats),
                 lin_setup))
    grad_fn = torch.func.grad(objective.loss)
    rows.append(("Hessian, forward-over-reverse (jvp of grad, from scratch)",
                 timed(lambda: torch.func.jvp(grad_fn, (w,), (v,)), repeats), None))

    ggn_setup = once(lambda: GGNOperator(objective))
    ggn = GGNOperator(objective)
    rows.append(("GGN, jvp + vjp (retained forward graph)", timed(lambda: ggn.matvec_dict(v), repeats), ggn_setup))
    if bn_mode == "running" or not any("Norm" in type(m).__name__ for m in model.modules()):
        ef_setup = once(lambda: EmpiricalFisherOperator(objective, check=False))
        ef = EmpiricalFisherOperator(objective, check=False)
        rows.append(("empirical Fisher, Gᵀ(Gv)/N (stored per-sample gradients)",
                     timed(lambda: ef.matvec_dict(v), repeats), ef_setup))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "products.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    ds = load_dataset("fashion-mnist", subset=0.1, seed=0)
    batch = (ds.x_train[:args.batch], ds.y_train[:args.batch])
    lines = [f"# Cost of one curvature product, in gradients (CPU, 1 thread, batch {args.batch})", "",
             "Written by `python benchmarks/bench_products.py`; models at initialisation (seed 0), FashionMNIST "
             f"training images; median of {args.repeats} timings after a warm-up. `x grad` = time of one product / "
             "time of one gradient, in CPU time of the process and in wall time. Setup = the one-off cost of "
             "building the operator, in gradients (CPU).", "", NOTES, ""]
    for name, bn_mode in (("convnet", "batch"), ("bn-convnet", "batch"), ("bn-convnet", "running")):
        torch.manual_seed(0)
        model = build_model(name)
        rows = measure(model, batch, bn_mode, args.repeats)
        (gw, gc) = rows[0][1]
        lines += [f"## {name}, bn_mode={bn_mode!r} (gradient: {gc * 1e3:.0f} ms CPU, {gw * 1e3:.0f} ms wall)", "",
                  "| product | x grad (CPU) | x grad (wall) | ms (CPU) | setup, x grad (CPU) |",
                  "|---|---:|---:|---:|---:|"]
        for label, (wall, cpu), setup in rows:
            s = "" if setup is None else f"{setup[1] / gc:.1f}"
            lines.append(f"| {label} | {cpu / gc:.2f} | {wall / gw:.2f} | {cpu * 1e3:.0f} | {s} |")
        lines.append("")
        print("\n".join(lines[-len(rows) - 5:]), flush=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
