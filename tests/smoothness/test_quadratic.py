"""L(w) = ½ (w − w*)ᵀ A (w − w*): every estimator has a closed form."""
import numpy as np
import pytest
import torch

import smoothness as sm

N = 30
EIGS = np.concatenate([[12.0, 9.0, 7.5, 6.0, 5.0], np.linspace(0.1, 4.0, N - 5)])


@pytest.fixture(scope="module")
def quad():
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(N, N, generator=g, dtype=torch.float64))
    A = Q @ torch.diag(torch.as_tensor(EIGS)) @ Q.T
    A = 0.5 * (A + A.T)
    w_star = torch.randn(N, generator=g, dtype=torch.float64)
    w0 = w_star + torch.randn(N, generator=g, dtype=torch.float64)
    return A, w_star, w0


def setup(quad, ref, batch_size=4):
    A, w_star, w0 = quad
    model = ref.Quadratic(w0)
    x = torch.zeros(batch_size, 1, dtype=torch.float64)
    y = w_star.expand(batch_size, -1).clone()
    return model, ref.quadratic_loss(A), (x, y)


def closed_loss(A, w_star, w):
    r = (w - w_star).numpy()
    return 0.5 * r @ A.numpy() @ r


@pytest.mark.parametrize("bn_mode", sm.BN_MODES)
def test_line_probe_default_direction(quad, ref, bn_mode):
    A, w_star, w0 = quad
    model, loss_fn, batch = setup(quad, ref)
    steps = [0.01, 0.05, 0.1, 0.2, 0.4]
    out = sm.line_probe(model, loss_fn, batch, steps, bn_mode=bn_mode)
    g = A @ (w0 - w_star)
    d = -g
    beta = float(torch.linalg.vector_norm(A @ d) / torch.linalg.vector_norm(d))
    assert out.step_sizes == tuple(steps)
    assert out.bn_mode == bn_mode
    assert out.n_passes == len(steps) + 1
    assert out.base_loss == pytest.approx(closed_loss(A, w_star, w0), rel=1e-12)
    assert out.grad_norm == pytest.approx(float(torch.linalg.vector_norm(g)), rel=1e-12)
    assert out.direction_norm == pytest.approx(float(torch.linalg.vector_norm(d)), rel=1e-12)
    assert out.effective_beta == pytest.approx(beta, rel=1e-10)
    for s, loss, gd, dist in zip(steps, out.losses, out.grad_diff_norms, out.distances):
        assert loss == pytest.approx(closed_loss(A, w_star, w0 + s * d), rel=1e-12)
        assert dist == pytest.approx(s * float(torch.linalg.vector_norm(d)), rel=1e-12)
        assert gd / dist == pytest.approx(beta, rel=1e-10)
    assert out.loss_range == (min(out.losses), max(out.losses))
    assert out.grad_diff_range == (min(out.grad_diff_norms), max(out.grad_diff_norms))


