"""Loss surfaces and interpolation: exact per-filter norms, a quadratic known in closed form at every grid point,
both BatchNorm treatments against a naive deep-copied model, chunked data, and bit-for-bit restoration."""
import copy
import itertools

import numpy as np
import pytest
import torch
from torch import nn

import smoothness as sm

DT = torch.float64


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# -- random_direction ------------------------------------------------------------------------------------------------
def test_filter_normalisation_per_filter_norms_exact(ref):
    model = ref.make_model("conv")
    d = sm.random_direction(model, generator=_gen(7))
    params = dict(model.named_parameters())
    assert list(d) == ref.trainable_names(model)
    checked = 0
    for name, w in params.items():
        assert d[name].shape == w.shape and d[name].dtype == w.dtype
        if w.ndim <= 1:   # biases and BN scale/shift: d = 0 under ignore="biasbn"
            assert torch.equal(d[name], torch.zeros_like(w)), name
            continue
        for f in range(w.shape[0]):   # conv output channel / linear row
            assert torch.linalg.vector_norm(d[name][f]).item() == pytest.approx(
                torch.linalg.vector_norm(w[f]).item(), rel=1e-13, abs=0), (name, f)
            checked += 1
    assert checked == 4 + 4 + 3   # two convs with 4 output channels, a 3-row linear head


def test_filter_direction_is_the_rescaled_gaussian_draw(ref):
    """Each filter keeps the direction of its N(0, 1) draw; draws do not depend on `ignore` or `normalize`."""
    model = ref.make_model("conv")
    raw = sm.random_direction(model, generator=_gen(3), normalize=None, ignore=None)
    g = _gen(3)
    for name, p in model.named_parameters():
        assert torch.equal(raw[name], torch.randn(p.shape, generator=g, dtype=p.dtype)), name
    filt = sm.random_direction(model, generator=_gen(3))
    for name, p in model.named_parameters():
        if p.ndim >= 2:
            for f in range(p.shape[0]):
                ratio = filt[name][f] / raw[name][f]
                assert ratio.min() > 0 and torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio), rtol=1e-12)


def test_layer_normalisation_and_ignore_none(ref):
    model = ref.make_model("conv")
    params = dict(model.named_parameters())
    layer = sm.random_direction(model, generator=_gen(1), normalize="layer", ignore=None)
    for name, w in params.items():
        assert ref.l2({0: layer[name]}) == pytest.approx(ref.l2({0: w.detach()}), rel=1e-13), name
    # "filter" without ignore: a 1-D parameter counts as one filter
    filt = sm.random_direction(model, generator=_gen(1), ignore=None)
    for name, w in params.items():
        if w.ndim == 1:
            assert ref.l2({0: filt[name]}) == pytest.approx(ref.l2({0: w.detach()}), rel=1e-13), name
            assert torch.any(filt[name] != 0)


def test_zero_filter_gets_zero_direction_and_seeds_reproduce(ref):
    model = ref.make_model("conv")
    with torch.no_grad():
        model.head.weight[1].zero_()
    d = sm.random_direction(model, generator=_gen(5))
    assert torch.equal(d["head.weight"][1], torch.zeros(4, dtype=DT))
    assert torch.all(torch.isfinite(d["head.weight"]))
    again = sm.random_direction(model, generator=_gen(5))
    other = sm.random_direction(model, generator=_gen(6))
    assert all(torch.equal(d[n], again[n]) for n in d)
    assert not torch.equal(d["features.0.weight"], other["features.0.weight"])


def test_random_direction_bad_input(ref):
    model = ref.make_model("conv")
    with pytest.raises(TypeError, match="torch.Generator"):
        sm.random_direction(model, generator=0)
    with pytest.raises(ValueError, match="normalize"):
        sm.random_direction(model, generator=_gen(), normalize="filterwise")
    with pytest.raises(ValueError, match="ignore"):
        sm.random_direction(model, generator=_gen(), ignore="bias")


# -- the quadratic: every grid point in closed form ------------------------------------------------------------------
@pytest.fixture
def quadratic(ref):
    g = torch.Generator().manual_seed(11)
    n = 7
    M = torch.randn(n, n, generator=g, dtype=DT)
    A = M @ M.T / n + torch.diag(torch.linspace(-0.5, 2.0, n, dtype=DT))   # indefinite on purpose
    w0, w_star = torch.randn(n, generator=g, dtype=DT), torch.randn(n, generator=g, dtype=DT)
    model = ref.Quadratic(w0)
    batch = (torch.zeros(5, 1, dtype=DT), w_star.expand(5, n).clone())
    return model, ref.quadratic_loss(A), batch, A.numpy(), w0.numpy(), w_star.numpy()


