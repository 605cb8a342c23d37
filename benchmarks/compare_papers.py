"""The generalisation measures of ``smoothness`` against the papers' own code, on one small deterministic case
(issue 24: "check each measure ... against the papers' code on one small case where it runs").

    git clone https://github.com/tml-epfl/sharpness-vs-generalization /tmp/papers/sam      # Andriushchenko 2023
    git clone https://github.com/nitarshan/robust-generalization-measures /tmp/papers/rgm  # Jiang et al.-style
    PAPERS_SAM_REPO=/tmp/papers/sam PAPERS_RGM_REPO=/tmp/papers/rgm \\
        python benchmarks/compare_papers.py [--out benchmarks/results/papers-run.md]          # ~1-2 min, one thread

Nothing of those repositories is copied here: their modules are imported from the checkouts at run time
(``sharpness.py`` + ``utils.py`` of the first at commit 6d73be9; ``data/generation/{measures,models,
experiment_config}.py`` of the second at commit 8e90129). Their CUDA hard-wiring (``.cuda()`` on every batch and
perturbation) is replaced by the identity for the duration of each call (``_no_cuda``), and float64 is made the
default dtype so that the tensors they create (``torch.ones`` input of the path norm, ``torch.normal`` noise) match
the float64 models. Anything they would write to stdout is captured.

The case (deterministic, CPU, float64, one thread): the first 256 FashionMNIST training images (or, without the
dataset, 256 fixed random images labelled by a random teacher), scaled to [0, 1];

- an MLP 784-32-10 (ReLU), 150 steps of full-batch SGD (lr 0.1, momentum 0.9) from seed 0: worst-case and
  average-case sharpness, ours vs ``sharpness.eval_APGD_sharpness`` / ``eval_average_sharpness``;
- their own NiN (depth 1, base width 8, BatchNorm after every conv, global average pooling; built from their
  ``models.NiN``), 300 steps of full-batch SGD (lr 0.05, momentum 0.9) in train mode, then eval mode: path norm,
  spectral product, distance to init via their ``get_all_measures`` (which needs an all-conv network with
  ``dataset_type.D``: its FFT spectral norm rejects 2-D Linear weights), PAC-Bayes σ via their ``_pacbayes_sigma``.

The verdicts and the conventions behind each difference are in benchmarks/results/papers.md.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gzip
import importlib
import io
import math
import os
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import smoothness  # noqa: E402

N_IMAGES = 256
FASHION_DIRS = [os.environ.get("SMOOTHNESS_DATA", ""), str(ROOT / "data"), "/usr/share/datasets/fashion-mnist"]


# ---------------------------------------------------------------------------------------------------- the papers' code

def _repo(var: str, probe: str, url: str) -> Path:
    path = os.environ.get(var)
    if not path:
        sys.exit(f"compare_papers: set {var} to a local checkout of {url} (git clone {url} DIR; {var}=DIR). "
                 f"This script imports that code at run time; it is not shipped here.")
    repo = Path(path)
    if not (repo / probe).is_file():
        sys.exit(f"compare_papers: {var}={path} has no {probe}: it should be a checkout of {url}")
    return repo


def load_sam(repo: Path):
    """Andriushchenko et al.'s ``sharpness.py`` (which does ``import utils``) as module ``sam_sharpness``."""
    sys.path.insert(0, str(repo))
    try:
        saved = sys.modules.pop("utils", None)
        module = importlib.import_module("sharpness")
        sys.modules["sam_sharpness"] = sys.modules.pop("sharpness")
        sys.modules["sam_utils"] = sys.modules.pop("utils")
        if saved is not None:
            sys.modules["utils"] = saved
    finally:
        sys.path.remove(str(repo))
    return module


def load_rgm(repo: Path):
    """``data/generation`` of robust-generalization-measures as package ``rgm_generation`` (it has no __init__.py
    and uses relative imports; a fresh package name avoids the clash with the other repository's ``data.py``)."""
    pkg = types.ModuleType("rgm_generation")
    pkg.__path__ = [str(repo / "data" / "generation")]
    sys.modules["rgm_generation"] = pkg
    return (importlib.import_module("rgm_generation.measures"), importlib.import_module("rgm_generation.models"),
            importlib.import_module("rgm_generation.experiment_config"))


@contextlib.contextmanager
def _no_cuda():
    """Their ``x.cuda()`` / ``torch.zeros_like(p).cuda()`` become the identity (CPU run), stdout is captured."""
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield buffer
    finally:
        torch.Tensor.cuda = original


