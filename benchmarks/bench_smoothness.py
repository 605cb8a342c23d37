"""Side-by-side cost and accuracy of the smoothness estimators against PyHessian, scipy's eigsh and plain passes.

Run from the repository root (needs the ``benchmark`` extra, i.e. ``pip install pyhessian``):

    python benchmarks/bench_smoothness.py            # the full run (see benchmarks/README.md for its cost)
    python benchmarks/bench_smoothness.py --quick    # a smoke run of every section, about a minute

Setting (all seeded): FashionMNIST, the 10% training subset drawn with seed 0 (6,000 images, the study's default
subset); the Hessian batch is the first ``--batch`` (1,000) images of that subset. Models: the seed ConvNet and
BN-ConvNet, built under ``torch.manual_seed(0)`` ("init") and after one epoch of plain SGD (lr 0.04, batch 32,
shuffled by a generator seeded with 0) over the 6,000 images ("1 epoch"). Curvature is measured with
``bn_mode="running"`` (eval-mode BatchNorm), because PyHessian puts the model in eval mode; line probes with
``bn_mode="batch"``, because the plain pass they are compared with is a train-mode pass.

Sections (``--sections``):
  top1     reference top 5 (top_eigenvalues k=5, tol=1e-10, checked by eigsh), then top_eigenvalues(k=1, tol=1e-3) vs
           PyHessian eigenvalues(top_n=1) vs scipy eigsh(k=1, which='LA', tol=1e-3): median wall time, CPU time,
           Hessian-vector products, relative error.
  top5     top_eigenvalues(k=5) vs PyHessian eigenvalues(top_n=5), errors against the reference top 5.
  probe    line_probe with K=8 step sizes vs K+1 plain forward+backward passes on the same batch (batch 32, --batch).
  memory   extra peak RSS of top_eigenvalues vs one plain forward+backward, each in a fresh subprocess.
  matched  (not run by default) PyHessian top_n=1 at tol 1e-4 and 1e-5: what its accuracy costs.

Timings are medians over ``--repeats`` runs with the tools interleaved (rotated order per repeat), all under
``torch.set_num_threads(--threads)``. On a shared machine they are noisy: rerun on a quiet one before quoting them.
"""
from __future__ import annotations

import argparse
import copy
import gc
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.sparse.linalg import LinearOperator, eigsh

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

import smoothness  # noqa: E402
from smoothness._objective import Objective  # noqa: E402
from smoothness.hvp import HessianOperator  # noqa: E402
from smoothness.lanczos import lanczos_top  # noqa: E402
from experiments.data import load_dataset  # noqa: E402
from experiments.models import build_model  # noqa: E402

TARGET_TOP1_TIME = 0.5     # ours / PyHessian wall time, k = 1
TARGET_TOP1_ERROR = 1e-3   # ours' relative error, k = 1
TARGET_TOP5_TIME = 0.3     # ours / PyHessian wall time, k = 5
TARGET_PROBE = 1.15        # line_probe / (K+1) plain passes
TARGET_MEMORY = 3.0        # extra peak RSS of top_eigenvalues / of one forward+backward
LR, TRAIN_BATCH, SUBSET, DATA_SEED = 0.04, 32, 0.1, 0
K_PROBE = 8
PROBE_STEPS = tuple(float(s) for s in np.linspace(0.5, 4.0, K_PROBE) * LR)  # the study's default probe grid
REF_TOL = 1e-10
EIGSH_CHECK_TOL = 1e-6     # float32 products: the true residual cannot go much below ~1e-7 relative
SECTIONS = ("top1", "top5", "probe", "memory", "matched")
DEFAULT_SECTIONS = ("top1", "top5", "probe", "memory")
MATCHED_TOLS = (1e-4, 1e-5)
OURS1 = "smoothness top_eigenvalues(k=1, tol=1e-3)"
PYH1 = "PyHessian eigenvalues(top_n=1)"
EIGSH1 = "scipy eigsh(k=1, 'LA', tol=1e-3) [1 run]"
OURS5 = "smoothness top_eigenvalues(k=5, tol=1e-3)"
PYH5 = "PyHessian eigenvalues(top_n=5)"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Setting: data, models, training

