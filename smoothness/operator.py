"""Curvature matrices as linear operators: the Hessian, the GGN and the empirical Fisher, whole or a diagonal block
(``params``), over one process or a ``torch.distributed`` group; :func:`curvature_operator` exposes one (products on
dicts, a scipy LinearOperator), :class:`Curvature` resolves what every curvature estimator works on. An operator
describes the weights it was built on: products after any change of them raise. Details: docs/smoothness.md.
"""
from __future__ import annotations

from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ._objective import ChunkedObjective, Params, make_objective
from .distributed import DistributedOperator
from .fisher import ChunkedEmpiricalFisherOperator, EmpiricalFisherOperator, check_per_sample
from .ggn import ChunkedGGNOperator, GGNOperator
from .hvp import FlatOperator, hessian_operator

KINDS = ("hessian", "ggn", "empirical-fisher")


class _Default(str):
    """A default argument value that :class:`Curvature` can tell from the same value passed explicitly: the
    operator's own kind and bn_mode win over a default, and conflict with an explicit value."""


DEFAULT_KIND, DEFAULT_BN_MODE = _Default("hessian"), _Default("batch")


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}: use 'hessian' (∇²L), 'ggn' (generalised Gauss-Newton, the Fisher "
                         f"for cross-entropy) or 'empirical-fisher' (mean of per-sample gradient outer products)")
    return kind


def _names_of(model: nn.Module, params: Sequence) -> list:
    """Parameter names for ``params``; a tensor in it (``list(model.parameters())``, say) stands for its own name."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    names = []
    for i, item in enumerate(params):
        if isinstance(item, torch.Tensor):
            if id(item) not in by_id:
                raise ValueError(f"params[{i}] is a tensor of shape {tuple(item.shape)} that is not a parameter of "
                                 f"the model; give parameter names (e.g. {list(by_id.values())[:2]}) or the model's "
                                 f"own parameters")
            names.append(by_id[id(item)])
        elif isinstance(item, str):
            names.append(item)
        else:
            raise TypeError(f"params[{i}] is a {type(item).__name__}; give parameter names (strings) or the model's "
                            f"parameters")
    return names


def resolve_params(objective, params: Optional[Sequence[str]]) -> Optional[Tuple[str, ...]]:
    """``params`` as a tuple of trainable parameter names in ``named_parameters()`` order (None: all of them); the
    model's parameters themselves may stand for their names."""
    if params is None:
        return None
    if isinstance(params, str) or not isinstance(params, (list, tuple)):
        raise TypeError(f"params must be a list of parameter names (e.g. ['head.weight', 'head.bias']) or None, got "
                        f"{type(params).__name__}" + (f" {params!r}: wrap it in a list" if isinstance(params, str)
                                                      else ""))
    if not params:
        raise ValueError("params is empty: give at least one parameter name, or None for all trainable parameters")
    params = _names_of(objective.model, params)
    unknown = [n for n in params if n not in objective.params]
    if unknown:
        frozen = [n for n in unknown if n in dict(objective.model.named_parameters())]
        raise ValueError(f"unknown parameter names {unknown}" + (f" ({frozen} have requires_grad=False)" if frozen
                                                                 else "")
                         + f"; valid names (the trainable parameters) are {list(objective.names)}")
    if len(set(params)) != len(params):
        raise ValueError(f"params names a parameter twice: {list(params)}")
    return tuple(n for n in objective.names if n in set(params))


def block_dimension(objective, names: Optional[Tuple[str, ...]]) -> int:
    """The dimension n of the operator on the block ``names`` (all trainable parameters for None)."""
    return objective.n_params if names is None else sum(objective.base[n].numel() for n in names)