# ------------------------------------------------------------------------------------------------------------ the case

def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load_images():
    for d in FASHION_DIRS:
        if not d:
            continue
        for base in (Path(d), Path(d) / "FashionMNIST" / "raw"):
            img, lab = base / "train-images-idx3-ubyte.gz", base / "train-labels-idx1-ubyte.gz"
            if img.is_file() and lab.is_file():
                x = torch.tensor(_read_idx(img)[:N_IMAGES].copy(), dtype=torch.float64).div_(255).unsqueeze(1)
                y = torch.tensor(_read_idx(lab)[:N_IMAGES].copy(), dtype=torch.long)
                return x, y, f"FashionMNIST, first {N_IMAGES} training images ({base})"
    g = torch.Generator().manual_seed(0)
    x = torch.rand(N_IMAGES, 1, 28, 28, generator=g, dtype=torch.float64)
    teacher = torch.randn(784, 10, generator=g, dtype=torch.float64)
    y = (x.flatten(1) @ teacher).argmax(1)
    return x, y, f"{N_IMAGES} random images in [0,1], labels of a random linear teacher (FashionMNIST not found)"


def train(model, x, y, steps=150, lr=0.1):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    return model


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10)).double()


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).double().mean())


def zero_one(logits, y):
    """The 0-1 error as a "loss" for our PAC-Bayes search (0·Σlogits gives it a graph for the base evaluation)."""
    return (logits.argmax(1) != y).to(logits.dtype).mean() + 0 * logits.sum()


# ------------------------------------------------------------------------------------------------------- comparisons

def compare_sharpness(sam, model, x, y, rows, rhos, n_avg):
    loss_f = lambda logits, t: F.cross_entropy(logits, t, reduction="mean")  # eval_sharpness.py's loss_f
    batches = [(x, None, y, None, None)]                                       # their loaders yield 5-tuples
    for adaptive, norm, rho in rhos:
        ours = smoothness.worst_case_sharpness(model, F.cross_entropy, (x, y), rho=rho, adaptive=adaptive,
                                               norm=2 if norm == "l2" else math.inf, n_steps=20)
        t0 = time.perf_counter()
        with _no_cuda() as out:
            obj, _, delta_norm = sam.eval_APGD_sharpness(model, batches, loss_f, None, None, rho=rho, n_iters=20,
                                                         rand_init=False, adaptive=adaptive, norm=norm)
        t = time.perf_counter() - t0
        reductions = out.getvalue().count("Reducing step size")
        rel = (ours.value - obj) / max(abs(obj), 1e-300)
        longer = smoothness.worst_case_sharpness(model, F.cross_entropy, (x, y), rho=rho, adaptive=adaptive,
                                                 norm=2 if norm == "l2" else math.inf, n_steps=100).value
        with _no_cuda():
            obj_longer = sam.eval_APGD_sharpness(model, batches, loss_f, None, None, rho=rho, n_iters=100,
                                                 rand_init=False, adaptive=adaptive, norm=norm)[0]
        rows.append(("worst-case", f"{'adaptive' if adaptive else 'plain'} {norm}", rho, ours.value, obj,
                     f"ours {'higher' if ours.value > obj else 'lower'} by {abs(rel):.1e} (relative; their APGD: "
                     f"{reductions} step halvings, {t:.1f} s); 100 steps: ours {longer:.6g}, "
                     f"theirs {obj_longer:.6g}"))
    for adaptive, rho in ((True, rhos[0][2] * 2), (False, 0.01)):
        ours = smoothness.average_case_sharpness(model, F.cross_entropy, (x, y), rho=rho, adaptive=adaptive,
                                                 n_samples=n_avg, generator=torch.Generator().manual_seed(1))
        seen = []

        def recording(logits, t):
            value = loss_f(logits, t)
            seen.append(float(value))
            return value

        torch.manual_seed(2)  # their noise comes from the global generator
        with _no_cuda():
            obj, _, _, _ = sam.eval_average_sharpness(model, batches, recording, n_iters=n_avg, rho=rho,
                                                      adaptive=adaptive, norm="l2")
        samples = np.array(seen[1:]) - seen[0]                                 # first call: the unperturbed loss
        se_theirs = samples.std(ddof=1) / math.sqrt(len(samples))
        z = (ours.value - obj) / math.hypot(ours.stderr, se_theirs)
        rows.append(("average-case", f"{'adaptive' if adaptive else 'plain'} l2 (Gaussian)", rho,
                     f"{ours.value:.5g} ± {ours.stderr:.2g}", f"{obj:.5g} ± {se_theirs:.2g}",
                     f"difference {z:+.2f} combined standard errors ({n_avg} samples each)"))