def test_line_probe_explicit_direction_and_local_lipschitz(quad, ref):
    A, w_star, w0 = quad
    model, loss_fn, batch = setup(quad, ref)
    d = torch.randn(N, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    beta = float(torch.linalg.vector_norm(A @ d) / torch.linalg.vector_norm(d))
    steps = [0.1, 0.5, 1.0, 3.0]
    out = sm.line_probe(model, loss_fn, batch, steps, direction={"w": d})
    assert out.effective_beta == pytest.approx(beta, rel=1e-10)
    for s, loss, gd, dist in zip(steps, out.losses, out.grad_diff_norms, out.distances):
        assert gd / dist == pytest.approx(beta, rel=1e-10)
        assert loss == pytest.approx(closed_loss(A, w_star, w0 + s * d), rel=1e-12)
    for s in steps:
        assert sm.local_lipschitz(model, loss_fn, batch, {"w": s * d}).value == pytest.approx(beta, rel=1e-10)


@pytest.mark.parametrize("bn_mode", sm.BN_MODES)
def test_hvp_is_A_v(quad, ref, bn_mode):
    A, _, _ = quad
    model, loss_fn, batch = setup(quad, ref)
    for seed in range(3):
        v = torch.randn(N, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        hv = sm.hvp(model, loss_fn, batch, {"w": v}, bn_mode=bn_mode)
        assert set(hv) == {"w"} and hv["w"].dtype == torch.float64 and hv["w"].shape == (N,)
        torch.testing.assert_close(hv["w"], A @ v, rtol=1e-12, atol=1e-12)
    zero = sm.hvp(model, loss_fn, batch, {"w": torch.zeros(N, dtype=torch.float64)})
    assert torch.equal(zero["w"], torch.zeros(N, dtype=torch.float64))


@pytest.mark.parametrize("k", [1, 5])
def test_top_eigenvalues(quad, ref, k):
    model, loss_fn, batch = setup(quad, ref)
    A = quad[0]
    expected = np.sort(np.linalg.eigvalsh(A.numpy()))[::-1][:k]
    np.testing.assert_allclose(expected, EIGS[:k], rtol=1e-12)
    out = sm.top_eigenvalues(model, loss_fn, batch, k=k, tol=1e-10)
    assert len(out.values) == k
    np.testing.assert_allclose(out.values, expected, rtol=1e-8)
    assert out.converged
    assert 0 < out.n_hvp <= N
    assert len(out.error_bounds) == k and all(0 <= b <= 1e-10 * abs(v) for b, v in zip(out.error_bounds, out.values))
    assert out.batch_size == 4 and out.bn_mode == "batch"


def test_hessian_trace(quad, ref):
    model, loss_fn, batch = setup(quad, ref)
    A = quad[0]
    out = sm.hessian_trace(model, loss_fn, batch, n_probes=200, generator=torch.Generator().manual_seed(11))
    tr = float(torch.trace(A))
    assert tr == pytest.approx(EIGS.sum(), rel=1e-12)
    assert out.n_hvp == 200
    assert out.stderr > 0
    assert abs(out.mean - tr) <= 3 * out.stderr
    # the standard error matches the known Rademacher variance 2·Σ_{i≠j} A_ij² / n
    off = A - torch.diag(torch.diag(A))
    se_true = float(torch.sqrt(2 * (off ** 2).sum() / 200))
    assert out.stderr == pytest.approx(se_true, rel=0.3)
    again = sm.hessian_trace(model, loss_fn, batch, n_probes=200, generator=torch.Generator().manual_seed(11))
    assert again == out


def test_hessian_trace_diagonal_is_exact(ref):
    # Rademacher v gives vᵀAv = tr(A) exactly when A is diagonal: zero variance
    eigs = torch.linspace(0.5, 3.0, 10, dtype=torch.float64)
    A = torch.diag(eigs)
    model = ref.Quadratic(torch.ones(10, dtype=torch.float64))
    batch = (torch.zeros(2, 1, dtype=torch.float64), torch.zeros(2, 10, dtype=torch.float64))
    out = sm.hessian_trace(model, ref.quadratic_loss(A), batch, n_probes=5)
    assert out.mean == pytest.approx(float(eigs.sum()), rel=1e-13)
    assert out.stderr == pytest.approx(0.0, abs=1e-12)


def test_directional_curvature(quad, ref):
    A, _, _ = quad
    model, loss_fn, batch = setup(quad, ref)
    for seed in range(3):
        d = torch.randn(N, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        expected = float(d @ A @ d / (d @ d))
        got = sm.directional_curvature(model, loss_fn, batch, {"w": d}).value
        assert got == pytest.approx(expected, rel=1e-12)
        # scale invariant
        got = sm.directional_curvature(model, loss_fn, batch, {"w": 7.0 * d}).value
        assert got == pytest.approx(expected, rel=1e-12)
    # along an eigenvector the curvature is the eigenvalue
    vals, vecs = np.linalg.eigh(A.numpy())
    got = sm.directional_curvature(model, loss_fn, batch, {"w": torch.as_tensor(vecs[:, -1])}).value
    assert got == pytest.approx(vals[-1], rel=1e-12)


def test_root_parameter_ics_layer_name(quad, ref):
    model, loss_fn, batch = setup(quad, ref)
    out = sm.internal_covariate_shift(model, loss_fn, batch, lr=0.1)
    assert [s.layer for s in out.layers] == ["<root>"]
    assert out.layers[0].parameters == ("w",)
    assert out.layers[0].grad_diff_norm == 0.0 and out.layers[0].cosine == pytest.approx(1.0, abs=1e-12)


REPEATED = {
    "5,5 of 30": ([5.0, 5.0, 3.0, 3.0] + [1.0] * 26, 2),
    "5,5,3,3 of 30": ([5.0, 5.0, 3.0, 3.0] + [1.0] * 26, 4),
    "3,3,3,2,2 of 40": ([3.0, 3.0, 3.0, 2.0, 2.0] + list(np.linspace(0.1, 1.5, 35)), 5),
}


@pytest.mark.parametrize("case", list(REPEATED))
@pytest.mark.parametrize("rotate", [False, True])
def test_top_eigenvalues_repeated_eigenvalue(ref, case, rotate):
    """Exactly repeated eigenvalues among the top k are all found (single-vector Lanczos reported the second copy
    of 5 as 3, "converged"; a block of k random vectors spans every copy)."""
    eigs, k = REPEATED[case]
    n = len(eigs)
    A = torch.diag(torch.tensor(eigs, dtype=torch.float64))
    if rotate:
        Q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
        A = Q @ A @ Q.T
    model = ref.Quadratic(torch.ones(n, dtype=torch.float64))
    batch = (torch.zeros(2, 1, dtype=torch.float64), torch.zeros(2, n, dtype=torch.float64))
    expected = sorted(eigs, reverse=True)[:k]
    for tol in (1e-10, 1e-3):
        out = sm.top_eigenvalues(model, ref.quadratic_loss(A), batch, k=k, tol=tol)
        assert out.converged
        np.testing.assert_allclose(out.values, expected, rtol=max(tol, 1e-8))
