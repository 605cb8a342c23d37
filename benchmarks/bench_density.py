"""The Hessian eigenvalue density against PyHessian's ``density()``, and curvature over a dataset at bounded memory.

Run from the repository root (needs the ``benchmark`` extra, i.e. ``pip install pyhessian``):

    python benchmarks/bench_density.py             # every section, as behind benchmarks/results/density.md (~50 min)
    python benchmarks/bench_density.py --quick     # a smoke run of every section on small settings (~3 min)

Setting (all seeded, as in bench_smoothness.py): FashionMNIST, the 10% training subset drawn with seed 0 (6,000
images); the Hessian batch is its first ``--batch`` (1,000) images. Models: the seed ConvNet and BN-ConvNet built
under ``torch.manual_seed(0)`` ("init") and after one epoch of plain SGD (lr 0.04, batch 32) over the 6,000 images
("1 epoch"). Curvature with ``bn_mode="running"`` because PyHessian puts the model in eval mode. Every tool runs
under ``torch.set_num_threads(--threads)`` (1 by default).

Sections (``--sections``):
  products  seconds per Hessian-vector product: PyHessian's (the model's own double backward), ours with a retained
            graph (``HessianOperator``) and ours linearized (``LinearizedHessianOperator``, which spectral_density
            picks on these networks); median of ``--repeats`` interleaved runs.
  density   spectral_density(n_probes=P, n_steps=m) vs PyHessian density(iter=m, n_v=P): wall and CPU time,
            products, and the Wasserstein-1 distance of each quadrature measure to a high-accuracy reference (our
            SLQ with ``--ref-probes`` probes of ``--ref-steps`` steps, other probes). The reference's own noise is
            shown as the W1 distance between its two halves of probes.
  memory    dataset-scale top eigenvalue (top_eigenvalues k=1, tol 1e-3, bn_mode="batch") of the ConvNet at init on
            ``--chunks`` chunks of ``--batch`` images, against the same on one chunk and (``--memory-full``) on one
            batch of all the images: peak RSS of each in a fresh process, above the RSS just before the call.

PyHessian 0.1's ``density()`` calls ``torch.eig``, which PyTorch removed in 2.0; the benchmark supplies it from
``torch.linalg.eigh`` (T is symmetric; a 100×100 problem costs microseconds), the only change to PyHessian.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import wasserstein_distance

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:  # run as a script from anywhere
        sys.path.insert(0, str(path))

import smoothness  # noqa: E402
from smoothness.allocator import tune_cpu_allocator  # noqa: E402
from smoothness._objective import Objective  # noqa: E402
from smoothness.hvp import HessianOperator, LinearizedHessianOperator  # noqa: E402
from experiments.models import build_model  # noqa: E402
from bench_smoothness import _install_pyhessian_counter, _PYH_COUNT, build_states, load_batches  # noqa: E402

TARGET_TIME = 0.7      # ours / PyHessian, same probes and steps
TARGET_MEMORY = 1.5    # peak extra RSS over chunks / of one chunk
SECTIONS = ("products", "density", "memory")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# The tools

@contextlib.contextmanager
def _torch_eig():
    """``torch.eig`` as PyHessian 0.1 expects it (removed in PyTorch 2: it now raises), for its symmetric T."""
    def eig(matrix, eigenvectors=True):
        values, vectors = torch.linalg.eigh(matrix)
        return torch.stack([values, torch.zeros_like(values)], dim=1), vectors

    original = torch.eig
    torch.eig = eig
    try:
        yield
    finally:
        torch.eig = original


def pyhessian_density(model, batch, n_probes: int, n_steps: int, seed: int):
    """PyHessian's density on a copy of the model (it switches the model to eval mode and leaves graphs in .grad)."""
    module = _install_pyhessian_counter()
    model = copy.deepcopy(model)
    for p in model.parameters():
        p.grad = None
    torch.manual_seed(seed)  # its probes come from the global generator
    _PYH_COUNT[0] = 0
    h = module.hessian(model, torch.nn.CrossEntropyLoss(), data=batch, cuda=False)
    with _torch_eig():
        nodes, weights = h.density(iter=n_steps, n_v=n_probes)
    n = _PYH_COUNT[0]
    for p in model.parameters():
        p.grad = None
    del h
    nodes = np.concatenate([np.asarray(x, dtype=np.float64) for x in nodes])
    weights = np.concatenate([np.asarray(w, dtype=np.float64) for w in weights]) / n_probes
    return nodes, weights, n


