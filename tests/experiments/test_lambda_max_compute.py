"""experiments.features.lambda_max.compute's evaluation: chunked, channels_last on CPU, and exact."""
import pytest
import torch
import torch.nn.functional as F

from experiments.features.evaluation import compute as evaluation
from experiments.models import build_model


def test_eval_matches_one_plain_forward_and_restores_the_weights_bit_for_bit():
    torch.manual_seed(0)
    x, y = torch.randn(600, 1, 28, 28), torch.randint(0, 10, (600,))
    for name in ("convnet", "bn-convnet"):
        model = build_model(name)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        model.train()
        F.cross_entropy(model(x[:32]), y[:32]).backward()
        opt.step()                                    # running statistics and weights away from their init
        model.eval()
        before = {n: (p, p.data.clone(), p.data.stride()) for n, p in model.named_parameters()}
        with torch.no_grad():
            out = model(x)
        want_loss, want_acc = float(F.cross_entropy(out, y)), int((out.argmax(1) == y).sum()) / len(y)
        loss, acc = evaluation.loss_and_accuracy(model, x, y)     # 600 images: three chunks on CPU
        assert abs(loss - want_loss) < 1e-5 * max(1.0, want_loss) and acc == want_acc
        for n, p in model.named_parameters():
            obj, value, stride = before[n]
            assert p is obj and torch.equal(p.data, value) and p.data.stride() == stride, n
        assert opt.param_groups[0]["params"][0] is before[next(iter(before))][0]


def test_sharpness_sample_is_chunked_only_where_that_keeps_the_loss():
    """Over 1,000 images the sharpness goes through smoothness' chunked curvature (bounded memory), but only for
    networks without batch statistics: with BatchNorm in train mode a chunk's statistics would change the loss."""
    import smoothness
    from experiments.losses import squared_error
    from experiments.models import build_model
    from experiments.features.lambda_max.compute import SHARPNESS_CHUNK, batch_coupled, sharpness_batch

    g = torch.Generator().manual_seed(0)
    n = 2 * SHARPNESS_CHUNK + 7
    x, y = torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)
    torch.manual_seed(0)
    fc, bn = build_model("fc-tanh"), build_model("bn-convnet")
    assert not batch_coupled(fc) and batch_coupled(bn)
    chunks = sharpness_batch(fc, x, y)
    assert isinstance(chunks, list) and [c[0].shape[0] for c in chunks] == [SHARPNESS_CHUNK, SHARPNESS_CHUNK, 7]
    assert isinstance(sharpness_batch(bn, x, y), tuple)
    assert isinstance(sharpness_batch(fc, x[:SHARPNESS_CHUNK], y[:SHARPNESS_CHUNK]), tuple)
    whole = smoothness.top_eigenvalues(fc, squared_error, (x, y), tol=1e-6)
    chunked = smoothness.top_eigenvalues(fc, squared_error, chunks, tol=1e-6)
    assert chunked.batch_size == whole.batch_size == x.shape[0]
    assert chunked.values[0] == pytest.approx(whole.values[0], rel=1e-4)


class _Quadratic(torch.nn.Module):
    """L(w) = ½ wᵀAw whatever the batch: a Hessian we choose."""

    def __init__(self, n):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(n, dtype=torch.float64))

    def forward(self, x):
        return self.w.expand(x.shape[0], -1)


def test_warm_start_survives_a_swap_of_the_top_two():
    """At the edge of stability the top two eigenvalues trade places. A warm start from the old top eigenvector
    alone spans an invariant subspace and returns the old (now second) eigenvalue as converged; asking for the top
    two from the previous two vectors finds the new top one, as a cold start does."""
    from experiments.features.lambda_max.compute import WarmStart, sharpness

    n = 40
    lam = torch.linspace(0.1, 3.0, n, dtype=torch.float64)
    lam[0], lam[1] = 5.0, 4.9         # e_0 is the new top eigenvector, e_1 was the top one before
    a = torch.diag(lam)

    def loss_fn(out, _targets):
        return 0.5 * torch.einsum("bi,ij,bj->b", out, a, out).mean()

    model = _Quadratic(n)
    batch = (torch.zeros(3, 1, dtype=torch.float64), torch.zeros(3))
    eye = torch.eye(n, dtype=torch.float64)
    # the previous measurement's top two: (nearly) e_1, then e_0; now their eigenvalues have swapped
    old_two = torch.stack([eye[1] + 0.01 * eye[3], eye[0] + 0.01 * eye[4]])

    warm = WarmStart(True)
    warm.vectors = old_two
    out = sharpness(model, batch, 1e-3, loss_fn, warm)
    assert out.converged and out.values[0] == pytest.approx(5.0, rel=1e-3)
    assert warm.vectors.shape == (2, n) and torch.allclose(warm.vectors[0].abs(), eye[0], atol=1e-2)
    assert sharpness(model, batch, 1e-3, loss_fn, None).values[0] == pytest.approx(5.0, rel=1e-3)

    # what the one-vector warm start did: the old eigenvalue, reported converged
    import smoothness
    stuck = smoothness.top_eigenvalues(model, loss_fn, batch, k=1, tol=1e-3, start=old_two[0])
    assert stuck.converged and stuck.values[0] == pytest.approx(4.9, rel=1e-3)