class BlockOperator(FlatOperator):
    """M_BB: the diagonal block of ``inner`` on the parameters ``names``; products M·(v_B, 0) restricted to B."""

    def __init__(self, inner, names: Tuple[str, ...]):
        super().__init__(inner.objective)
        self.inner, self.names = inner, names
        base = inner.objective.base
        self.shapes = [base[n].shape for n in names]
        self.numels = [base[n].numel() for n in names]
        self.n = sum(self.numels)
        self.loss = inner.loss
        self.n_samples = getattr(inner, "n_samples", None)
        self.product = inner.product

    @property
    def gradient(self) -> Params:
        return {n: self.inner.gradient[n] for n in self.names}

    def matvec_dict(self, vector: Mapping[str, torch.Tensor]) -> Params:
        self.n_hvp += 1
        full = {n: (vector[n] if n in vector else torch.zeros_like(t)) for n, t in self.objective.base.items()}
        out = self.inner.matvec_dict(full)
        return {n: out[n] for n in self.names}


def curvature_matrix(objective, kind: str = "hessian", params: Optional[Tuple[str, ...]] = None, group=None,
                     products: int = 0):
    """The flat operator (``matvec``, ``matvec_dict``, ``flatten``, ``n``, ``loss``, ``gradient``, ``n_hvp``,
    ``n_samples``) of ``kind`` on the block ``params`` (resolved by :func:`resolve_params`) over ``objective``,
    combined over ``group``'s ranks. ``products``: the expected number of products (see ``hessian_operator``).
    With the defaults this is ``hessian_operator(objective, products=products)``."""
    check_kind(kind)
    chunked = isinstance(objective, ChunkedObjective)
    if kind == "hessian":
        op = hessian_operator(objective, products=products)
    elif kind == "ggn":
        op = ChunkedGGNOperator(objective) if chunked else GGNOperator(objective)
    else:
        check_per_sample(objective.model, objective.bn_mode)
        op = ChunkedEmpiricalFisherOperator(objective) if chunked else EmpiricalFisherOperator(objective)
    op.n_samples = objective.n_samples
    if group is not None:
        op = DistributedOperator(op, objective.n_samples, group)
    if params is not None and params != objective.names:
        op = BlockOperator(op, params)
    return op


# Every _STRIDE-th entry of each parameter (and its last) is compared before each product, with the storage address
# and autograd's version counter: a prime stride does not align with rows or channels.
_STRIDE = 61


def _fingerprint(p: torch.Tensor) -> tuple:
    """What a product compares to notice a change of ``p``: writes through autograd move ``_version``, writes
    through ``p.data`` (which bypass it: ``p.data.mul_(2)``, an optimizer's ``p.data.add_``) change the sampled
    entries, a replaced ``p.data`` the address."""
    flat = p.detach().reshape(-1)
    return p.data_ptr(), p._version, torch.cat([flat[::_STRIDE], flat[-1:]]).clone()


def _same(a: tuple, b: tuple) -> bool:
    """Equal fingerprints, NaN equal to NaN (weights may hold NaNs)."""
    (pa, va, ta), (pb, vb, tb) = a, b
    return pa == pb and va == vb and (torch.equal(ta, tb) or bool(torch.all((ta == tb) | (ta.isnan() & tb.isnan()))))


