"""GGN, empirical Fisher and Hessian operators, whole and by parameter block, against dense float64 matrices.

References (no code from ``smoothness``): the dense Hessian of conftest; the dense GGN Jᵀ H_z J from the explicit
Jacobian of the whole batch's outputs and the Hessian of the loss in the outputs; the dense empirical Fisher
Σ gᵢgᵢᵀ/N from per-sample gradients computed one sample at a time the ordinary way.
"""
import numpy as np
import pytest
import torch
from scipy.sparse.linalg import eigsh
from torch import nn
from torch.func import functional_call

import smoothness as sm

# (model, bn_mode, kind): the empirical Fisher exists only with running BatchNorm statistics
CASES = [(m, b, k) for m in ("mlp", "conv") for b in sm.BN_MODES for k in sm.KINDS
         if not (k == "empirical-fisher" and b == "batch")]
BLOCK = {"mlp": ["net.6.bias", "net.0.weight"], "conv": ["features.4.weight", "head.weight"]}


def dense_ggn(ref, model, loss_fn, batch, bn_mode):
    x, y = batch
    buffers = dict(model.named_buffers())

    def outputs(flat):
        tensors = {**{n: b.clone() for n, b in buffers.items()}, **ref.unflatten(model, flat)}
        with ref.mode(model, bn_mode):
            return functional_call(model, tensors, (x,))

    w = ref.flat_params(model)
    z = outputs(w).detach()
    J = torch.autograd.functional.jacobian(outputs, w).reshape(z.numel(), -1)
    Hz = torch.autograd.functional.hessian(lambda zz: loss_fn(zz.reshape(z.shape), y), z.reshape(-1))
    return J.T @ Hz @ J


def dense_ef(ref, model, loss_fn, batch, bn_mode):
    x, y = batch
    g = torch.stack([ref.flatten_dict(model, ref.naive_loss_grad(model, loss_fn, (x[i:i + 1], y[i:i + 1]),
                                                                  bn_mode)[1]) for i in range(len(x))])
    return g.T @ g / len(x)


def dense(ref, kind, model, loss_fn, batch, bn_mode):
    if kind == "hessian":
        return ref.dense_hessian(model, loss_fn, batch, bn_mode)
    if kind == "ggn":
        return dense_ggn(ref, model, loss_fn, batch, bn_mode)
    return dense_ef(ref, model, loss_fn, batch, bn_mode)


def block_index(ref, model, names):
    idx, i = [], 0
    for n in ref.trainable_names(model):
        size = dict(model.named_parameters())[n].numel()
        if n in names:
            idx.extend(range(i, i + size))
        i += size
    return torch.tensor(idx)


@pytest.fixture(scope="module", params=CASES, ids=["-".join(c) for c in CASES])
def case(request):
    ref = request.getfixturevalue("ref")
    model_kind, bn_mode, kind = request.param
    model = ref.make_model(model_kind)
    batch = ref.make_batch(model, n=12)
    loss_fn = nn.CrossEntropyLoss()
    return model_kind, model, loss_fn, batch, bn_mode, kind, dense(ref, kind, model, loss_fn, batch, bn_mode)


def test_matvec_and_top_eigenvalues_match_dense(ref, case):
    _, model, loss_fn, batch, bn_mode, kind, M = case
    before = ref.snapshot(model)
    with sm.curvature_operator(model, loss_fn, batch, kind=kind, bn_mode=bn_mode) as op:
        assert op.shape == (ref.n_params(model),) * 2 and op.kind == kind and op.params is None
        for seed in range(2):
            v = ref.random_direction(model, seed)
            mv = op.matvec(v)
            assert list(mv) == ref.trainable_names(model)
            assert ref.rel_err(ref.flatten_dict(model, mv), M @ ref.flatten_dict(model, v)) < 1e-10
    expected = np.sort(np.linalg.eigvalsh(M.numpy()))[::-1][:2]
    out = sm.top_eigenvalues(model, loss_fn, batch, k=2, tol=1e-10, bn_mode=bn_mode, kind=kind)
    assert out.converged and (out.kind, out.params, out.batch_size) == (kind, None, 12)
    np.testing.assert_allclose(out.values, expected, rtol=1e-8)
    ref.assert_same_snapshot(before, model)


