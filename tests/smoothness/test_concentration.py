"""gradient_concentration on quadratics with a known eigenbasis (where the fraction is a closed form) and against
the dense float64 Hessian of tiny BatchNorm networks in both BN modes."""
import math

import numpy as np
import pytest
import torch
from torch import nn

import smoothness as sm

DT = torch.float64
LAMBDAS = np.array([9.0, 7.0, 6.5, 3.0, 2.0, 1.0, 0.5, 0.2, -0.3, -1.0])


def quadratic(ref, coefficients, seed=0):
    """L(w) = ½ (w − w*)ᵀ A (w − w*) with A = U diag(λ) Uᵀ and w − w* = U c, so g = U (λ ⊙ c): the fraction of ‖g‖²
    in the top-k eigenspace is Σ_{i<k} λ_i² c_i² / Σ_i λ_i² c_i²."""
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(len(LAMBDAS), len(LAMBDAS), generator=gen, dtype=DT))
    a = u @ torch.diag(torch.as_tensor(LAMBDAS)) @ u.T
    w_star = torch.randn(len(LAMBDAS), generator=gen, dtype=DT)
    model = ref.Quadratic(w_star + u @ torch.as_tensor(coefficients, dtype=DT))
    batch = (torch.zeros(4, 1, dtype=DT), w_star.expand(4, -1).clone())
    return model, ref.quadratic_loss(0.5 * (a + a.T)), batch


def expected_fraction(coefficients, k):
    g2 = (LAMBDAS * np.asarray(coefficients)) ** 2
    return g2[:k].sum() / g2.sum()


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_quadratic_closed_form(ref, k):
    c = np.linspace(1.0, 2.0, len(LAMBDAS))
    model, loss_fn, batch = quadratic(ref, c)
    out = sm.gradient_concentration(model, loss_fn, batch, k, tol=1e-12)
    assert out.converged and out.k == k and out.batch_size == 4 and out.bn_mode == "batch"
    np.testing.assert_allclose(out.eigenvalues, LAMBDAS[:k], rtol=1e-10)
    assert out.fraction == pytest.approx(expected_fraction(c, k), abs=1e-7)
    assert out.grad_norm == pytest.approx(np.linalg.norm(LAMBDAS * c), rel=1e-12)
    # the default tolerance (residuals <= 1e-4 relative): the subspace angle is at most ‖R‖/gap, hence the looser bound
    assert sm.gradient_concentration(model, loss_fn, batch, k).fraction == pytest.approx(
        expected_fraction(c, k), abs=1e-5)


def test_gradient_orthogonal_to_the_top_eigenvector(ref):
    """g ⟂ u_1: the top-1 fraction is 0, although Lanczos from a random start still finds λ_1."""
    c = np.ones(len(LAMBDAS))
    c[0] = 0.0
    model, loss_fn, batch = quadratic(ref, c)
    out = sm.gradient_concentration(model, loss_fn, batch, 1, tol=1e-12)
    assert out.eigenvalues[0] == pytest.approx(LAMBDAS[0], rel=1e-10)
    assert out.fraction == pytest.approx(0.0, abs=1e-12)


def test_gradient_inside_the_top_eigenspace(ref):
    c = np.zeros(len(LAMBDAS))
    c[:3] = [1.0, -2.0, 0.5]
    model, loss_fn, batch = quadratic(ref, c)
    out = sm.gradient_concentration(model, loss_fn, batch, 3, tol=1e-12)
    assert out.fraction == pytest.approx(1.0, abs=1e-12)
    assert sm.gradient_concentration(model, loss_fn, batch, 2, tol=1e-12).fraction == pytest.approx(
        expected_fraction(c, 2), abs=1e-7)


def test_zero_gradient_gives_nan(ref):
    model, loss_fn, batch = quadratic(ref, np.zeros(len(LAMBDAS)))
    out = sm.gradient_concentration(model, loss_fn, batch, 2)
    assert math.isnan(out.fraction) and out.grad_norm == 0.0