class CurvatureOperator:
    """A curvature matrix M (``kind``) on a parameter block, as products on dicts and as a scipy LinearOperator.

    Build it with :func:`curvature_operator`; see the module docstring for its lifetime.
    """

    def __init__(self, op, objective, kind: str, params: Optional[Tuple[str, ...]], bn_mode: str):
        self._op, self._objective = op, objective
        self.kind, self.params, self.bn_mode = kind, params, bn_mode
        self.product: str = op.product   # how a product is computed ("double-backward", "linearize", ...)
        self.names: Tuple[str, ...] = tuple(op.names)  # the keys of vectors, in flattening order
        self.shape = (op.n, op.n)
        self.batch_size: int = op.n_samples
        self.loss: float = op.loss
        # compared before every product (see _fingerprint): a product after a change would mix old and new weights
        self._weights = {n: _fingerprint(p) for n, p in objective.params.items()}
        self._closed = False

    def _changed(self) -> list:
        return [n for n, p in self._objective.params.items() if not _same(_fingerprint(p), self._weights[n])]

    def _check_alive(self) -> None:
        if self._closed:
            raise RuntimeError("this CurvatureOperator is closed (it was used as a context manager, or close() was "
                               "called); build a new one with smoothness.curvature_operator")
        changed = self._changed()
        if changed:
            raise RuntimeError(f"the model's parameters {changed} were changed in place since this operator was "
                               f"built; it describes the old weights: build a new one with "
                               f"smoothness.curvature_operator")

    @property
    def n_products(self) -> int:
        return self._op.n_hvp

    def matvec(self, direction: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """M·v for v a dict keyed like ``dict(model.named_parameters())`` restricted to ``params``."""
        self._check_alive()
        v = self._objective.check_direction(direction, "direction", allow_zero=True, names=self.names)
        return self._op.matvec_dict(v)

    def _flat_matvec(self, x: np.ndarray) -> np.ndarray:
        self._check_alive()
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        v = torch.as_tensor(x).to(dtype=self._op.dtype, device=self._op.device)
        return self._op.matvec(v).detach().to(device="cpu", dtype=torch.float64).numpy()

    def to_scipy(self):
        """M as a ``scipy.sparse.linalg.LinearOperator`` on flat float64 vectors (the block's parameters
        concatenated in ``named_parameters()`` order, as curvlinops orders them). Vectors are cast to the model's
        dtype for each product (float32 models: products accurate to float32). Symmetric: ``rmatvec`` is
        ``matvec``. With ``group``, every rank must take the same products in the same order."""
        from scipy.sparse.linalg import LinearOperator

        return LinearOperator(self.shape, matvec=self._flat_matvec, rmatvec=self._flat_matvec, dtype=np.float64)

    def close(self) -> None:
        """Free what the operator holds (retained graph, per-sample gradients); later products raise."""
        self._closed = True
        self._op = None

    def __enter__(self) -> "CurvatureOperator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        block = "all trainable parameters" if self.params is None else list(self.params)
        return (f"CurvatureOperator(kind={self.kind!r}, shape={self.shape}, params={block}, "
                f"bn_mode={self.bn_mode!r}, batch_size={self.batch_size})")


def curvature_operator(model: nn.Module, loss_fn: Callable, data, *, kind: str = DEFAULT_KIND,
                       params: Optional[Sequence[str]] = None, bn_mode: str = DEFAULT_BN_MODE,
                       group=None) -> CurvatureOperator:
    """The curvature matrix ``kind`` of L(w) = loss_fn(model(x), y) (a mean-reduced loss) at the model's weights.

    ``data``: one ``(inputs, targets)`` batch or an iterable of them (sample-weighted mean over chunks, one chunk in
    memory at a time). ``params``: parameter names of a diagonal block (None: all trainable parameters).
    ``group``: a ``torch.distributed`` process group; each rank passes its own shard and the operator is the one
    over the union. Returns a :class:`CurvatureOperator`: ``.matvec(dict)``, ``.to_scipy()``, ``.shape``,
    ``.kind``, ``.params``, ``.names``; also a context manager (see the module docstring for its lifetime).
    Building it costs a forward and a backward pass (for the empirical Fisher, the per-sample gradients).
    """
    source = Curvature(model, loss_fn, data, kind=kind, params=params, group=group, bn_mode=bn_mode)
    return CurvatureOperator(source.operator(), source.objective, source.kind, source.params, source.bn_mode)


class _Products:
    """The flat operator of a :class:`CurvatureOperator` for an estimator: its weights are checked before every
    product, and ``n_hvp`` counts this estimate's products only."""

    def __init__(self, operator: CurvatureOperator):
        operator._check_alive()
        self._operator, self._op = operator, operator._op
        self.n_hvp = 0

    def __getattr__(self, name):   # names, n, dtype, device, flatten, loss, gradient, n_samples, product
        return getattr(self._op, name)

    def matvec_dict(self, vector: Mapping[str, torch.Tensor]) -> Params:
        self._operator._check_alive()
        self.n_hvp += 1
        return self._op.matvec_dict(vector)

    def matvec(self, flat: torch.Tensor) -> torch.Tensor:
        self._operator._check_alive()
        self.n_hvp += 1
        return self._op.matvec(flat)


class Curvature:
    """What a curvature estimator works on, from ``(model, loss_fn, data)`` or from a :class:`CurvatureOperator`:
    ``objective``, ``kind``, ``params`` (resolved block or None), ``bn_mode``, ``n`` (the dimension), and
    :meth:`operator` (the flat operator; built on the first call, after the estimator has checked its arguments)."""

    def __init__(self, model, loss_fn, data, *, kind: str, params, group, bn_mode: str):
        if isinstance(model, CurvatureOperator):
            if loss_fn is not None or data is not None:
                raise TypeError("pass a CurvatureOperator alone or (model, loss_fn, data), not both: the operator "
                                "already holds its model, loss and data")
            source = model
            for name, value, own in (("kind", kind, source.kind), ("bn_mode", bn_mode, source.bn_mode)):
                if not isinstance(value, _Default) and value != own:
                    raise ValueError(f"{name}={value!r} differs from the operator's {name} {own!r}: leave {name} out "
                                     f"(the operator fixes it) or build another operator")
            if params is not None and resolve_params(source._objective, params) != (source.params or
                                                                                     source._objective.names):
                raise ValueError(f"params={list(params)} differs from the operator's block {source.params}: leave "
                                 f"params out (the operator fixes it) or build another operator")
            if group is not None:
                raise ValueError("group is fixed when the operator is built: pass group= to curvature_operator")
            self.objective, self.kind, self.params, self.bn_mode = source._objective, source.kind, source.params, \
                source.bn_mode
            self._source, self._op = source, None
        else:
            if loss_fn is None or data is None:
                raise TypeError("a curvature estimator takes (model, loss_fn, data) or a CurvatureOperator; "
                                "loss_fn and data are missing")
            bn_mode, kind = (str(v) if isinstance(v, _Default) else v for v in (bn_mode, kind))
            self.objective = make_objective(model, loss_fn, data, bn_mode)
            self.bn_mode, self.kind = bn_mode, check_kind(kind)
            self.params = resolve_params(self.objective, params)
            self._source, self._op, self._group = None, None, group
        self.n = block_dimension(self.objective, self.params)

    def operator(self, products: int = 0):
        """The flat operator; ``products``: how many products the estimate expects (see ``hessian_operator``)."""
        if self._op is None:
            self._op = (_Products(self._source) if self._source is not None else
                        curvature_matrix(self.objective, self.kind, self.params, self._group, products))
        return self._op


def hvp(model: nn.Module, loss_fn: Callable, data, vector: Mapping[str, torch.Tensor], *,
        bn_mode: str = DEFAULT_BN_MODE, kind: str = DEFAULT_KIND, params: Optional[Sequence[str]] = None,
        group=None) -> Dict[str, torch.Tensor]:
    """The exact Hessian-vector product H·v with H = ∇²_w L(w; B), by double backpropagation.

    ``data`` is one ``(inputs, targets)`` pair or an iterable of them (a list or a DataLoader, see
    :class:`~smoothness._objective.ChunkedObjective`): then H is the Hessian of the sample-weighted mean of the
    chunks' mean losses, computed one chunk at a time. ``vector`` and the result are dicts keyed like
    ``dict(model.named_parameters())`` (trainable parameters only). The model is left exactly as it was
    (parameters, buffers, train/eval flags, ``.grad``).

    ``kind`` ("ggn", "empirical-fisher"), ``params`` (a block: ``vector`` and the result keyed by its parameters)
    and ``group`` (data over torch.distributed ranks) give M·v for another matrix M; see ``smoothness.operator``.
    For many products, build the operator once with ``smoothness.curvature_operator``.
    """
    source = Curvature(model, loss_fn, data, kind=kind, params=params, group=group, bn_mode=bn_mode)
    v = source.objective.check_direction(vector, "vector", allow_zero=True, names=source.params)
    return source.operator().matvec_dict(v)