def test_blocks_match_dense(ref, case):
    model_kind, model, loss_fn, batch, bn_mode, kind, M = case
    names = BLOCK[model_kind]
    idx = block_index(ref, model, names)
    M_bb = M[idx][:, idx]
    op = sm.curvature_operator(model, loss_fn, batch, kind=kind, params=names, bn_mode=bn_mode)
    ordered = tuple(n for n in ref.trainable_names(model) if n in names)
    assert op.params == op.names == ordered and op.shape == (len(idx), len(idx))
    v = {n: t for n, t in ref.random_direction(model, 5).items() if n in names}
    mv = op.matvec(v)
    assert tuple(mv) == ordered
    assert ref.rel_err(torch.cat([mv[n].reshape(-1) for n in ordered]),
                       M_bb @ torch.cat([v[n].reshape(-1) for n in ordered])) < 1e-10
    # the scipy view flattens in named_parameters() order: its dense matrix is the block itself
    A = op.to_scipy() @ np.eye(len(idx))
    np.testing.assert_allclose(A, M_bb.numpy(), rtol=0, atol=1e-12 * float(M_bb.abs().max()))
    out = sm.top_eigenvalues(model, loss_fn, batch, k=1, tol=1e-10, bn_mode=bn_mode, kind=kind, params=names)
    np.testing.assert_allclose(out.values, np.linalg.eigvalsh(M_bb.numpy())[-1:], rtol=1e-8)
    assert out.params == ordered and list(out.vector_dicts(model)[0]) == list(ordered)
    d = {n: t for n, t in ref.random_direction(model, 7).items() if n in names}
    dv = torch.cat([d[n].reshape(-1) for n in ordered])
    got = sm.directional_curvature(model, loss_fn, batch, d, bn_mode=bn_mode, kind=kind, params=names).value
    assert got == pytest.approx(float(dv @ M_bb @ dv / (dv @ dv)), rel=1e-9, abs=1e-14)


@pytest.mark.parametrize("kind", ["ggn", "empirical-fisher"])
def test_chunks_are_the_union(ref, kind):
    """Running-mode chunks: the sample-weighted mean over chunks is the matrix of the union of the samples."""
    model = ref.make_model("conv")
    loss_fn = nn.CrossEntropyLoss()
    chunks = [ref.make_batch(model, n=n, seed=s) for n, s in ((5, 1), (3, 2), (6, 3))]
    union = (torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks]))
    M = dense(ref, kind, model, loss_fn, union, "running")
    v = ref.random_direction(model, 1)
    got = sm.hvp(model, loss_fn, chunks, v, bn_mode="running", kind=kind)
    assert ref.rel_err(ref.flatten_dict(model, got), M @ ref.flatten_dict(model, v)) < 1e-10
    out = sm.top_eigenvalues(model, loss_fn, chunks, k=1, tol=1e-10, bn_mode="running", kind=kind)
    assert out.batch_size == 14
    np.testing.assert_allclose(out.values, np.linalg.eigvalsh(M.numpy())[-1:], rtol=1e-8)


def test_to_scipy_eigsh_matches_top_eigenvalues(ref):
    model = ref.make_model("conv")
    loss_fn, batch = nn.CrossEntropyLoss(), ref.make_batch(model, n=12)
    before = ref.snapshot(model)
    for kind in ("hessian", "ggn"):
        op = sm.curvature_operator(model, loss_fn, batch, kind=kind)
        A = op.to_scipy()
        assert A.shape == op.shape and A.dtype == np.float64
        x = np.random.default_rng(0).standard_normal(A.shape[0])
        np.testing.assert_array_equal(A @ x, ref.flatten_dict(model, op.matvec(ref.unflatten(
            model, torch.as_tensor(x)))).numpy())
        top = eigsh(A, k=1, which="LA", tol=1e-12, v0=np.ones(A.shape[0]))[0]
        out = sm.top_eigenvalues(model, loss_fn, batch, k=1, tol=1e-10, kind=kind)
        np.testing.assert_allclose(top, out.values, rtol=1e-8)
    ref.assert_same_snapshot(before, model)