def compare_rgm(measures, models, config, x, y, rows, seeds):
    dataset_type = types.SimpleNamespace(D=(1, 28, 28), K=10)
    torch.manual_seed(0)
    model = models.NiN(depth=1, width=1, base_width=8, dataset_type=dataset_type).double()
    init = copy.deepcopy(model)
    train(model, x, y, steps=300, lr=0.05)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=N_IMAGES, shuffle=False)
    acc = accuracy(model, x, y)
    m = N_IMAGES
    with _no_cuda():
        theirs = measures.get_all_measures(model, init, loader, acc, seed=0)
    CT = config.ComplexityType
    folded, folded_init = measures._reparam(model).eval(), measures._reparam(init).eval()

    # path norm: theirs is the adjusted sqrt(value/m) of the raw sum (measures.py adjust_measure)
    raw_path = theirs[CT.PATH_NORM] ** 2 * m
    ours_path = smoothness.path_norm(model, (1, 28, 28))
    ours_path_folded = smoothness.path_norm(folded, (1, 28, 28))
    rows.append(("path norm (Σ_paths Πw²)", "BN model; theirs folds BN first", "-", ours_path.squared, raw_path,
                 f"relative difference {ours_path.squared / raw_path - 1:.1e}; ours on their folded model "
                 f"{ours_path_folded.squared:.10g} ({ours_path_folded.squared / raw_path - 1:.1e})"))

    # log product of spectral norms: theirs Σ log ‖W‖² over conv weights of the BN-folded model
    raw_spec = 2 * theirs[CT.LOG_PROD_OF_SPEC] + math.log(m)
    ours_spec_folded = smoothness.spectral_product(folded)
    ours_spec = smoothness.spectral_product(model)
    rows.append(("log spectral product", "theirs Σ log‖W‖² (= 2·our log_value)", "-",
                 2 * ours_spec_folded.log_value, raw_spec,
                 f"on the BN-folded model: difference {2 * ours_spec_folded.log_value - raw_spec:.1e}; on the model "
                 f"with BN (BN scale not included, our convention) 2·log_value = {2 * ours_spec.log_value:.6g}"))

    # distance to init: theirs ‖w − w0‖ over weights only (no biases, no BN), after folding BN into both
    raw_dist = theirs[CT.L2_DIST] ** 2 * m
    ours_dist = smoothness.distance_to_init(model, init.state_dict()).value
    ours_dist_folded = smoothness.distance_to_init(folded, folded_init.state_dict()).value
    bias_sq = sum(float(((p.detach() - q.detach()) ** 2).sum()) for (n, p), (_, q) in
                  zip(folded.named_parameters(), folded_init.named_parameters()) if "bias" in n or "bn" in n)
    weights_only = math.sqrt(max(ours_dist_folded ** 2 - bias_sq, 0.0))
    rows.append(("distance to init", "theirs: BN-folded conv weights only", "-", ours_dist, raw_dist,
                 f"ours on the folded model {ours_dist_folded:.8g}; minus its bias/BN terms {weights_only:.10g} "
                 f"(vs theirs: {weights_only / raw_dist - 1:.1e})"))

    # PAC-Bayes σ. Theirs: linear bisection of σ on [0, 2] until |acc(w+u) − acc| is within 0.01 of 0.1, 10 fresh
    # draws per σ, noise torch.normal(0, σ**2) i.e. standard deviation σ² (measures.py l.49). Ours: the largest
    # σ (a standard deviation) with mean 0-1 error increase <= 0.1, on their folded model.
    check = torch.Generator().manual_seed(123)
    objective_draws = 200

    def drop(std, magnitude=None):
        """Mean accuracy drop (with its standard error) under noise of standard deviation ``std`` (or ``magnitude(w)``
        per weight), over ``objective_draws`` fresh draws: an independent check of where each search stopped."""
        values = []
        base = dict(folded.named_parameters())
        for _ in range(objective_draws):
            shifted = {n: w + (std if magnitude is None else magnitude(w)) *
                       torch.randn(w.shape, generator=check, dtype=w.dtype) for n, w in base.items()}
            with torch.no_grad():
                logits = torch.func.functional_call(folded, shifted, (x,))
            values.append(acc - float((logits.argmax(1) == y).double().mean()))
        return float(np.mean(values)), float(np.std(values, ddof=1) / math.sqrt(len(values)))

    ours = smoothness.pacbayes_flatness(folded, zero_one, (x, y), generator=torch.Generator().manual_seed(0),
                                        target=0.1, n_samples=16, bn_mode="running")
    d_ours = drop(ours.sigma)
    theirs_std = []
    for seed in seeds:
        with _no_cuda(), torch.no_grad():  # get_all_measures, its only caller, runs under no_grad
            s = measures._pacbayes_sigma(folded, loader, acc, seed)
        d = drop(s ** 2)
        theirs_std.append(s ** 2)
        rows.append(("PAC-Bayes σ (noise std)", f"seed {seed}; theirs: σ_their² is the std", "-", ours.sigma, s ** 2,
                     f"ratio {ours.sigma / s ** 2:.3f}; accuracy drop ({objective_draws} draws) at ours "
                     f"{d_ours[0]:.4f} ± {d_ours[1]:.4f}, at theirs {d[0]:.4f} ± {d[1]:.4f}"))
    precise = smoothness.pacbayes_flatness(folded, zero_one, (x, y), generator=torch.Generator().manual_seed(0),
                                           target=0.1, n_samples=objective_draws, bn_mode="running")
    d = drop(precise.sigma)
    rows.append(("PAC-Bayes σ (noise std)", f"ours with {objective_draws} draws (reference)", "-", precise.sigma,
                 "-", f"accuracy drop there {d[0]:.4f} ± {d[1]:.4f}; their σ_their² above / this: "
                 + ", ".join(f"{v / precise.sigma:.3f}" for v in theirs_std)
                 + f"; ours (16 draws) / this: {ours.sigma / precise.sigma:.3f}"))
    mag = smoothness.pacbayes_mag_flatness(folded, zero_one, (x, y), generator=torch.Generator().manual_seed(0),
                                           target=0.1, eps=1e-3, n_samples=16, bn_mode="running")
    with _no_cuda(), torch.no_grad():
        s = measures._pacbayes_sigma(folded, loader, acc, seeds[0], magnitude_eps=1e-3)
    d_ours = drop(None, lambda w: torch.sqrt(mag.sigma ** 2 * w ** 2 + 1e-6))
    d = drop(None, lambda w: s ** 2 * w ** 2 + 1e-6)
    rows.append(("PAC-Bayes mag σ", f"seed {seeds[0]}; ours std √(σ²w²+ε²), theirs σ²w²+ε²", "-",
                 mag.sigma, s,
                 f"different noise families (not comparable as numbers); accuracy drop at ours {d_ours[0]:.4f} ± "
                 f"{d_ours[1]:.4f}, at theirs {d[0]:.4f} ± {d[1]:.4f}"))
    return acc, theirs