def ours_density(model, batch, n_probes: int, n_steps: int, seed: int):
    r = smoothness.spectral_density(model, F.cross_entropy, batch, n_probes=n_probes, n_steps=n_steps,
                                    bn_mode="running", generator=torch.Generator().manual_seed(seed))
    nodes, weights = r.measure()
    return nodes, weights, r.n_hvp, r


def timed(fn):
    gc.collect()
    c, t = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t, time.process_time() - c


# ----------------------------------------------------------------------------------------------------------------
# Sections

def section_products(models, batch, repeats: int) -> list:
    rows = []
    for (name, state), model in models.items():
        model = copy.deepcopy(model).eval()
        params = [p for p in model.parameters()]
        loss = F.cross_entropy(model(batch[0]), batch[1])
        grads = torch.autograd.grad(loss, params, create_graph=True)
        v = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) for i, p in enumerate(params)]
        objective = Objective(model, F.cross_entropy, batch, "running")
        retained = HessianOperator(objective)
        (linearized, setup, setup_cpu) = timed(lambda: LinearizedHessianOperator(objective))
        vd = dict(zip(retained.names, v))
        tools = {"PyHessian (model's double backward)":
                 lambda: torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True),
                 "smoothness HessianOperator (retained graph)": lambda: retained.matvec_dict(vd),
                 "smoothness LinearizedHessianOperator": lambda: linearized.matvec_dict(vd)}
        times = {k: ([], [], []) for k in tools}
        names = list(tools)
        for r in range(repeats):
            for k in names[r % 3:] + names[:r % 3]:
                faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                _, wall, cpu = timed(tools[k])
                times[k][0].append(wall)
                times[k][1].append(cpu)
                times[k][2].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
        base = statistics.median(times[names[0]][1])
        for k in names:
            rows.append((name, state, k, statistics.median(times[k][0]), statistics.median(times[k][1]),
                         statistics.median(times[k][1]) / base, statistics.median(times[k][2]),
                         f"{setup:.1f} s ({setup_cpu:.1f} s CPU) once" if "Linearized" in k else "-"))
        log(f"products {name} {state}: " + ", ".join(f"{k.split()[0]} {statistics.median(times[k][1]):.3f}s"
                                                     for k in names))
    return rows


def section_density(models, batch, probes: int, steps: int, ref_probes: int, ref_steps: int) -> list:
    rows = []
    for i, ((name, state), model) in enumerate(models.items()):
        t = time.perf_counter()
        ref = smoothness.spectral_density(model, F.cross_entropy, batch, n_probes=ref_probes, n_steps=ref_steps,
                                          bn_mode="running", generator=torch.Generator().manual_seed(1000))
        ref_nodes, ref_weights = ref.measure()
        half = ref_probes // 2
        a = smoothness.DensityResult(ref.nodes[:half], ref.weights[:half], ref.n_params, ref_steps, 0, "running", 0)
        b = smoothness.DensityResult(ref.nodes[half:], ref.weights[half:], ref.n_params, ref_steps, 0, "running", 0)
        (na, wa), (nb, wb) = a.measure(), b.measure()
        noise = wasserstein_distance(na, nb, wa, wb)
        width = float(ref_nodes.max() - ref_nodes.min())
        log(f"reference {name} {state}: {ref.n_hvp} products in {time.perf_counter() - t:.0f}s, "
            f"width {width:.2f}, half-vs-half W1 {noise:.4f}")
        tools = {"smoothness spectral_density": lambda: ours_density(model, batch, probes, steps, seed=1),
                 "PyHessian density": lambda: pyhessian_density(model, batch, probes, steps, seed=1)}
        order = list(tools) if i % 2 == 0 else list(tools)[::-1]
        results = {}
        for k in order:
            out, wall, cpu = timed(tools[k])
            nodes, weights, n_hvp = out[:3]
            results[k] = (wall, cpu, n_hvp, wasserstein_distance(nodes, ref_nodes, weights, ref_weights),
                          float(nodes.max()))
            log(f"  {k}: {wall:.1f}s wall, {cpu:.1f}s CPU, {n_hvp} products, W1 {results[k][3]:.4f}")
        pyh_wall, pyh_cpu = results["PyHessian density"][:2]
        for k, (wall, cpu, n_hvp, w1, top) in results.items():
            rows.append((name, state, k, wall, cpu, n_hvp, w1, w1 / width, top, wall / pyh_wall, cpu / pyh_cpu))
        rows.append((name, state, f"reference ({ref_probes}×{ref_steps}; half vs half W1)", None, None, ref.n_hvp,
                     noise, noise / width, float(ref_nodes.max()), None, None))
    return rows


