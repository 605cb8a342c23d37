"""smoothness' gradient-noise instruments against Cockpit's (Schneider et al. 2021): values and time per step.

    cockpit-venv/bin/python benchmarks/bench_gradient_noise.py            # a few minutes, 1 thread
    cockpit-venv/bin/python benchmarks/bench_gradient_noise.py --quick    # values and a short timing

Cockpit needs its own environment (it pins ``setuptools<81``)::

    python3 -m venv cockpit-venv
    cockpit-venv/bin/pip install torch torchvision 'setuptools<81' cockpit-for-pytorch backpack-for-pytorch \
        numpy scipy pandas
    PYTHONPATH=$PWD cockpit-venv/bin/python benchmarks/bench_gradient_noise.py

1. Values, one batch of 32 synthetic 28x28 images, a ConvNet without BatchNorm (Conv 1→16 k5 → ReLU → MaxPool →
   Conv 16→32 k5 → ReLU → MaxPool → Linear 1568→10, 28,938 parameters, as experiments' ``convnet``), float64:
   norm / inner-product / orthogonality tests, gradient norm, mean GSNR, diagonal TIC (Cockpit: exact GGN diagonal,
   uncentred, ε = 1e-7), histogram counts (Cockpit's clipping into the outer bins) and α. Cockpit's α takes its end
   point on the next minibatch: the benchmark feeds the same batch twice so that both measure the same thing.
2. Time per SGD step (float32, torch.set_num_threads(1)), batch 32 and 128: bare step; Cockpit's "economy"
   configuration (Alpha, Distance, GradHist1d, GradNorm, InnerTest, Loss, NormTest, OrthoTest, UpdateSize) at every
   step; ours at every step (gradient_noise with the histogram in its pass, and step_quality of the step about to be
   taken, both ends on the step's batch); and both every 10 steps. CPU time (``time.process_time``) of whole runs,
   the variants interleaved, medians over repeats.
"""
from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from smoothness import gradient_noise, observe_line, step_quality, step_quality_from, tic  # noqa: E402
from smoothness.gradient_noise import DEFAULT_EDGES  # noqa: E402

warnings.filterwarnings("ignore")


def convnet() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(7 * 7 * 32, 10))


def batches(n_steps: int, size: int, dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 1, 28, 28, generator=g, dtype=dtype), torch.randint(0, 10, (size,), generator=g))
            for _ in range(n_steps)]


# -- Cockpit ------------------------------------------------------------------------------------------------------
def cockpit_run(model, data, quantities, lr=0.05):
    """SGD over ``data`` with Cockpit tracking ``quantities``; returns Cockpit's output dict."""
    from backpack import extend
    from cockpit import Cockpit
    model = extend(model)
    loss_fn = extend(nn.CrossEntropyLoss())
    each = nn.CrossEntropyLoss(reduction="none")
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    cp = Cockpit(model.parameters(), quantities=quantities)
    for step, (x, y) in enumerate(data):
        opt.zero_grad()
        out = model(x)
        loss = loss_fn(out, y)
        with cp(step, info={"batch_size": x.shape[0], "individual_losses": each(out, y), "loss": loss,
                            "optimizer": opt}):
            loss.backward(create_graph=cp.create_graph(step))
        opt.step()
    return cp.get_output()


def economy(interval: int = 1):
    from cockpit.utils.configuration import configuration
    from cockpit.utils.schedules import linear
    return configuration("economy", track_schedule=linear(interval))


# -- ours ---------------------------------------------------------------------------------------------------------
def our_run(model, data, every: int, lr=0.05, same_batch: bool = False):
    """SGD over ``data``, measuring the economy-equivalent set every ``every`` steps (0: never): gradient_noise
    (tests, norm, GSNR, histogram, loss) and α of each tracked step, by Cockpit's protocol (start from the tracked
    step's own pass, end on the next batch at w + s: ``directions`` of the next pass, or observe_line) or, with
    ``same_batch``, by step_quality (both ends on the tracked step's batch)."""
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    w0 = [p.detach().clone() for p in model.parameters()]
    out, pending = [], None   # pending: (start observation, t, s) of the last tracked step
    for step, (x, y) in enumerate(data):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        s = {n: -lr * p.grad for n, p in model.named_parameters()}
        t = math.sqrt(sum(float((v ** 2).sum()) for v in s.values()))
        if every and step % every == 0:
            directions = {"step": s} if pending is None else {"step": s, "previous": pending[2]}
            noise = gradient_noise(model, loss_fn, (x, y), edges=DEFAULT_EDGES,
                                   directions=None if same_batch else directions)
            distance = math.sqrt(sum(float(((p - p0) ** 2).sum()) for p, p0 in zip(model.parameters(), w0)))
            if same_batch:
                alpha = step_quality(model, loss_fn, (x, y), s).alpha
            else:
                alpha = (step_quality_from(pending[0], noise.lines["previous"], pending[1]).alpha
                         if pending is not None else None)
                pending = (noise.lines["step"], t, s)
            out.append((float(loss), noise, alpha, distance, t))
        elif pending is not None:
            out.append(step_quality_from(pending[0], observe_line(model, loss_fn, (x, y), pending[2]),
                                         pending[1]).alpha)
            pending = None
        opt.step()
    return out