def _fmt(v):
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="also write the table as markdown to this file")
    parser.add_argument("--avg-samples", type=int, default=200)
    args = parser.parse_args(argv)
    sam_repo = _repo("PAPERS_SAM_REPO", "sharpness.py", "https://github.com/tml-epfl/sharpness-vs-generalization")
    rgm_repo = _repo("PAPERS_RGM_REPO", "data/generation/measures.py",
                     "https://github.com/nitarshan/robust-generalization-measures")
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    sam = load_sam(sam_repo)
    measures, models, config = load_rgm(rgm_repo)
    x, y, source = load_images()
    t0 = time.perf_counter()
    net = train(mlp(), x, y)
    with torch.no_grad():
        net_loss = float(F.cross_entropy(net(x), y))
    rows = []
    compare_sharpness(sam, net, x, y, rows,
                      [(True, "l2", 0.05), (True, "l2", 0.2), (True, "linf", 0.002), (True, "linf", 0.01),
                       (False, "l2", 0.05)], args.avg_samples)
    acc_nin, _ = compare_rgm(measures, models, config, x, y, rows, seeds=(0, 1, 2))
    lines = [f"data: {source}; MLP train loss {net_loss:.4f}, accuracy "
             f"{accuracy(net, x, y):.4f}; NiN accuracy {acc_nin:.4f}; {time.perf_counter() - t0:.0f} s",
             "", "| measure | setting | ρ | ours | theirs | note |", "|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