def memory_child(mode: str, n_batch: int, n_chunks: int, threads: int) -> None:
    """In a fresh process: peak RSS of one top-eigenvalue computation above the RSS just before it."""
    torch.set_num_threads(threads)
    ds, _ = load_batches(n_batch)
    x, y = ds.x_train[:n_batch * n_chunks], ds.y_train[:n_batch * n_chunks]
    torch.manual_seed(0)
    model = build_model("convnet")
    data = {"one chunk": (x[:n_batch], y[:n_batch]),
            "chunks": [(x[i:i + n_batch], y[i:i + n_batch]) for i in range(0, len(x), n_batch)],
            "one batch": (x, y)}[mode]
    smoothness.loss_and_gradient(model, F.cross_entropy, (x[:64], y[:64]))  # warm-up: kernels, code pages
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:  # reset the high-water mark to the current RSS (Linux >= 4.0)
        f.write("5")
    before = _status_kib("VmRSS")
    t = time.perf_counter()
    r = smoothness.top_eigenvalues(model, F.cross_entropy, data, k=1, tol=1e-3, bn_mode="batch")
    seconds = time.perf_counter() - t
    print("RESULT " + json.dumps({"extra_kib": _status_kib("VmHWM") - before, "before_kib": before,
                                  "value": r.values[0], "n_hvp": r.n_hvp, "batch_size": r.batch_size,
                                  "seconds": seconds}))


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def section_memory(n_batch: int, n_chunks: int, threads: int, full: bool) -> list:
    rows = []
    # glibc hands large freed blocks back at once with a fixed mmap threshold, so RSS follows the live tensors
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    for mode in ("one chunk", "chunks") + (("one batch",) if full else ()):
        out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--memory-child", mode,
                              "--batch", str(n_batch), "--chunks", str(n_chunks), "--threads", str(threads)],
                             capture_output=True, text=True, env=env, check=True)
        result = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[7:])
        log(f"memory {mode}: {result}")
        rows.append((mode, result))
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Report

