"""internal_covariate_shift (Santurkar Fig. 3/5): G vs G′ after the earlier layers took their SGD step."""
import math

import pytest
import torch
from torch import nn

import smoothness as sm

MLP_LAYERS = ["net.0", "net.1", "net.3", "net.4", "net.6"]
MLP_PARAMS = [("net.0.weight",), ("net.1.weight", "net.1.bias"), ("net.3.weight", "net.3.bias"),
              ("net.4.weight", "net.4.bias"), ("net.6.weight", "net.6.bias")]
CONV_LAYERS = ["features.0", "features.1", "features.4", "features.5", "head"]


@pytest.fixture(params=["mlp", "conv"])
def net(request, ref):
    kind = request.param
    model = ref.make_model(kind, freeze=True) if kind == "mlp" else ref.make_model(kind)
    return kind, model, nn.CrossEntropyLoss(), ref.make_batch(model, n=12)


def test_layer_names_and_order(net):
    kind, model, loss_fn, batch = net
    out = sm.internal_covariate_shift(model, loss_fn, batch, lr=0.1)
    names = [s.layer for s in out.layers]
    assert names == (MLP_LAYERS if kind == "mlp" else CONV_LAYERS)
    if kind == "mlp":  # the frozen bias of net.0 is not part of the layer
        assert [s.parameters for s in out.layers] == MLP_PARAMS
    assert out.lr == 0.1 and out.bn_mode == "batch"
    assert list(out.as_dict()) == names
    assert out.as_dict()[names[1]] == {"grad_diff_norm": out.layers[1].grad_diff_norm,
                                       "cosine": out.layers[1].cosine}


@pytest.mark.parametrize("bn_mode", sm.BN_MODES)
def test_lr_zero_means_no_shift(net, bn_mode):
    _, model, loss_fn, batch = net
    out = sm.internal_covariate_shift(model, loss_fn, batch, lr=0, bn_mode=bn_mode)
    assert len(out.layers) == 5
    for s in out.layers:
        assert s.grad_diff_norm == pytest.approx(0.0, abs=1e-12), s.layer
        assert s.cosine == pytest.approx(1.0, abs=1e-12), s.layer


@pytest.mark.parametrize("bn_mode", sm.BN_MODES)
def test_positive_lr_shifts_later_layers_only(net, bn_mode):
    _, model, loss_fn, batch = net
    out = sm.internal_covariate_shift(model, loss_fn, batch, lr=0.5, bn_mode=bn_mode)
    first, *later = out.layers
    assert first.grad_diff_norm == 0.0
    assert first.cosine == pytest.approx(1.0, abs=1e-12)
    for s in later:
        assert s.grad_diff_norm > 1e-6, s.layer
        assert s.cosine < 1 - 1e-9, s.layer
        assert -1.0 <= s.cosine <= 1.0
    # more movement upstream -> more shift (monotone in lr for a small step on this net)
    small = sm.internal_covariate_shift(model, loss_fn, batch, lr=0.01, bn_mode=bn_mode)
    assert small.layers[-1].grad_diff_norm < out.layers[-1].grad_diff_norm


@pytest.mark.parametrize("bn_mode", sm.BN_MODES)
def test_matches_naive_reference(ref, net, bn_mode):
    _, model, loss_fn, batch = net
    lr = 0.3
    out = sm.internal_covariate_shift(model, loss_fn, batch, lr=lr, bn_mode=bn_mode)
    _, grad = ref.naive_loss_grad(model, loss_fn, batch, bn_mode)
    earlier = []
    for s in out.layers:
        shift = {n: (-grad[n] if n in earlier else torch.zeros_like(grad[n])) for n in grad}
        _, g_prime = ref.naive_loss_grad(model, loss_fn, batch, bn_mode, shift=shift, s=lr)
        G = torch.cat([grad[n].reshape(-1) for n in s.parameters])
        Gp = torch.cat([g_prime[n].reshape(-1) for n in s.parameters])
        assert s.grad_diff_norm == pytest.approx(float((G - Gp).norm()), rel=1e-9, abs=1e-14)
        assert s.cosine == pytest.approx(float(G @ Gp / (G.norm() * Gp.norm())), rel=1e-10)
        earlier.extend(s.parameters)


@pytest.mark.parametrize("lr", [-0.1, float("nan"), float("inf"), "0.1", None])
def test_bad_lr(ref, lr):
    model = ref.make_model("mlp")
    with pytest.raises(ValueError, match="lr must be"):
        sm.internal_covariate_shift(model, nn.CrossEntropyLoss(), ref.make_batch(model), lr=lr)


def test_result_fields_are_finite(net):
    _, model, loss_fn, batch = net
    out = sm.internal_covariate_shift(model, loss_fn, batch, lr=0.1)
    assert all(math.isfinite(s.grad_diff_norm) and math.isfinite(s.cosine) for s in out.layers)
