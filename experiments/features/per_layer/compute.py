"""Per-layer curvature along training, in records.

With ``--per-layer`` a run measures, at every per-pass sharpness measurement and on the sharpness sample, the top
eigenvalue and the trace of each parameterised module's diagonal block of the Hessian and of the Gauss-Newton
matrix, and the whole Hessian's most negative eigenvalue: ``per_layer`` records, a function of the weights alone.

Details: docs/explanation/modules.md#per-layer-compute
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import smoothness

MATRICES = ("hessian", "ggn")
TOL = 1e-2            # Lanczos relative residual for the blocks' λ_max and the network's λ_min
MAX_ITER = 100        # product cap of one Lanczos run (λ_min converges slowest; unconverged is recorded)
PROBES = 20           # Hutchinson probes per block trace
PROBE_SEED = 0
WHOLE = "all"         # ``module`` of the whole-network record (λ_min)
NUMBERS = ("lambda_max", "trace", "trace_stderr", "lambda_min", "n_params", "samples", "n_hvp", "trace_probes")


def _type_label(module: nn.Module) -> str:
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv"
    if isinstance(module, nn.Linear):
        return "fc"
    return "bn" if "batchnorm" in type(module).__name__.lower() else "norm"


def blocks(model: nn.Module) -> Dict[str, List[str]]:
    """``{module name: [its trainable parameter names]}`` for every module that holds parameters of its own
    (conv, linear, BatchNorm), in ``named_modules()`` order."""
    out = {}
    for name, module in model.named_modules():
        own = [f"{name}.{p}" if name else p for p, t in module.named_parameters(recurse=False) if t.requires_grad]
        if own:
            out[name] = own
    return out


def layer_labels(model: nn.Module) -> Dict[str, str]:
    """``{module name: conv1 | conv2 | fc | bn1 | ...}``: each parameterised module's type and its position among
    the modules of that type; a single linear layer is ``fc`` (the ConvNets' classifier)."""
    modules = dict(model.named_modules())
    types = {name: _type_label(modules[name]) for name in blocks(model)}
    out, seen = {}, {}
    for name, kind in types.items():
        seen[kind] = seen.get(kind, 0) + 1
        out[name] = kind if kind == "fc" and list(types.values()).count("fc") == 1 else f"{kind}{seen[kind]}"
    return out


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(PROBE_SEED)


def block_traces(model: nn.Module, batch, loss_fn: Callable, matrix: str, modules: Dict[str, List[str]],
                 probes: int = PROBES) -> Dict[str, Tuple[float, float]]:
    """``{module: (trace, stderr)}``: Hutchinson estimates of tr(M_BB) for every block B at once, from ``probes``
    Rademacher vectors v over all parameters (generator seeded ``PROBE_SEED``): E[v_Bᵀ(Mv)_B] = tr(M_BB), since
    E[v_i v_j] = δ_ij. One product per probe serves every block, where probes of the block alone would cost one
    product per probe and block (a block product is a full product); the price is variance from the off-diagonal
    blocks M_B,rest, which the standard error includes."""
    gen = _generator()
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    samples: Dict[str, List[float]] = {m: [] for m in modules}
    with smoothness.curvature_operator(model, loss_fn, batch, kind=matrix, bn_mode="batch") as op:
        for _ in range(probes):
            v = {n: (torch.randint(0, 2, p.shape, generator=gen) * 2 - 1).to(p) for n, p in named.items()}
            mv = op.matvec(v)
            for module, names in modules.items():
                samples[module].append(sum(float(torch.sum(v[n] * mv[n])) for n in names))
    out = {}
    for module, values in samples.items():
        t = torch.tensor(values, dtype=torch.float64)
        out[module] = (float(t.mean()), float(t.std(unbiased=True)) / math.sqrt(probes))
    return out


def measure(model: nn.Module, batch, loss_fn: Callable = F.cross_entropy, *, tol: float = TOL,
            probes: int = PROBES) -> List[Dict]:
    """The per-layer records (without step/epoch) of ``model`` on ``batch``: one per (module, matrix), then the
    whole network's λ_min record (see the module docstring)."""
    labels, modules = layer_labels(model), blocks(model)
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    out = []
    for matrix in MATRICES:
        traces = block_traces(model, batch, loss_fn, matrix, modules, probes)
        for module, params in modules.items():
            eig = smoothness.top_eigenvalues(model, loss_fn, batch, k=1, tol=tol, max_iter=MAX_ITER,
                                             bn_mode="batch", kind=matrix, params=params, generator=_generator())
            trace, stderr = traces[module]
            out.append({"kind": "per_layer", "bn_mode": "batch", "module": module, "layer": labels[module],
                        "matrix": matrix, "n_params": sum(sizes[p] for p in params), "samples": eig.batch_size,
                        "lambda_max": eig.values[0], "converged": eig.converged, "n_hvp": eig.n_hvp,
                        "trace": trace, "trace_stderr": stderr, "trace_probes": probes})
    low = smoothness.top_eigenvalues(model, loss_fn, batch, k=1, tol=tol, max_iter=MAX_ITER, bn_mode="batch",
                                     generator=_generator(), which="smallest")
    out.append({"kind": "per_layer", "bn_mode": "batch", "module": WHOLE, "layer": WHOLE, "matrix": "hessian",
                "n_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                "samples": low.batch_size, "lambda_min": low.values[0], "converged": low.converged,
                "n_hvp": low.n_hvp})
    return out