def load_batches(n_hessian: int):
    ds = load_dataset("fashion-mnist", subset=SUBSET, seed=DATA_SEED)
    return ds, (ds.x_train[:n_hessian], ds.y_train[:n_hessian])


def train_one_epoch(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    gen = torch.Generator().manual_seed(DATA_SEED)
    perm = torch.randperm(len(x), generator=gen)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    model.train()
    for i in range(0, len(x), TRAIN_BATCH):
        idx = perm[i:i + TRAIN_BATCH]
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)


def build_states(models: Sequence[str], states: Sequence[str], ds) -> Dict[tuple, torch.nn.Module]:
    out = {}
    for name in models:
        torch.manual_seed(0)
        model = build_model(name)
        if "init" in states:
            out[(name, "init")] = copy.deepcopy(model)
        if "1 epoch" in states:
            t = time.perf_counter()
            train_one_epoch(model, ds.x_train, ds.y_train)
            log(f"trained {name} for one epoch in {time.perf_counter() - t:.1f}s")
            out[(name, "1 epoch")] = model
    for model in out.values():
        model.train()  # the state a caller would hand over; every tool below must cope with it
    return out


# ----------------------------------------------------------------------------------------------------------------
# The tools, each a callable returning (values, number of Hessian-vector products)

_PYH_COUNT = [0]


def _install_pyhessian_counter():
    import pyhessian  # noqa: F401  (pyhessian/__init__ rebinds the name `pyhessian.hessian` to the class)
    module = sys.modules["pyhessian.hessian"]
    original = module.hessian_vector_product
    if getattr(original, "_counting", False):
        return module

    def counting(*args, **kwargs):
        _PYH_COUNT[0] += 1
        return original(*args, **kwargs)

    counting._counting = True
    module.hessian_vector_product = counting
    return module


def run_ours(model, batch, k: int, tol: float):
    r = smoothness.top_eigenvalues(model, F.cross_entropy, batch, k=k, tol=tol, bn_mode="running")
    return list(r.values), r.n_hvp, r


@dataclass
class Reference:
    values: List[float]          # top 5, descending
    n_hvp: int
    converged: bool
    oracle: Dict[int, int]       # k -> fewest products after which the top k Ritz values are all within 1e-3


def run_reference(model, batch, k: int = 5) -> Reference:
    """top_eigenvalues(k, tol=REF_TOL), run through the same Lanczos call but recording every product, so that the
    Ritz values after each step m (Rayleigh-Ritz on the first m vectors) can be compared with the converged ones:
    the fewest products any stopping rule could have used for 1e-3 on this (block) Krylov sequence."""
    op = HessianOperator(Objective(model, F.cross_entropy, batch, "running"))
    qs, hqs = [], []

    def matvec(q):
        hq = op.matvec(q)
        qs.append(q.double())
        hqs.append(hq.double())
        return hq

    out = lanczos_top(lambda rows: torch.stack([matvec(r) for r in rows]), op.n, k, tol=REF_TOL, dtype=op.dtype,
                      device=op.device, generator=torch.Generator().manual_seed(0))
    ref = [float(v) for v in out.values]
    q, hq = torch.stack(qs), torch.stack(hqs)
    oracle = {}
    for m in range(1, len(qs) + 1):
        t = q[:m] @ hq[:m].T
        ritz = torch.linalg.eigvalsh((t + t.T) / 2).flip(0).tolist()
        for kk in (1, k):
            if kk not in oracle and m >= kk and all(rel_err(a, b) <= TARGET_TOP1_ERROR for a, b in zip(ritz, ref[:kk])):
                oracle[kk] = m
    return Reference(ref, op.n_hvp, out.converged, oracle)