CASES = [(kind, bn_mode) for kind in ("mlp", "conv") for bn_mode in sm.BN_MODES]


@pytest.mark.parametrize("kind,bn_mode", CASES)
def test_matches_dense_hessian(ref, kind, bn_mode):
    """Against the dense Hessian's eigenvectors and the gradient of a plain backward pass, at the default tol."""
    model = ref.make_model(kind)
    batch = ref.make_batch(model, n=12)
    loss_fn = nn.CrossEntropyLoss()
    h = ref.dense_hessian(model, loss_fn, batch, bn_mode).numpy()
    eigenvalues, vectors = np.linalg.eigh(h)
    _, grad = ref.naive_loss_grad(model, loss_fn, batch, bn_mode)
    g = ref.flatten_dict(model, grad).numpy()
    for k in (1, 3):
        top = vectors[:, ::-1][:, :k]
        expected = np.sum((top.T @ g) ** 2) / (g @ g)
        before = ref.snapshot(model)
        out = sm.gradient_concentration(model, loss_fn, batch, k, bn_mode=bn_mode)
        ref.assert_same_snapshot(before, model)
        assert out.converged
        np.testing.assert_allclose(out.eigenvalues, eigenvalues[::-1][:k], rtol=1e-7)
        assert out.fraction == pytest.approx(expected, abs=5e-5)
        assert out.grad_norm == pytest.approx(np.linalg.norm(g), rel=1e-10)


@pytest.mark.parametrize("kind,bn_mode", CASES)
def test_float32_model_converges_at_the_default_tol(ref, kind, bn_mode):
    """The networks the toolkit measures are float32: the default tol must be reachable there (a residual tol near
    float32's epsilon never is) and the fraction stay within the documented 2·tol·|θ_1|/gap of the float64 answer."""
    import copy
    model = ref.make_model(kind)
    batch = ref.make_batch(model, n=12)
    loss_fn = nn.CrossEntropyLoss()
    h = ref.dense_hessian(model, loss_fn, batch, bn_mode).numpy()
    eigenvalues, vectors = np.linalg.eigh(h)
    eigenvalues, vectors = eigenvalues[::-1], vectors[:, ::-1]
    _, grad = ref.naive_loss_grad(model, loss_fn, batch, bn_mode)
    g = ref.flatten_dict(model, grad).numpy()
    model32 = copy.deepcopy(model).float()
    batch32 = (batch[0].float(), batch[1])
    for k in (1, 3):
        out = sm.gradient_concentration(model32, loss_fn, batch32, k, bn_mode=bn_mode)
        assert out.converged and out.n_hvp < 300
        expected = np.sum((vectors[:, :k].T @ g) ** 2) / (g @ g)
        gap = eigenvalues[k - 1] - eigenvalues[k]
        assert out.fraction == pytest.approx(expected, abs=2e-4 * eigenvalues[0] / gap + 1e-5)
        np.testing.assert_allclose(out.eigenvalues, eigenvalues[:k], rtol=2e-4)


@pytest.mark.parametrize("k,error,match", [(0, ValueError, "k must satisfy"), (221, ValueError, "k must satisfy"),
                                           (1.5, TypeError, "k must be an int"), (True, TypeError, "k must be an int")])
def test_bad_k(ref, k, error, match):
    model = ref.make_model("mlp")
    with pytest.raises(error, match=match):
        sm.gradient_concentration(model, nn.CrossEntropyLoss(), ref.make_batch(model), k)


@pytest.mark.parametrize("kw,match", [({"tol": 0.0}, "tol must be a positive"), ({"tol": -1e-3}, "tol must be"),
                                      ({"max_iter": 0}, "max_iter must be"), ({"bn_mode": "eval"}, "unknown bn_mode")])
def test_bad_options(ref, kw, match):
    model = ref.make_model("mlp")
    with pytest.raises(ValueError, match=match):
        sm.gradient_concentration(model, nn.CrossEntropyLoss(), ref.make_batch(model), 2, **kw)
