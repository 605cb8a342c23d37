"""preconditioned_top_eigenvalues against the dense P⁻¹H of tiny BatchNorm networks (float64), both bn modes."""
import numpy as np
import pytest
import scipy.linalg
import torch

import smoothness as sm

CASES = [(kind, bn_mode) for kind in ("mlp", "conv") for bn_mode in sm.BN_MODES]


def _preconditioner(model, seed=5):
    """A diagonal P spanning three orders of magnitude, like Adam's √v̂ + ε."""
    g = torch.Generator().manual_seed(seed)
    return {n: 10 ** (3 * torch.rand(p.shape, generator=g, dtype=p.dtype) - 2)
            for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind, bn_mode", CASES, ids=[f"{k}-{b}" for k, b in CASES])
def test_matches_the_dense_generalised_eigenproblem(ref, kind, bn_mode):
    model = ref.make_model(kind)
    batch = ref.make_batch(model, n=12)
    loss_fn = torch.nn.CrossEntropyLoss()
    H = ref.dense_hessian(model, loss_fn, batch, bn_mode).numpy()
    P = _preconditioner(model)
    p = ref.flatten_dict(model, P).numpy()
    expected = np.sort(scipy.linalg.eigvals(H / p[:, None]).real)[::-1][:2]  # eigenvalues of P⁻¹H
    before = ref.snapshot(model)
    out = sm.preconditioned_top_eigenvalues(model, loss_fn, batch, P, k=2, tol=1e-10, bn_mode=bn_mode)
    ref.assert_same_snapshot(before, model)
    assert out.converged and out.bn_mode == bn_mode and out.batch_size == 12
    np.testing.assert_allclose(out.values, expected, rtol=1e-8)
    # a non-trivial P really changes the answer
    assert abs(out.values[0] - np.linalg.eigvalsh(H)[-1]) > 1e-2 * abs(out.values[0])


def test_identity_preconditioner_is_plain_sharpness(ref):
    model = ref.make_model("mlp")
    batch = ref.make_batch(model)
    loss_fn = torch.nn.CrossEntropyLoss()
    ones = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    a = sm.preconditioned_top_eigenvalues(model, loss_fn, batch, ones, tol=1e-8)
    b = sm.top_eigenvalues(model, loss_fn, batch, tol=1e-8)
    assert a.values == pytest.approx(b.values, rel=1e-10) and a.n_hvp == b.n_hvp


def test_scaling_the_preconditioner_scales_the_eigenvalue(ref):
    model = ref.make_model("mlp")
    batch = ref.make_batch(model)
    loss_fn = torch.nn.CrossEntropyLoss()
    P = _preconditioner(model)
    a = sm.preconditioned_top_eigenvalues(model, loss_fn, batch, P, tol=1e-10)
    b = sm.preconditioned_top_eigenvalues(model, loss_fn, batch, {n: 4 * t for n, t in P.items()}, tol=1e-10)
    assert b.values[0] == pytest.approx(a.values[0] / 4, rel=1e-8)


def test_bad_preconditioners_are_refused(ref):
    model = ref.make_model("mlp")
    batch = ref.make_batch(model)
    loss_fn = torch.nn.CrossEntropyLoss()
    P = _preconditioner(model)
    name = next(iter(P))
    with pytest.raises(ValueError, match=rf"positive everywhere .* entries <= 0 in \['{name}'\]"):
        sm.preconditioned_top_eigenvalues(model, loss_fn, batch, {**P, name: -P[name]})
    with pytest.raises(ValueError, match="preconditioner does not match the model's trainable parameters"):
        sm.preconditioned_top_eigenvalues(model, loss_fn, batch, {name: P[name]})
    with pytest.raises(ValueError, match="k must be an int"):
        sm.preconditioned_top_eigenvalues(model, loss_fn, batch, P, k=0)