def render(args, products, density, memory, started: float) -> str:
    out = ["# Spectral density and dataset-scale curvature benchmark", ""]
    cmd = " ".join(["python benchmarks/bench_density.py"] + sys.argv[1:])
    out += [f"Command: `{cmd}`  ",
            f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
            f"torch.set_num_threads({args.threads}); load average {os.getloadavg()[0]:.1f} at the end; "
            f"total {(time.perf_counter() - started) / 60:.1f} min; CPU allocator: {args.allocator} "
            f"(smoothness.allocator; both tools run in the same process).  ",
            f"Data: FashionMNIST, 10% training subset (seed 0); Hessian batch = its first {args.batch} images. "
            "Curvature in bn_mode=\"running\" (PyHessian's eval mode) except the memory section.  ",
            "**Timings on a shared, loaded machine are noisy; CPU time (one thread) is the steadier number.**", ""]
    if products:
        out += ["## Seconds per Hessian-vector product", "",
                "| model | state | product | wall s (median) | CPU s (median) | CPU / PyHessian | page faults "
                "(median) | setup |",
                "|---|---|---|---|---|---|---|---|"]
        out += [f"| {m} | {s} | {k} | {w:.3f} | {c:.3f} | {r:.2f} | {f:,.0f} | {setup} |"
                for m, s, k, w, c, r, f, setup in products]
        out.append("")
    if density:
        out += [f"## Density: {args.probes} probes × {args.steps} Lanczos steps, both tools", "",
                "W1 = Wasserstein-1 distance of the quadrature measure to the reference measure; "
                "relative = W1 / width of the reference spectrum. PASS needs ours' W1 <= PyHessian's + the "
                "reference's half-vs-half noise, and CPU time <= "
                f"{TARGET_TIME}× PyHessian's.", "",
                "| model | state | tool | wall s | CPU s | products | W1 | W1 / width | top node | wall / PyHessian | "
                "CPU / PyHessian |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for m, s, k, wall, cpu, n, w1, rel, top, rw, rc in density:
            f = (lambda v, fmt: "-" if v is None else format(v, fmt))
            out.append(f"| {m} | {s} | {k} | {f(wall, '.1f')} | {f(cpu, '.1f')} | {n} | {w1:.4f} | {rel:.2e} | "
                       f"{top:.3f} | {f(rw, '.2f')} | {f(rc, '.2f')} |")
        out.append("")
        verdicts = []
        for i in range(0, len(density), 3):
            ours, pyh, ref = density[i:i + 3]
            if ours[2].startswith("PyHessian"):
                ours, pyh = pyh, ours
            ok = ours[6] <= pyh[6] + ref[6] and ours[10] <= TARGET_TIME
            verdicts.append(f"{ours[0]} {ours[1]}: {'PASS' if ok else 'FAIL'} (CPU ratio {ours[10]:.2f}, "
                            f"W1 {ours[6]:.4f} vs {pyh[6]:.4f})")
        out += ["Verdicts: " + "; ".join(verdicts), ""]
    if memory:
        base = dict(memory)["one chunk"]["extra_kib"]
        out += [f"## Memory: top eigenvalue of the ConvNet at init (k=1, tol 1e-3, bn_mode=\"batch\")", "",
                "Peak RSS above the RSS just before the call (VmHWM after clear_refs), each in a fresh process.", "",
                "| data | samples | extra peak MiB | / one chunk | λ_max | products | seconds |",
                "|---|---|---|---|---|---|---|"]
        for mode, r in memory:
            label = {"one chunk": f"one batch of {args.batch}",
                     "chunks": f"{args.chunks} chunks of {args.batch} (a list)",
                     "one batch": f"one batch of {args.batch * args.chunks}"}[mode]
            out.append(f"| {label} | {r['batch_size']} | {r['extra_kib'] / 1024:.0f} | {r['extra_kib'] / base:.2f} | "
                       f"{r['value']:.4f} | {r['n_hvp']} | {r['seconds']:.0f} |")
        ratio = dict(memory)["chunks"]["extra_kib"] / base
        out += ["", f"Verdict: {'PASS' if ratio <= TARGET_MEMORY else 'FAIL'} (chunks / one chunk = {ratio:.2f}, "
                f"target <= {TARGET_MEMORY})", ""]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    ap.add_argument("--models", nargs="+", default=["convnet", "bn-convnet"])
    ap.add_argument("--states", nargs="+", default=["init", "1 epoch"], choices=["init", "1 epoch"])
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--chunks", type=int, default=6)
    ap.add_argument("--probes", type=int, default=2)
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--ref-probes", type=int, default=6)
    ap.add_argument("--ref-steps", type=int, default=150)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--allocator", choices=["tuned", "default"], default="tuned",
                    help="tuned: smoothness.allocator.tune_cpu_allocator(), as smoothness-lab does; default: glibc's")
    ap.add_argument("--memory-full", action="store_true", help="also one batch of batch × chunks images")
    ap.add_argument("--quick", action="store_true", help="small settings: a smoke run of every section")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.allocator == "tuned" and not tune_cpu_allocator():
        raise SystemExit("--allocator tuned: tune_cpu_allocator() did not apply (no glibc, or MALLOC_* set)")
    if args.memory_child:
        memory_child(args.memory_child, args.batch, args.chunks, args.threads)
        return
    if args.quick:
        args.batch, args.chunks, args.probes, args.steps = 200, 3, 1, 20
        args.ref_probes, args.ref_steps, args.repeats, args.states, args.models = 2, 40, 3, ["init"], ["convnet"]
    started = time.perf_counter()
    ds, batch = load_batches(args.batch)
    models = build_states(args.models, args.states, ds) if {"products", "density"} & set(args.sections) else {}
    products = section_products(models, batch, args.repeats) if "products" in args.sections else []
    density = (section_density(models, batch, args.probes, args.steps, args.ref_probes, args.ref_steps)
               if "density" in args.sections else [])
    memory = section_memory(args.batch, args.chunks, args.threads, args.memory_full) \
        if "memory" in args.sections else []
    text = render(args, products, density, memory, started)
    print(text)
    out = args.out or ROOT / "benchmarks" / "results" / ("density-quick.md" if args.quick else "density.md")
    out.write_text(text + "\n")
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