def run_pyhessian(model, batch, k: int, tol: float = 1e-3):
    module = _install_pyhessian_counter()
    was_training = model.training
    for p in model.parameters():   # PyHessian reads p.grad after its own backward: stale grads would be added
        p.grad = None
    torch.manual_seed(0)           # its start vectors come from the global generator
    _PYH_COUNT[0] = 0
    try:
        h = module.hessian(model, torch.nn.CrossEntropyLoss(), data=batch, cuda=False)
        values, _ = h.eigenvalues(top_n=k, tol=tol)  # its defaults: maxIter=100, tol=1e-3
        n = _PYH_COUNT[0]
        del h
    finally:
        for p in model.parameters():  # break the grad <-> graph cycle its backward(create_graph=True) leaves
            p.grad = None
        model.train(was_training)     # it leaves the model in eval mode
    return [float(v) for v in values], n, None


def run_eigsh(model, batch, k: int, tol: float, maxiter: Optional[int] = None):
    op = HessianOperator(Objective(model, F.cross_entropy, batch, "running"))

    def matvec(v):
        v = torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32).reshape(-1))
        return op.matvec(v).numpy().astype(np.float64)

    lin = LinearOperator((op.n, op.n), matvec=matvec, dtype=np.float64)
    v0 = np.random.default_rng(0).standard_normal(op.n)
    values = eigsh(lin, k=k, which="LA", tol=tol, v0=v0, maxiter=maxiter, return_eigenvectors=False)
    return sorted((float(v) for v in values), reverse=True), op.n_hvp, None


# ----------------------------------------------------------------------------------------------------------------
# Timing

@dataclass
class Timed:
    times: List[float] = field(default_factory=list)
    cpu: List[float] = field(default_factory=list)   # process CPU time: robust to other jobs when threads = 1
    values: Optional[list] = None
    n_hvp: Optional[int] = None
    extra: object = None

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu)

    def spread(self) -> str:
        return f"{min(self.times):.2f}-{max(self.times):.2f}"


def interleaved(tools: Dict[str, Callable[[], tuple]], repeats: int,
                only_once: Sequence[str] = (), warmup: bool = False) -> Dict[str, Timed]:
    """Run every tool `repeats` times (those in `only_once` in the first round only), rotating the order each round
    so that no tool always runs first; with `warmup`, once more each beforehand, untimed."""
    names = list(tools)
    out = {name: Timed() for name in names}
    if warmup:
        for name in names:
            tools[name]()
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            if r > 0 and name in only_once:
                continue
            gc.collect()
            c, t = time.process_time(), time.perf_counter()
            result = tools[name]()
            out[name].times.append(time.perf_counter() - t)
            out[name].cpu.append(time.process_time() - c)
            if result is not None:
                out[name].values, out[name].n_hvp, out[name].extra = result
    return out


def plain_passes(model, batch, n: int) -> None:
    """n plain forward+backward passes, the way a training step computes a gradient."""
    params = [p for p in model.parameters() if p.requires_grad]
    x, y = batch
    model.train()
    for _ in range(n):
        loss = F.cross_entropy(model(x), y)
        torch.autograd.grad(loss, params)


def probe(model, batch) -> None:
    smoothness.line_probe(model, F.cross_entropy, batch, PROBE_STEPS, bn_mode="batch")


def rel_err(value: float, ref: float) -> float:
    return abs(value - ref) / abs(ref)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


# ----------------------------------------------------------------------------------------------------------------
# Memory: each measurement in a fresh process