def test_quadratic_2d_surface_closed_form_every_point(quadratic):
    model, loss_fn, batch, A, w0, w_star = quadratic
    d1 = sm.random_direction(model, generator=_gen(1), ignore=None)   # w is 1-D: one unit, ‖d1‖ = ‖w‖
    d2 = {"w": torch.linspace(-1.0, 2.0, 7, dtype=DT)}
    a, b = np.linspace(-1.5, 1.0, 6), np.array([-2.0, -0.25, 0.0, 0.7, 3.0])
    surf = sm.loss_surface(model, loss_fn, batch, [d1, d2], [a, b], bn_mode="batch")
    assert surf.losses.shape == (6, 5) and surf.accuracies is None   # targets are not class indices
    u, v = d1["w"].numpy(), d2["w"].numpy()
    r0 = w0 - w_star
    g = A @ r0
    for i, j in itertools.product(range(6), range(5)):
        expected = (0.5 * r0 @ A @ r0 + a[i] * g @ u + b[j] * g @ v
                    + 0.5 * (a[i] ** 2 * u @ A @ u + 2 * a[i] * b[j] * u @ A @ v + b[j] ** 2 * v @ A @ v))
        assert surf.losses[i, j] == pytest.approx(expected, rel=1e-12, abs=1e-12), (i, j)
    assert surf.n_passes == 30 and surf.n_samples == 5
    assert [c.tolist() for c in surf.coords] == [a.tolist(), b.tolist()]


def test_quadratic_1d_surface_and_interpolation_closed_form(quadratic):
    model, loss_fn, batch, A, w0, w_star = quadratic
    d = {"w": torch.arange(7, dtype=DT) - 3}
    alphas = np.linspace(-0.5, 1.5, 9)
    surf = sm.loss_surface(model, loss_fn, batch, [d], [alphas], bn_mode="running")
    for i, al in enumerate(alphas):
        r = w0 + al * d["w"].numpy() - w_star
        assert surf.losses[i] == pytest.approx(0.5 * r @ A @ r, rel=1e-12)
    start = {"w": torch.tensor(w0)}
    end = {"w": torch.tensor(w_star) + 0.3}
    inter = sm.interpolation(model, loss_fn, batch, start, end, alphas, bn_mode="batch")
    for i, al in enumerate(alphas):
        r = (1 - al) * w0 + al * end["w"].numpy() - w_star
        assert inter.losses[i] == pytest.approx(0.5 * r @ A @ r, rel=1e-12)
    exact = sm.interpolation(model, loss_fn, batch, start, end, [0.0, 1.0], bn_mode="batch")
    loss_at = lambda w: float(loss_fn(w.expand(5, 7), batch[1]))   # noqa: E731
    assert exact.losses.tolist() == [loss_at(start["w"]), loss_at(end["w"])]   # lerp is exact at both ends