@pytest.mark.parametrize("kind", ["ggn", "empirical-fisher"])
def test_psd_spectra_nonnegative(ref, kind):
    model = ref.make_model("mlp")
    loss_fn, batch = nn.CrossEntropyLoss(), ref.make_batch(model, n=12)
    scale = sm.top_eigenvalues(model, loss_fn, batch, tol=1e-8, bn_mode="running", kind=kind).values[0]
    assert scale > 0
    density = sm.spectral_density(model, loss_fn, batch, n_probes=2, n_steps=30, bn_mode="running", kind=kind)
    assert density.kind == kind and min(min(p) for p in density.nodes) >= -1e-10 * scale
    bottom = eigsh(sm.curvature_operator(model, loss_fn, batch, kind=kind, bn_mode="running").to_scipy(), k=1,
                   which="SA", v0=np.ones(ref.n_params(model)))[0]
    assert bottom[0] >= -1e-10 * scale
    trace = sm.hessian_trace(model, loss_fn, batch, n_probes=4, bn_mode="running", kind=kind)
    assert trace.mean > 0 and trace.kind == kind
    if kind == "ggn":  # and in batch mode, where the GGN is Jᵀ∇²L J over the whole batch
        assert sm.top_eigenvalues(model, loss_fn, batch, k=3, tol=1e-8, kind=kind).values[-1] >= 0


def test_results_record_kind_and_params(ref):
    model = ref.make_model("mlp")
    loss_fn, batch = nn.CrossEntropyLoss(), ref.make_batch(model, n=12)
    names = BLOCK["mlp"]
    ordered = ("net.0.weight", "net.6.bias")
    assert sm.hessian_trace(model, loss_fn, batch, n_probes=2).kind == "hessian"
    results = [sm.hessian_trace(model, loss_fn, batch, n_probes=2, kind="ggn", params=names),
               sm.spectral_density(model, loss_fn, batch, n_probes=1, n_steps=5, kind="ggn", params=names),
               sm.gradient_concentration(model, loss_fn, batch, k=2, kind="ggn", params=names),
               sm.top_eigenvalues(model, loss_fn, batch, kind="ggn", params=names)]
    for r in results:
        assert (r.kind, r.params) == ("ggn", ordered), type(r).__name__
    assert {r.product for r in results if hasattr(r, "product")} == {"jvp + vjp"}   # and how it was computed
    assert sm.top_eigenvalues(model, loss_fn, batch).product == "double-backward"
    assert sm.hessian_trace(model, loss_fn, [batch, batch], n_probes=2).product == "double-backward per chunk"
    assert sm.hessian_trace(model, loss_fn, batch, n_probes=2, kind="empirical-fisher",
                            bn_mode="running").product == "per-sample gradients"
    with sm.curvature_operator(model, loss_fn, batch, kind="ggn", params=names) as op:
        assert op.product == "jvp + vjp"
    assert results[1].n_params == 6 * 10 + 3
    conc = results[2]
    g = sm.loss_and_gradient(model, loss_fn, batch)[1]
    assert conc.grad_norm == pytest.approx(ref.l2({n: g[n] for n in ordered}), rel=1e-10)
    # a result built the old way (no kind, no params) still works and means the whole Hessian
    old = sm.TraceResult(mean=1.0, stderr=0.1, n_hvp=2, bn_mode="batch", batch_size=3)
    assert (old.kind, old.params) == ("hessian", None)


def test_bad_kind_params_and_batch_bn_fisher(ref):
    model = ref.make_model("mlp", freeze=True)
    loss_fn, batch = nn.CrossEntropyLoss(), ref.make_batch(model, n=12)
    with pytest.raises(ValueError, match="unknown kind 'fisher'"):
        sm.top_eigenvalues(model, loss_fn, batch, kind="fisher")
    with pytest.raises(ValueError, match=r"unknown parameter names \['nope'\].*valid names.*'net.0.weight'"):
        sm.curvature_operator(model, loss_fn, batch, params=["nope", "net.0.weight"])
    with pytest.raises(ValueError, match="requires_grad=False"):
        sm.hessian_trace(model, loss_fn, batch, params=["net.0.bias"])
    with pytest.raises(TypeError, match="wrap it in a list"):
        sm.hvp(model, loss_fn, batch, {}, params="net.0.weight")
    with pytest.raises(ValueError, match="params is empty"):
        sm.curvature_operator(model, loss_fn, batch, params=[])
    with pytest.raises(ValueError, match=r"per-sample gradients.*BatchNorm.*bn_mode='running'"):
        sm.curvature_operator(model, loss_fn, batch, kind="empirical-fisher", bn_mode="batch")
    with pytest.raises(ValueError, match="bn_mode='running'"):
        sm.top_eigenvalues(model, loss_fn, [batch, batch], kind="empirical-fisher")
    op = sm.curvature_operator(model, loss_fn, batch, params=["net.6.bias"])
    with pytest.raises(ValueError, match="unexpected keys.*block"):
        op.matvec(ref.random_direction(model))