def _rss_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def memory_worker(op: str, model_name: str, state_file: str, n_batch: int, threads: int) -> None:
    """Print the extra peak RSS (KiB) of one `op` over the RSS just before it, after one warm-up plain pass."""
    torch.set_num_threads(threads)
    _, batch = load_batches(n_batch)
    model = build_model(model_name)
    model.load_state_dict(torch.load(state_file))
    state = copy.deepcopy(model.state_dict())
    plain_passes(model, batch, 1)                 # warm-up (loads kernels, touches code pages)
    model.load_state_dict(state)                  # the warm-up's train-mode pass moved BN running statistics
    gc.collect()
    try:                                          # reset the high-water mark to the current RSS (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        method = "VmHWM after clear_refs"
    except OSError:
        method = "ru_maxrss (not reset: includes the warm-up)"
    before = _rss_kib("VmRSS")
    if op == "top_eigenvalues":
        smoothness.top_eigenvalues(model, F.cross_entropy, batch, k=1, tol=1e-3, bn_mode="running")
    elif op == "forward_backward":
        plain_passes(model, batch, 1)
    else:
        raise ValueError(op)
    peak = _rss_kib("VmHWM") if method.startswith("VmHWM") else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"MEMORY {peak - before} {before} {peak} {method}")


def measure_memory(op: str, model_name: str, model, n_batch: int, threads: int) -> tuple:
    with tempfile.TemporaryDirectory() as tmp:
        state_file = os.path.join(tmp, "state.pt")
        torch.save(model.state_dict(), state_file)
        # a fixed mmap threshold makes glibc hand every large freed block back to the OS at once, so RSS follows the
        # live tensors (with the default dynamic threshold the warm-up's freed blocks stay in the heap and hide reuse)
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
        cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-worker", op, model_name, state_file,
               str(n_batch), str(threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(ROOT))
    for line in proc.stdout.splitlines():
        if line.startswith("MEMORY "):
            _, extra, before, peak, *method = line.split()
            return int(extra), int(before), int(peak), " ".join(method)
    raise RuntimeError(f"memory worker failed:\n{proc.stdout}\n{proc.stderr}")


# ----------------------------------------------------------------------------------------------------------------
# The benchmark