# -- BatchNorm: batch mode, running/keep, running/recompute -------------------------------------------------------
def _naive_point(model, loss_fn, batch, shift, bn, chunks=None):
    """Deep-copy, move the weights, optionally re-estimate running statistics the ordinary torch way, evaluate."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.add_(shift[n])
        if bn == "recompute":   # torch's own cumulative average over the chunks
            for mod in m.modules():
                if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                    mod.reset_running_stats()
                    mod.momentum = None
            m.train()
            for x, _ in chunks or [batch]:
                m(x)
        if bn == "batch":
            m.train()
        else:
            m.eval()
        x, y = batch
        out = m(x)
        return float(loss_fn(out, y)), float((out.argmax(1) == y).double().mean())


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("bn", ["batch", "keep", "recompute"])
def test_bn_handling_matches_naive_model(ref, ce, kind, bn):
    model = ref.make_model(kind)
    batch = ref.make_batch(model, n=16)
    d1 = sm.random_direction(model, generator=_gen(1))
    d2 = sm.random_direction(model, generator=_gen(2), ignore=None)
    a, b = [-0.7, 0.0, 0.4], [-0.3, 0.5]
    before = ref.snapshot(model)
    bn_mode = "batch" if bn == "batch" else "running"
    surf = sm.loss_surface(model, ce, batch, [d1, d2], [a, b], bn_mode=bn_mode,
                           bn_stats="keep" if bn == "batch" else bn)
    ref.assert_same_snapshot(before, model)
    for i, j in itertools.product(range(3), range(2)):
        shift = {n: a[i] * d1[n] + b[j] * d2[n] for n in d1}
        loss, acc = _naive_point(model, ce, batch, shift, bn)
        assert surf.losses[i, j] == pytest.approx(loss, rel=1e-12), (i, j)
        assert surf.accuracies[i, j] == pytest.approx(acc, abs=1e-15)
    assert surf.bn_mode == bn_mode and surf.n_passes == 6 * (2 if bn == "recompute" else 1)


def test_recompute_differs_from_keep_and_uses_batch_statistics(ref, ce):
    """At w itself the stored statistics are not the batch's, so the two choices differ; recompute equals the
    eval-mode loss with the batch mean and unbiased variance put in every BN layer by hand (one layer here)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).to(DT)
    with torch.no_grad():
        model[1].running_mean.fill_(0.4)
        model[1].running_var.fill_(2.5)
    g = _gen(4)
    x, y = 1 + 2 * torch.randn(20, 5, generator=g, dtype=DT), torch.randint(0, 3, (20,), generator=g)
    d = sm.random_direction(model, generator=_gen(0))
    keep = sm.loss_surface(model, ce, (x, y), [d], [[0.0]], bn_mode="running")
    rec = sm.loss_surface(model, ce, (x, y), [d], [[0.0]], bn_mode="running", bn_stats="recompute")
    h = model[0](x).detach()
    m = copy.deepcopy(model).eval()
    with torch.no_grad():
        m[1].running_mean.copy_(h.mean(0))
        m[1].running_var.copy_(h.var(0, unbiased=True))
        expected = float(ce(m(x), y))
    assert rec.losses[0] == pytest.approx(expected, rel=1e-12)
    assert abs(keep.losses[0] - rec.losses[0]) > 1e-3
    assert model[1].momentum == 0.1 and model[1].running_mean[0].item() == 0.4


def test_recompute_over_chunks_is_the_cumulative_average(ref, ce):
    model = ref.make_model("conv")
    x, y = ref.make_batch(model, n=24)
    chunks = [(x[:8], y[:8]), (x[8:16], y[8:16]), (x[16:], y[16:])]
    d = sm.random_direction(model, generator=_gen(9))
    surf = sm.loss_surface(model, ce, chunks, [d], [[0.0, 0.6]], bn_mode="running", bn_stats="recompute")
    for i, al in enumerate([0.0, 0.6]):
        loss, acc = _naive_point(model, ce, (x, y), {n: al * d[n] for n in d}, "recompute", chunks)
        assert surf.losses[i] == pytest.approx(loss, rel=1e-12)
        assert surf.accuracies[i] == pytest.approx(acc, abs=1e-15)
    assert surf.n_samples == 24


def test_chunks_give_the_sample_weighted_mean(ref, ce):
    model = ref.make_model("mlp")
    x, y = ref.make_batch(model, n=23)
    d = sm.random_direction(model, generator=_gen(2))
    whole = sm.loss_surface(model, ce, (x, y), [d], [[-0.5, 0.2, 1.0]], bn_mode="running")
    chunks = [(x[:5], y[:5]), (x[5:17], y[5:17]), (x[17:], y[17:])]
    parts = sm.loss_surface(model, ce, chunks, [d], [[-0.5, 0.2, 1.0]], bn_mode="running")
    with pytest.raises(TypeError, match="one-shot iterator"):   # walked once per point: as every estimator, refused
        sm.loss_surface(model, ce, iter(chunks), [d], [[0.0]], bn_mode="running")
    np.testing.assert_allclose(parts.losses, whole.losses, rtol=1e-13)
    np.testing.assert_allclose(parts.accuracies, whole.accuracies, rtol=1e-15)


