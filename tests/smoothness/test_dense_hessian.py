"""hvp and top_eigenvalues against the dense Hessian of tiny BatchNorm networks (float64), in both bn modes."""
import numpy as np
import pytest
import torch

import smoothness as sm

CASES = [(kind, bn_mode) for kind in ("mlp", "conv") for bn_mode in sm.BN_MODES]


@pytest.fixture(scope="module", params=CASES, ids=[f"{k}-{b}" for k, b in CASES])
def case(request):
    ref = request.getfixturevalue("ref")
    kind, bn_mode = request.param
    model = ref.make_model(kind)
    batch = ref.make_batch(model, n=12)
    loss_fn = torch.nn.CrossEntropyLoss()
    before = ref.snapshot(model)
    H = ref.dense_hessian(model, loss_fn, batch, bn_mode)
    ref.assert_same_snapshot(before, model)  # the reference itself must not move the model
    return model, loss_fn, batch, bn_mode, H


def test_modes_differ(ref, case):
    """Sanity: the two bn modes are really different losses on these models (running stats are non-trivial)."""
    model, loss_fn, batch, bn_mode, H = case
    other = "running" if bn_mode == "batch" else "batch"
    f, f_other = (ref.loss_of_flat(model, loss_fn, batch, m) for m in (bn_mode, other))
    w = ref.flat_params(model)
    assert abs(float(f(w)) - float(f_other(w))) > 1e-3


def test_hvp_matches_dense(ref, case):
    model, loss_fn, batch, bn_mode, H = case
    for seed in range(3):
        v = ref.random_direction(model, seed)
        hv = sm.hvp(model, loss_fn, batch, v, bn_mode=bn_mode)
        assert list(hv) == ref.trainable_names(model)
        got = ref.flatten_dict(model, hv)
        expected = H @ ref.flatten_dict(model, v)
        assert ref.rel_err(got, expected) < 1e-8


@pytest.mark.parametrize("k", [1, 3])
def test_top_eigenvalues_match_dense(ref, case, k):
    model, loss_fn, batch, bn_mode, H = case
    expected = np.sort(np.linalg.eigvalsh(H.numpy()))[::-1][:k]
    out = sm.top_eigenvalues(model, loss_fn, batch, k=k, tol=1e-10, bn_mode=bn_mode)
    assert out.converged
    assert len(out.values) == k
    np.testing.assert_allclose(out.values, expected, rtol=1e-8)


def test_directional_curvature_matches_dense(ref, case):
    model, loss_fn, batch, bn_mode, H = case
    d = ref.random_direction(model, 7)
    dv = ref.flatten_dict(model, d)
    expected = float(dv @ H @ dv / (dv @ dv))
    got = sm.directional_curvature(model, loss_fn, batch, d, bn_mode=bn_mode).value
    assert got == pytest.approx(expected, rel=1e-8, abs=1e-12 * float(torch.linalg.matrix_norm(H, 2)))


def test_hessian_trace_near_dense(ref, case):
    model, loss_fn, batch, bn_mode, H = case
    out = sm.hessian_trace(model, loss_fn, batch, n_probes=100, bn_mode=bn_mode,
                           generator=torch.Generator().manual_seed(3))
    assert abs(out.mean - float(torch.trace(H))) <= 4 * out.stderr


def test_line_probe_matches_naive_loop(ref, case):
    model, loss_fn, batch, bn_mode, _ = case
    steps = [0.05, 0.1, 0.3, 0.6]
    base_loss, base_grad = ref.naive_loss_grad(model, loss_fn, batch, bn_mode)
    loss, grad = sm.loss_and_gradient(model, loss_fn, batch, bn_mode=bn_mode)
    assert loss == pytest.approx(base_loss, rel=1e-12)
    assert list(grad) == list(base_grad)
    for n in grad:
        torch.testing.assert_close(grad[n], base_grad[n], rtol=1e-10, atol=1e-14)
    for direction in (None, ref.random_direction(model, 4)):
        out = sm.line_probe(model, loss_fn, batch, steps, direction=direction, bn_mode=bn_mode)
        d = {n: -g for n, g in base_grad.items()} if direction is None else direction
        d_norm = ref.l2(d)
        assert out.base_loss == pytest.approx(base_loss, rel=1e-10)
        assert out.grad_norm == pytest.approx(ref.l2(base_grad), rel=1e-10)
        assert out.direction_norm == pytest.approx(d_norm, rel=1e-10)
        losses, diffs, dists = [], [], []
        for s in steps:
            loss, grad = ref.naive_loss_grad(model, loss_fn, batch, bn_mode, shift=d, s=s)
            losses.append(loss)
            diffs.append(ref.l2({n: grad[n] - base_grad[n] for n in grad}))
            dists.append(s * d_norm)
        np.testing.assert_allclose(out.losses, losses, rtol=1e-10)
        np.testing.assert_allclose(out.grad_diff_norms, diffs, rtol=1e-10)
        np.testing.assert_allclose(out.distances, dists, rtol=1e-10)
        assert out.effective_beta == pytest.approx(max(g / r for g, r in zip(diffs, dists)), rel=1e-10)
        # local_lipschitz is the single-step probe
        lip = sm.local_lipschitz(model, loss_fn, batch, {n: steps[1] * t for n, t in d.items()}, bn_mode=bn_mode).value
        assert lip == pytest.approx(diffs[1] / dists[1], rel=1e-10)


# -- top_eigenvalues result fields ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("k", [1, 3])
def test_top_eigenvalues_result_fields(ref, monkeypatch, kind, k):
    from smoothness.hvp import HessianOperator

    model = ref.make_model(kind)
    batch = ref.make_batch(model, n=12)
    loss_fn = torch.nn.CrossEntropyLoss()
    calls = []
    original = HessianOperator.matvec_dict

    def counting(self, vector):
        calls.append(1)
        return original(self, vector)

    monkeypatch.setattr(HessianOperator, "matvec_dict", counting)
    out = sm.top_eigenvalues(model, loss_fn, batch, k=k, tol=1e-6, bn_mode="batch")
    assert len(out.values) == k and len(out.error_bounds) == k
    assert list(out.values) == sorted(out.values, reverse=True)
    assert out.converged
    assert 0 < out.n_hvp == len(calls) <= ref.n_params(model)
    assert all(0 <= b <= 1e-6 * abs(v) for b, v in zip(out.error_bounds, out.values))
    assert out.bn_mode == "batch" and out.batch_size == 12
    calls.clear()
    again = sm.top_eigenvalues(model, loss_fn, batch, k=k, tol=1e-6, bn_mode="batch")
    assert again == out  # deterministic: same start vector, same products
    # an explicit generator is honoured; a different start vector gives the same values to tolerance
    other = sm.top_eigenvalues(model, loss_fn, batch, k=k, tol=1e-6, generator=torch.Generator().manual_seed(42))
    np.testing.assert_allclose(other.values, out.values, rtol=1e-5)


def test_top_eigenvalues_max_iter_caps_products(ref):
    model = ref.make_model("mlp")
    batch = ref.make_batch(model, n=12)
    out = sm.top_eigenvalues(model, torch.nn.CrossEntropyLoss(), batch, k=2, tol=1e-14, max_iter=4)
    assert out.n_hvp == 4 and not out.converged and len(out.values) == 2