def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_err(e: float) -> str:
    return f"{e:.1e}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: batch 64, init state only, 1 repeat, no eigsh reference check")
    parser.add_argument("--models", nargs="+", default=["convnet", "bn-convnet"])
    parser.add_argument("--states", nargs="+", default=["init", "1 epoch"], choices=["init", "1 epoch"])
    parser.add_argument("--sections", nargs="+", default=list(DEFAULT_SECTIONS), choices=SECTIONS,
                        help="'matched' (not run by default, ~200 extra products per model and state) runs PyHessian "
                             f"top_n=1 at tol {', '.join(f'{t:g}' for t in MATCHED_TOLS)} to show what its accuracy "
                             "costs")
    parser.add_argument("--batch", type=int, default=1000, help="Hessian batch: the first N images of the subset")
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats (the median is reported)")
    parser.add_argument("--repeats-top5", type=int, default=1,
                        help="repeats for the top-5 section (PyHessian's top 5 costs ~100 products per run)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for every tool")
    parser.add_argument("--no-reference-check", action="store_true",
                        help="skip the independent check of the reference with scipy eigsh (k=5, tol=1e-6)")
    parser.add_argument("--out", type=Path, default=None,
                        help="markdown file for the tables (default benchmarks/results/smoothness.md, "
                             "or smoothness-quick.md with --quick)")
    parser.add_argument("--memory-worker", nargs=5, metavar=("OP", "MODEL", "STATE", "BATCH", "THREADS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.memory_worker:
        op, model_name, state_file, n_batch, threads = args.memory_worker
        memory_worker(op, model_name, state_file, int(n_batch), int(threads))
        return 0

    if args.quick:
        args.batch, args.repeats, args.states, args.no_reference_check = 64, 1, ["init"], True
    repeats5 = 1 if args.quick else args.repeats_top5
    out_path = args.out or ROOT / "benchmarks" / "results" / ("smoothness-quick.md" if args.quick else "smoothness.md")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    load_start = os.getloadavg()

    ds, batch = load_batches(args.batch)
    log(f"data: {ds.info['n_train']} training images from {ds.info['path']}; Hessian batch {args.batch}")
    models = build_states(args.models, args.states, ds)
    probe_batches = {32: (batch[0][:32], batch[1][:32]), args.batch: batch}

    rows: Dict[str, list] = {key: [] for key in ("ref", "top1", "matched", "top5", "probe", "memory", "targets")}

    def target(name, state, check, wall, cpu, products, limit):
        rows["targets"].append([name, state, check, f"{wall:.2f}", "-" if cpu is None else f"{cpu:.2f}",
                                "-" if products is None else f"{products:.2f}", f"<= {limit}", verdict(wall <= limit)])

    for (name, state), model in models.items():
        tag = f"{name} / {state}"
        ref, t_ours1 = None, None
        if {"top1", "top5", "matched"} & set(args.sections):
            t = time.perf_counter()
            ref = run_reference(model, batch)
            t_ref = time.perf_counter() - t
            check = "skipped"
            if not args.no_reference_check:
                t = time.perf_counter()
                chk_vals, chk_n, _ = run_eigsh(model, batch, 5, EIGSH_CHECK_TOL, maxiter=50)
                check = (f"max rel. diff {max(rel_err(a, b) for a, b in zip(chk_vals, ref.values)):.1e} "
                         f"({chk_n} HVPs, {time.perf_counter() - t:.0f}s)")
            rows["ref"].append([name, state, sum(p.numel() for p in model.parameters()),
                                ", ".join(f"{v:.5f}" for v in ref.values),
                                f"{ref.n_hvp} HVPs, {t_ref:.0f}s, converged={ref.converged}", check,
                                f"{ref.oracle.get(1, '-')} / {ref.oracle.get(5, '-')}"])
            log(f"{tag}: reference top 5 {['%.5f' % v for v in ref.values]} ({ref.n_hvp} HVPs, oracle "
                f"{ref.oracle}); eigsh check: {check}")

        if "top1" in args.sections:
            res = interleaved({
                OURS1: lambda: run_ours(model, batch, 1, 1e-3),
                PYH1: lambda: run_pyhessian(model, batch, 1),
                EIGSH1: lambda: run_eigsh(model, batch, 1, 1e-3),
            }, args.repeats, only_once=[EIGSH1])  # eigsh is here for its product count (the README's argument)
            pyh = res[PYH1]
            for tool, r in res.items():
                rows["top1"].append([name, state, tool, f"{r.median:.2f}", r.spread(), f"{r.cpu_median:.2f}",
                                     r.n_hvp, f"{r.values[0]:.5f}", fmt_err(rel_err(r.values[0], ref.values[0])),
                                     f"{r.median / pyh.median:.2f}"])
            ours = res[OURS1]
            t_ours1 = ours.median
            target(name, state, "top-1 time / PyHessian", ours.median / pyh.median, ours.cpu_median / pyh.cpu_median,
                   ours.n_hvp / pyh.n_hvp, TARGET_TOP1_TIME)
            err = rel_err(ours.values[0], ref.values[0])
            rows["targets"].append([name, state, "top-1 relative error", fmt_err(err), "-", "-",
                                    f"<= {TARGET_TOP1_ERROR:.0e}", verdict(err <= TARGET_TOP1_ERROR)])
            log(f"{tag}: top1 " + "; ".join(f"{k}: {v.median:.2f}s {v.n_hvp} HVPs" for k, v in res.items()))

        if "matched" in args.sections:
            for tol in MATCHED_TOLS:
                r = interleaved({"pyh": lambda: run_pyhessian(model, batch, 1, tol)}, 1)["pyh"]
                rows["matched"].append([name, state, f"PyHessian eigenvalues(top_n=1, tol={tol:g})",
                                        f"{r.median:.2f}", f"{r.cpu_median:.2f}", r.n_hvp, f"{r.values[0]:.5f}",
                                        fmt_err(rel_err(r.values[0], ref.values[0])),
                                        "-" if t_ours1 is None else f"{t_ours1 / r.median:.2f}"])
                log(f"{tag}: PyHessian tol {tol:g}: {r.median:.2f}s {r.n_hvp} HVPs")

        if "top5" in args.sections:
            res = interleaved({
                OURS5: lambda: run_ours(model, batch, 5, 1e-3),
                PYH5: lambda: run_pyhessian(model, batch, 5),
            }, repeats5)
            pyh = res[PYH5]
            for tool, r in res.items():
                vals = sorted(r.values, reverse=True)  # PyHessian returns them in the order found
                errs = [rel_err(v, rv) for v, rv in zip(vals, ref.values)]
                rows["top5"].append([name, state, tool, f"{r.median:.2f}", r.spread(), f"{r.cpu_median:.2f}",
                                     r.n_hvp, ", ".join(f"{v:.4f}" for v in vals), fmt_err(max(errs)),
                                     f"{r.median / pyh.median:.2f}"])
            ours = res[OURS5]
            target(name, state, "top-5 time / PyHessian", ours.median / pyh.median, ours.cpu_median / pyh.cpu_median,
                   ours.n_hvp / pyh.n_hvp, TARGET_TOP5_TIME)
            log(f"{tag}: top5 " + "; ".join(f"{k}: {v.median:.2f}s {v.n_hvp} HVPs" for k, v in res.items()))

        if "probe" in args.sections:
            plain_model = copy.deepcopy(model)  # plain train-mode passes move BN running statistics: keep them apart
            for bsz, pb in probe_batches.items():
                small = bsz <= 64
                res = interleaved({
                    "line_probe": lambda: probe(model, pb),
                    "plain": lambda: plain_passes(plain_model, pb, K_PROBE + 1),
                }, max(args.repeats, 5) if small else args.repeats, warmup=small)
                lp, pl = res["line_probe"], res["plain"]
                ratio = lp.median / pl.median
                rows["probe"].append([name, state, bsz, f"{lp.median:.3f}", lp.spread(), f"{pl.median:.3f}",
                                      pl.spread(), f"{ratio:.2f}", f"{lp.cpu_median / pl.cpu_median:.2f}",
                                      verdict(ratio <= TARGET_PROBE)])
                target(name, state, f"line_probe / {K_PROBE + 1} passes (batch {bsz})", ratio,
                       lp.cpu_median / pl.cpu_median, None, TARGET_PROBE)
                log(f"{tag}: probe batch {bsz}: ratio {ratio:.2f}")

        if "memory" in args.sections:
            fb = measure_memory("forward_backward", name, model, args.batch, args.threads)
            eig = measure_memory("top_eigenvalues", name, model, args.batch, args.threads)
            ratio = eig[0] / fb[0]
            rows["memory"].append([name, state, args.batch, f"{eig[0] / 1024:.0f}", f"{fb[0] / 1024:.0f}",
                                   f"{ratio:.2f}", f"{eig[1] / 1024:.0f} / {fb[1] / 1024:.0f}", eig[3]])
            target(name, state, "peak memory top_eigenvalues / forward+backward", ratio, None, None, TARGET_MEMORY)
            log(f"{tag}: memory eig {eig[0] / 1024:.0f} MiB, fb {fb[0] / 1024:.0f} MiB, ratio {ratio:.2f}")

    elapsed = time.perf_counter() - started
    load_end = os.getloadavg()
    command = " ".join(argv if argv is not None else sys.argv[1:])
    parts = [
        "# smoothness benchmark" + (" (--quick smoke run)" if args.quick else ""),
        "",
        f"Command: `python benchmarks/bench_smoothness.py {command}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"torch.set_num_threads({args.threads}) for every tool; load average {load_start[0]:.1f} at start, "
        f"{load_end[0]:.1f} at end; total {elapsed / 60:.1f} min.  ",
        f"Data: FashionMNIST, {SUBSET:.0%} training subset (seed {DATA_SEED}, {ds.info['n_train']} images); "
        f"Hessian/probe batch = its first {args.batch} images. \"1 epoch\" = plain SGD lr {LR}, batch "
        f"{TRAIN_BATCH}, over the {ds.info['n_train']} images. Curvature with bn_mode=\"running\" (PyHessian's eval "
        f"mode); line probes with bn_mode=\"batch\" (like the train-mode plain pass).  ",
        f"Times: median wall time over {args.repeats} interleaved repeats (top-5: {repeats5}), [min-max] beside "
        "it, and the median process CPU time. PASS/FAIL is judged on wall time. With one thread the CPU time is what "
        "a quiet machine's wall time would be; the product (HVP) ratio is free of noise, since a product costs the "
        "same in both tools.  ",
        "**Timings taken on a shared, loaded machine are noisy: the lead reruns this on a quiet one before quoting "
        "them.**",
    ]
    if rows["ref"]:
        parts += ["", f"## Reference eigenvalues (smoothness top_eigenvalues k=5, tol={REF_TOL:g}; "
                      f"checked with scipy eigsh k=5, which='LA', tol={EIGSH_CHECK_TOL:g})", "",
                  "Oracle: the fewest products after which our Lanczos sequence's top-1 / all top-5 Ritz values are "
                  f"within {TARGET_TOP1_ERROR:g} of the reference, i.e. what a perfect stopping rule would spend.",
                  "", markdown_table(["model", "state", "params", "top 5", "cost", "eigsh check",
                                      "oracle products top-1 / top-5"], rows["ref"])]
    if rows["top1"]:
        parts += ["", "## Top eigenvalue (λ_max), tol 1e-3", "",
                  markdown_table(["model", "state", "tool", "median s", "min-max s", "CPU s", "HVPs", "λ_max",
                                  "rel. error", "time / PyHessian"], rows["top1"])]
    if rows["matched"]:
        parts += ["", "## PyHessian at tighter tolerances (one run each; maxIter stays 100)", "",
                  markdown_table(["model", "state", "tool", "s", "CPU s", "HVPs", "λ_max", "rel. error",
                                  "ours (k=1, tol=1e-3) time / this"], rows["matched"])]
    if rows["top5"]:
        parts += ["", "## Top 5 eigenvalues, tol 1e-3 (PyHessian's values sorted; error = max over the five)", "",
                  markdown_table(["model", "state", "tool", "median s", "min-max s", "CPU s", "HVPs", "values",
                                  "max rel. error", "time / PyHessian"], rows["top5"])]
    if rows["probe"]:
        parts += ["", f"## line_probe (K={K_PROBE} step sizes) vs {K_PROBE + 1} plain forward+backward passes", "",
                  markdown_table(["model", "state", "batch", "line_probe s", "min-max", f"{K_PROBE + 1} passes s",
                                  "min-max", "ratio", "CPU ratio", f"≤ {TARGET_PROBE}"], rows["probe"])]
    if rows["memory"]:
        parts += ["", "## Peak memory (fresh subprocess each; extra RSS over the RSS just before the operation, "
                      "after data, model and one warm-up pass)", "",
                  markdown_table(["model", "state", "batch", "top_eigenvalues MiB", "forward+backward MiB", "ratio",
                                  "RSS before (eig / fb) MiB", "method"], rows["memory"])]
    if rows["targets"]:
        parts += ["", "## Targets", "",
                  markdown_table(["model", "state", "check", "measured (wall)", "CPU-time ratio", "product ratio",
                                  "target", "result"], rows["targets"])]
    report = "\n".join(parts) + "\n"
    print(report)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(report)
    log(f"wrote {out_path} ({elapsed / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