def test_batch_mode_recompute_rejected_and_no_bn_model_recompute_is_keep(ref, ce):
    model = ref.make_model("mlp")
    batch = ref.make_batch(model)
    d = sm.random_direction(model, generator=_gen())
    with pytest.raises(ValueError, match="only applies to bn_mode='running'"):
        sm.loss_surface(model, ce, batch, [d], [[0.0]], bn_mode="batch", bn_stats="recompute")
    with pytest.raises(ValueError, match="bn_stats"):
        sm.loss_surface(model, ce, batch, [d], [[0.0]], bn_mode="running", bn_stats="fresh")
    plain = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    dp = sm.random_direction(plain, generator=_gen())
    keep = sm.loss_surface(plain, ce, batch, [dp], [[0.3, 1.0]], bn_mode="running")
    rec = sm.loss_surface(plain, ce, batch, [dp], [[0.3, 1.0]], bn_mode="running", bn_stats="recompute")
    assert keep.losses.tolist() == rec.losses.tolist() and rec.n_passes == 2


def test_interpolation_bn_modes_match_naive(ref, ce):
    model = ref.make_model("conv")
    batch = ref.make_batch(model)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    end = {n: p + 0.5 * torch.randn(p.shape, generator=_gen(8), dtype=DT) for n, p in start.items()}
    before = ref.snapshot(model)
    for bn in ("batch", "keep", "recompute"):
        inter = sm.interpolation(model, ce, batch, start, end, [0.0, 0.3, 1.0],
                                 bn_mode="batch" if bn == "batch" else "running",
                                 bn_stats="keep" if bn == "batch" else bn)
        for i, al in enumerate([0.0, 0.3, 1.0]):
            loss, _ = _naive_point(model, ce, batch, {n: torch.lerp(start[n], end[n], al) - start[n]
                                                      for n in start}, bn)
            assert inter.losses[i] == pytest.approx(loss, rel=1e-12), (bn, al)
    ref.assert_same_snapshot(before, model)


# -- restoration and bad input -----------------------------------------------------------------------------------
def test_model_restored_bit_for_bit_even_when_interrupted(ref, ce):
    model = ref.make_model("conv")
    model.features[1].momentum = None   # an unusual setting must survive the momentum-1 statistics pass
    model.eval()
    model.features.train()              # mixed flags
    batch = ref.make_batch(model)
    d = sm.random_direction(model, generator=_gen())
    before = ref.snapshot(model)
    momenta = [m.momentum for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def stop(done, total):
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sm.loss_surface(model, ce, batch, [d], [[0.0, 0.5, 1.0]], bn_mode="running", bn_stats="recompute",
                        progress=stop)
    ref.assert_same_snapshot(before, model)
    assert [m.momentum for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] == momenta
    sm.loss_surface(model, ce, batch, [d, d], [[0.0, 1.0], [0.5]], bn_mode="batch")
    ref.assert_same_snapshot(before, model)


def test_surface_bad_input(ref, ce):
    model = ref.make_model("mlp")
    batch = ref.make_batch(model)
    d = sm.random_direction(model, generator=_gen())
    with pytest.raises(ValueError, match="one or two"):
        sm.loss_surface(model, ce, batch, [d, d, d], [[0.0]] * 3, bn_mode="batch")
    with pytest.raises(ValueError, match="one or two"):
        sm.loss_surface(model, ce, batch, d, [[0.0]], bn_mode="batch")
    with pytest.raises(ValueError, match="list of 2"):
        sm.loss_surface(model, ce, batch, [d, d], [[0.0]], bn_mode="batch")
    with pytest.raises(ValueError, match="non-finite"):
        sm.loss_surface(model, ce, batch, [d], [[0.0, float("nan")]], bn_mode="batch")
    with pytest.raises(ValueError, match="non-empty"):
        sm.loss_surface(model, ce, batch, [d], [[]], bn_mode="batch")
    with pytest.raises(ValueError, match="iterable of batches is empty"):
        sm.loss_surface(model, ce, [], [d], [[0.0]], bn_mode="batch")
    with pytest.raises(TypeError, match="iterable"):
        sm.loss_surface(model, ce, 3, [d], [[0.0]], bn_mode="batch")
    with pytest.raises(ValueError, match="missing keys"):
        sm.loss_surface(model, ce, batch, [{k: v for k, v in list(d.items())[1:]}], [[0.0]], bn_mode="batch")
    with pytest.raises(ValueError, match="bn_mode"):
        sm.loss_surface(model, ce, batch, [d], [[0.0]], bn_mode="eval")
    with pytest.raises(ValueError, match="does not match"):
        sm.interpolation(model, ce, batch, {"w": torch.zeros(1)}, d, [0.0], bn_mode="batch")