def test_lifetime(ref):
    model = ref.make_model("mlp")
    loss_fn, batch = nn.CrossEntropyLoss(), ref.make_batch(model, n=12)
    v = ref.random_direction(model)
    with sm.curvature_operator(model, loss_fn, batch, kind="ggn") as op:
        first = op.matvec(v)
        A = op.to_scipy()
    with pytest.raises(RuntimeError, match="closed"):
        op.matvec(v)
    with pytest.raises(RuntimeError, match="closed"):
        A @ np.ones(A.shape[0])
    op = sm.curvature_operator(model, loss_fn, batch, kind="ggn")
    assert all(torch.equal(first[n], t) for n, t in op.matvec(v).items())
    with torch.no_grad():
        model.net[0].weight.add_(0.1)
    with pytest.raises(RuntimeError, match=r"\['net.0.weight'\] were changed in place"):
        op.matvec(v)


@pytest.mark.parametrize("bn_mode", sm.BN_MODES)
def test_model_untouched(ref, bn_mode):
    """Dropout, a frozen parameter, .grad set, mixed train/eval flags: all kinds leave everything as found."""
    model = ref.make_model("mlp", dropout=0.5, freeze=True)
    model.train()
    model.net[1].eval()
    model.net[0].weight.grad = torch.ones_like(model.net[0].weight)
    loss_fn, batch = nn.CrossEntropyLoss(), ref.make_batch(model, n=10)
    before = ref.snapshot(model)
    for kind in sm.KINDS:
        if kind == "empirical-fisher" and bn_mode == "batch":
            continue
        sm.top_eigenvalues(model, loss_fn, batch, k=2, bn_mode=bn_mode, kind=kind)
        sm.hessian_trace(model, loss_fn, [batch, batch], n_probes=2, bn_mode=bn_mode, kind=kind,
                         params=["net.7.weight"])
        op = sm.curvature_operator(model, loss_fn, batch, kind=kind, bn_mode=bn_mode)
        op.to_scipy() @ np.ones(op.shape[0])
        ref.assert_same_snapshot(before, model)


@pytest.mark.parametrize("bn_mode", sm.BN_MODES)
def test_smallest_eigenvalues_match_dense(ref, bn_mode):
    """which="smallest": the most negative Hessian eigenvalues (ascending), whole and on a block, as the dense
    matrix's; an indefinite case (a network Hessian at random weights)."""
    model = ref.make_model("conv")
    batch = ref.make_batch(model, n=12)
    loss_fn = nn.CrossEntropyLoss()
    H = ref.dense_hessian(model, loss_fn, batch, bn_mode).numpy()
    low = np.sort(np.linalg.eigvalsh(H))[:2]
    assert low[0] < 0
    out = sm.top_eigenvalues(model, loss_fn, batch, k=2, tol=1e-10, bn_mode=bn_mode, which="smallest")
    assert out.converged and out.which == "smallest"
    np.testing.assert_allclose(out.values, low, rtol=1e-8)
    names = BLOCK["conv"]
    idx = block_index(ref, model, names).numpy()
    block = sm.top_eigenvalues(model, loss_fn, batch, k=1, tol=1e-10, bn_mode=bn_mode, params=names,
                               which="smallest")
    np.testing.assert_allclose(block.values, np.linalg.eigvalsh(H[np.ix_(idx, idx)])[:1], rtol=1e-8)
    with pytest.raises(ValueError, match="which must be 'largest'"):
        sm.top_eigenvalues(model, loss_fn, batch, which="lowest")


@pytest.mark.parametrize("kind", sm.KINDS)
def test_writes_through_data_are_detected(ref, kind):
    """p.data.mul_(2) bypasses autograd's version counter; the operator must still notice the new weights."""
    model = ref.make_model("mlp")
    loss_fn, batch = nn.CrossEntropyLoss(), ref.make_batch(model, n=12)
    v = ref.random_direction(model)
    op = sm.curvature_operator(model, loss_fn, batch, kind=kind, bn_mode="running")
    op.matvec(v)
    model.net[3].weight.data.mul_(2)
    with pytest.raises(RuntimeError, match=r"\['net.3.weight'\] were changed in place"):
        op.matvec(v)
    with pytest.raises(RuntimeError, match="changed in place"):
        op.to_scipy() @ np.ones(op.shape[0])
    model.net[3].weight.data.div_(2)   # back to the weights it was built on: products are valid again
    op.matvec(v)
