"""Tests for experiments/models.py (the model registry) and the "scratch-fn" norm kind of experiments/normalization.py.

Tiny batches on CPU only: every (model, norm) pair is built for its input shape and run forward and backward once.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from experiments.models import MODELS, ConvNet, build_model
from experiments.normalization import NORMS, BatchNorm, FunctionalBatchNorm, make_norm

INPUT_SHAPES = {"convnet": (1, 28, 28), "mlp": (1, 28, 28), "lenet5": (3, 32, 32), "resmlp": (1, 40),
                "vgg11": (3, 32, 32), "fc-tanh": (1, 28, 28)}
BN_KINDS = ("torch", "scratch", "scratch-fn", "noisy")  # the BatchNorm kinds (batch statistics in train mode)


def _shape(name: str) -> tuple:
    return INPUT_SHAPES[name.removeprefix("bn-")]


def test_every_model_has_a_known_input_shape():
    assert {name.removeprefix("bn-") for name in MODELS} == set(INPUT_SHAPES)


# "bn-X" with an explicit norm builds exactly "X" with that norm, so the bn- names run with their default only
CASES = [(name, norm) for name in MODELS for norm in NORMS
         if not name.startswith("bn-") or norm == MODELS[name].default_norm]


@pytest.mark.parametrize("name, norm", CASES)
def test_every_model_builds_and_trains_with_every_norm(name, norm):
    torch.manual_seed(0)
    model = build_model(name, norm=norm, input_shape=_shape(name), num_classes=10).train()
    x = torch.randn(2, *_shape(name))
    out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    nn.functional.cross_entropy(out, torch.tensor([0, 1])).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    model.eval()
    with torch.no_grad():
        assert model(x[:1]).shape == (1, 10)  # eval mode: a batch of one is fine for every norm


def test_default_norms():
    for name, spec in MODELS.items():
        assert spec.default_norm == ("torch" if name.startswith("bn-") else "none"), name


def test_fc_tanh_is_cohens_network():
    # locuslab/edge-of-stability archs.py, fc-tanh: widths [200, 200], tanh, bias, torch's default init
    model = build_model("fc-tanh")
    assert [type(m) for m in model.net] == [nn.Flatten, nn.Linear, nn.Tanh, nn.Identity, nn.Linear, nn.Tanh,
                                            nn.Identity, nn.Linear]
    assert sum(p.numel() for p in model.parameters()) == 784 * 200 + 200 + 200 * 200 + 200 + 200 * 10 + 10


def test_convnet_matches_seed_architecture():
    # seed 003: conv1 16·1·5·5 + 16, conv2 32·16·5·5 + 32, fc 7·7·32·10 + 10
    expected = (16 * 1 * 25 + 16) + (32 * 16 * 25 + 32) + (7 * 7 * 32 * 10 + 10)
    assert expected == 28_938
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(build_model("convnet")) == 28_938
    assert count(build_model("bn-convnet")) == 28_938 + 2 * (16 + 32)  # BN weight and bias per channel
    plain = [type(m) for m in build_model("convnet").features]
    assert plain == [nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.Identity, nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.Identity]
    bn = build_model("bn-convnet")
    assert [type(m) for m in bn.features] == [nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.BatchNorm2d,
                                              nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.BatchNorm2d]
    conv1, conv2 = bn.features[0], bn.features[4]
    assert (conv1.in_channels, conv1.out_channels, conv1.kernel_size, conv1.padding) == (1, 16, (5, 5), (2, 2))
    assert (conv2.in_channels, conv2.out_channels, conv2.kernel_size, conv2.padding) == (16, 32, (5, 5), (2, 2))
    assert bn.features[3].num_features == 16 and bn.features[7].num_features == 32
    assert (bn.classifier.in_features, bn.classifier.out_features) == (7 * 7 * 32, 10)
    assert isinstance(ConvNet("scratch").features[3], BatchNorm)


@pytest.mark.parametrize("name, shape, expected, got", [
    ("convnet", (1, 32, 32), "(28, 28)", "(32, 32)"),
    ("lenet5", (1, 28, 28), "(3, 32, 32)", "(1, 28, 28)"),
    ("vgg11", (1, 28, 28), "(3, 32, 32)", "(1, 28, 28)"),
])
def test_wrong_input_shape_names_expected_and_got(name, shape, expected, got):
    with pytest.raises(ValueError) as e:
        build_model(name, input_shape=shape)
    message = str(e.value)
    assert name in message and f"expects inputs of shape {expected}" in message and f"got {got}" in message


def test_unknown_model_lists_choices():
    with pytest.raises(ValueError) as e:
        build_model("resnet50")
    assert str(e.value) == f"unknown model 'resnet50'; choose one of: {', '.join(MODELS)}"


@pytest.mark.parametrize("kind", BN_KINDS)
def test_batch_of_one_in_train_mode_behaves_like_torch(kind):
    """(N, C) with N = 1: one value per channel, torch raises ValueError; (1, C, H, W) has H·W values: no error."""
    mlp = build_model("mlp", norm=kind).train()
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        mlp(torch.randn(1, 1, 28, 28))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        nn.BatchNorm1d(50).train()(torch.randn(1, 50))  # the torch behaviour being matched
    assert build_model("convnet", norm=kind).train()(torch.randn(1, 1, 28, 28)).shape == (1, 10)


# ---------------------------------------------------------------------------------------------------------------
# "scratch-fn": the seed's functional BatchNorm as a layer

def test_scratch_fn_is_registered():
    assert NORMS["scratch-fn"] is not None
    layer = make_norm("scratch-fn", 5, 2)
    assert type(layer) is FunctionalBatchNorm and layer.num_features == 5


@pytest.mark.parametrize("shape, torch_cls", [((8, 5), nn.BatchNorm1d), ((8, 5, 3), nn.BatchNorm1d),
                                              ((4, 5, 3, 3), nn.BatchNorm2d)])
def test_scratch_fn_matches_torch(shape, torch_cls):
    torch.manual_seed(0)
    ours, ref = FunctionalBatchNorm(5).double(), torch_cls(5).double()
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.uniform_(-0.5, 0.5)
    ref.load_state_dict(ours.state_dict())  # same names and shapes: strict load works both ways
    for _ in range(3):  # train mode: outputs, input and parameter gradients, running statistics
        x = (3 * torch.randn(shape, dtype=torch.float64) + 1).requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        y, y_ref = ours(x), ref(x_ref)
        torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-10)
        g = torch.randn_like(y)
        y.backward(g)
        y_ref.backward(g)
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-10)
        torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=0, atol=1e-10)
        torch.testing.assert_close(ours.bias.grad, ref.bias.grad, rtol=0, atol=1e-10)
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=0, atol=1e-12)
    assert int(ours.num_batches_tracked) == 3
    ours.eval(), ref.eval()
    x = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-10)
    FunctionalBatchNorm(5).double().load_state_dict(ref.state_dict())


def test_mlp_bn_variants_of_the_seed_agree():
    """Seed 000's comparison: functional scratch, module scratch and torch BN give the same network."""
    x, y = torch.randn(16, 1, 28, 28), torch.randint(10, (16,))
    outs, grads = [], []
    for norm in ("scratch-fn", "scratch", "torch"):
        torch.manual_seed(0)
        model = build_model("mlp", norm=norm, naive_init=True).train()
        out = model(x)
        nn.functional.cross_entropy(out, y).backward()
        outs.append(out.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    for out, grad in zip(outs[1:], grads[1:]):
        torch.testing.assert_close(out, outs[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad, grads[0], rtol=1e-4, atol=1e-4)