def bare_run(model, data, lr=0.05):
    return our_run(model, data, every=0, lr=lr)


# -- 1. values ----------------------------------------------------------------------------------------------------
def compare_values(size: int = 32):
    from cockpit import quantities as q
    from cockpit.utils.schedules import linear
    torch.manual_seed(0)
    model = convnet().double()
    x, y = batches(1, size, torch.float64, seed=1)[0]
    every = linear(1)
    qs = [q.NormTest(every), q.InnerTest(every), q.OrthoTest(every), q.GradNorm(every), q.MeanGSNR(every),
          q.TICDiag(every, curvature="diag_ggn_exact"), q.GradHist1d(every), q.Alpha(every)]
    lr = 0.05
    ours_model = copy.deepcopy(model)
    output = cockpit_run(copy.deepcopy(model), [(x, y), (x, y)], qs, lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    noise = gradient_noise(ours_model, loss_fn, (x, y), edges=DEFAULT_EDGES)
    grad = torch.autograd.grad(loss_fn(ours_model(x), y), list(ours_model.parameters()))
    step = {n: -lr * g for (n, _), g in zip(ours_model.named_parameters(), grad)}
    quality = step_quality(ours_model, loss_fn, (x, y), step)
    t = tic(ours_model, loss_fn, (x, y), moment="uncentred")
    hist = np.asarray(output[0]["GradHist1d"]["hist"])
    rows = [("norm test", output[0]["NormTest"], noise.norm_test),
            ("inner-product test", output[0]["InnerTest"], noise.inner_product_test),
            ("orthogonality test", output[0]["OrthoTest"], noise.orthogonality_test),
            ("gradient norm", output[0]["GradNorm"], noise.gradient_norm),
            ("mean GSNR (ε = 1e-5)", output[0]["MeanGSNR"], noise.gsnr),
            ("TIC diag (GGN, uncentred, ε = 1e-7)", output[0]["TICDiag"], t.tic_diag),
            ("α (same batch at both ends)", output[0]["Alpha"], quality.alpha)]
    # Cockpit's GradNorm is one norm per parameter tensor
    rows = [(name, float(c if not isinstance(c, (list, tuple)) else math.sqrt(sum(v * v for v in c))), float(o))
            for name, c, o in rows]
    hist_gap = int(np.abs(hist - noise.histogram.clipped_counts).sum())
    return rows, hist_gap, int(hist.sum())


# -- 2. time ------------------------------------------------------------------------------------------------------
def timed(fn):
    start = time.process_time()
    fn()
    return time.process_time() - start


def time_steps(size: int, n_steps: int, repeats: int):
    torch.manual_seed(0)
    base = convnet()
    data = batches(n_steps, size, torch.float32)
    variants = {
        "bare step": lambda: bare_run(copy.deepcopy(base), data),
        "Cockpit economy, every step": lambda: cockpit_run(copy.deepcopy(base), data, economy(1)),
        "ours, every step": lambda: our_run(copy.deepcopy(base), data, every=1),
        "ours, every step, α on the same batch": lambda: our_run(copy.deepcopy(base), data, every=1,
                                                                   same_batch=True),
        "Cockpit economy, every 10 steps": lambda: cockpit_run(copy.deepcopy(base), data, economy(10)),
        "ours, every 10 steps": lambda: our_run(copy.deepcopy(base), data, every=10),
    }
    for fn in variants.values():  # warm-up: imports, determinism check, allocator
        fn()
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(timed(fn) / n_steps)
    return {name: statistics.median(v) for name, v in times.items()}, times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats")
    parser.add_argument("--out", default=None, help="write the markdown table here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    lines = []
    rows, hist_gap, hist_total = compare_values()
    lines += ["## Values: Cockpit vs smoothness (ConvNet without BN, batch 32, float64)", "",
              "| quantity | Cockpit | smoothness | relative difference |", "|---|---|---|---|"]
    for name, c, o in rows:
        lines.append(f"| {name} | {c:.10g} | {o:.10g} | {abs(c - o) / max(abs(c), 1e-300):.1e} |")
    lines += ["", f"GradHist1d (100 bins over [-2, 2], outliers clipped): {hist_gap} of {hist_total} entries in "
              f"different bins.", ""]
    n_steps, repeats = (20, 1) if args.quick else (40, 3)
    lines += [f"## Time per SGD step (float32, 1 thread, CPU seconds; median of {repeats} interleaved runs of "
              f"{n_steps} steps)", "", "| batch | variant | ms / step | × bare | × Cockpit (same schedule) |",
              "|---|---|---|---|---|"]
    for size in (32, 128):
        med, _ = time_steps(size, n_steps, repeats)
        bare = med["bare step"]
        for name, value in med.items():
            partner = {"ours, every step": "Cockpit economy, every step",
                       "ours, every step, α on the same batch": "Cockpit economy, every step",
                       "ours, every 10 steps": "Cockpit economy, every 10 steps"}.get(name)
            vs = f"{value / med[partner]:.2f}" if partner else ""
            lines.append(f"| {size} | {name} | {1000 * value:.1f} | {value / bare:.2f} | {vs} |")
        print("\n".join(lines), flush=True)
    text = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
