"""Random numbers inside estimators: every evaluation of L(w; B) runs with torch's generators seeded with
:data:`ESTIMATOR_SEED` (the caller's states restored), and a determinism check (once per model and mode) refuses
randomness that seed cannot reach, and dropout applied through a function, with ``NondeterministicLossError``.
Details: docs/smoothness.md.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Callable, Collection, Iterable, Iterator, Mapping, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

#: The seed of torch's generators during every evaluation inside an estimator (documented in docs/METHODS.md).
ESTIMATOR_SEED = 0
#: Relative tolerance of the determinism check (curvlinops' default), on the loss and on the gradient's l2 norm: far
#: above the float32 rounding differences of nondeterministic GPU kernels (~1e-7), far below any random module's
#: effect (1e-2 and up).
DETERMINISM_RTOL = 1e-5

LossAndGrad = Tuple[torch.Tensor, Mapping[str, torch.Tensor]]
_CHECKED: "weakref.WeakKeyDictionary[nn.Module, set]" = weakref.WeakKeyDictionary()


class NondeterministicLossError(RuntimeError):
    """Two evaluations of L(w; B) and ∇L(w; B) at the same w differ: something draws random numbers that the
    estimators' fixed seed does not control, so every estimate would be noise."""


@contextlib.contextmanager
def fixed_rng(devices: Iterable[torch.device]) -> Iterator[None]:
    """Seed torch's CPU generator, and the default generator of each non-CPU device in ``devices``, with
    :data:`ESTIMATOR_SEED`; restore every one of them to its previous state on exit (also on error).

    Only the devices named are forked and seeded, so an unused GPU is neither initialised nor touched.
    """
    by_type: dict[str, set[int]] = {}
    for device in devices:
        device = torch.device(device)
        if device.type in ("cpu", "meta"):
            continue
        module = torch.get_device_module(device.type)
        index = device.index if device.index is not None else module.current_device()
        by_type.setdefault(device.type, set()).add(index)
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.random.fork_rng(devices=[]))  # the CPU generator
        for kind, indices in by_type.items():
            stack.enter_context(torch.random.fork_rng(devices=sorted(indices), device_type=kind))
        torch.default_generator.manual_seed(ESTIMATOR_SEED)
        for kind, indices in by_type.items():
            module = torch.get_device_module(kind)
            for index in indices:
                if kind == "cuda":
                    torch.cuda.default_generators[index].manual_seed(ESTIMATOR_SEED)
                else:  # other accelerators (mps, xpu): one device, seeded through the module
                    module.manual_seed(ESTIMATOR_SEED)
        yield


def _own_generators(model: nn.Module) -> list[str]:
    """Modules holding a torch.Generator of their own (which fixed_rng cannot seed), as 'name (Type)'."""
    return [f"{name or '<root>'} ({type(m).__name__})" for name, m in model.named_modules()
            if any(isinstance(v, torch.Generator) for v in vars(m).values())]


# Random dropout through these functions is invisible to estimator_mode, which can only switch nn.Dropout modules off
_DROPOUT_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
                      torch.dropout, torch.alpha_dropout, torch.feature_dropout, torch.feature_alpha_dropout}


class _DropoutWatch(TorchFunctionMode):
    """Counts calls of the dropout functions that drop (training=True, p > 0) while it is active."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _DROPOUT_FUNCTIONS:
            p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
            training = kwargs.get("training", kwargs.get("train", args[2] if len(args) > 2 else True))
            self.calls += bool(training) and float(p) > 0
        return func(*args, **kwargs)


def _check_key(model: nn.Module, bn_mode: str, devices: Collection[torch.device]) -> tuple:
    """What the check's verdict depends on: the mode, where and in which precision the model runs, and the module
    tree, including any generator a module holds (a module swapped or given a generator is checked again)."""
    modules = tuple((name, type(m).__name__, id(m),
                     *(id(v) for v in vars(m).values() if isinstance(v, torch.Generator)))
                    for name, m in model.named_modules())
    dtypes = tuple(sorted({str(p.dtype) for p in model.parameters()}))
    return bn_mode, tuple(sorted(str(d) for d in devices)), dtypes, modules


def is_checked(model: nn.Module, bn_mode: str, devices: Collection[torch.device]) -> bool:
    """Whether ``model`` in this mode, on these devices, with these modules has passed the determinism check."""
    return _check_key(model, bn_mode, devices) in _CHECKED.get(model, ())


def check_deterministic(model: nn.Module, bn_mode: str, devices: Collection[torch.device], first: LossAndGrad,
                        again: Callable[[], LossAndGrad]) -> None:
    """Compare ``first`` = (L(w), ∇L(w)) with a second evaluation ``again()`` at the same w, unless this model has
    passed already (see :func:`is_checked`); raise NondeterministicLossError naming the cause if they differ by more
    than DETERMINISM_RTOL relative, in the loss or in the gradient's l2 norm."""
    key = _check_key(model, bn_mode, devices)
    if key in _CHECKED.get(model, ()):
        return
    with _DropoutWatch() as watch:
        (l1, g1), (l2, g2) = first, again()
    if watch.calls:
        raise NondeterministicLossError(
            f"the model applies dropout through a function (e.g. F.dropout(h, p, training=self.training)) in "
            f"bn_mode={bn_mode!r}, so the loss depends on one random mask; estimators switch off only nn.Dropout "
            f"modules: use nn.Dropout layers instead (or bn_mode='running', where training is False)")
    l1, l2 = float(l1), float(l2)
    grad_gap = float(torch.sqrt(sum(torch.sum((g1[n].double() - g2[n].double()) ** 2) for n in g1)))
    grad_size = max(float(torch.sqrt(sum(torch.sum(g.double() ** 2) for g in gs.values()))) for gs in (g1, g2))
    # "not >" lets a NaN gradient pass: it is identical in both evaluations, and not this check's business
    if not (abs(l1 - l2) > DETERMINISM_RTOL * max(abs(l1), abs(l2)) or grad_gap > DETERMINISM_RTOL * grad_size):
        _CHECKED.setdefault(model, set()).add(key)
        return
    own = _own_generators(model)
    cause = ("; ".join(f"{m} draws from its own torch.Generator" for m in own) if own else
             "a module draws from a source torch's global generators do not cover (its own torch.Generator, numpy "
             "or Python's random), or a kernel is nondeterministic far above rounding level")
    raise NondeterministicLossError(
        f"the loss is not a deterministic function of the weights (bn_mode={bn_mode!r}): two evaluations at the "
        f"same w gave loss {l1!r} and {l2!r}, gradients {grad_gap / max(grad_size, 1e-300):.3g} apart (relative; "
        f"tolerance {DETERMINISM_RTOL:g}). Estimators seed torch's global CPU/CUDA generators with {ESTIMATOR_SEED} "
        f"for every evaluation, so the randomness comes from elsewhere: {cause}. Make that module draw from torch's "
        f"global generator (or not at all in this mode), or estimate with bn_mode='running' if it is random only in "
        f"training mode.")
