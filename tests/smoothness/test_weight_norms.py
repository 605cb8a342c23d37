"""Weight-norm baselines against brute force: path enumeration, torch.linalg.matrix_norm, an explicit difference."""
import copy
import itertools
import math

import pytest
import torch
from torch import nn

import smoothness as sm

DT = torch.float64


def tiny_relu_mlp(bn: bool):
    torch.manual_seed(0)
    layers = [nn.Linear(3, 4)] + ([nn.BatchNorm1d(4)] if bn else []) + [nn.ReLU(), nn.Linear(4, 2)]
    model = nn.Sequential(*layers).to(DT)
    if bn:
        with torch.no_grad():
            model[1].weight.copy_(torch.tensor([1.5, -0.7, 0.3, 2.0], dtype=DT))
            model[1].bias.copy_(torch.tensor([0.2, -0.4, 0.1, 0.5], dtype=DT))
            model[1].running_mean.copy_(torch.tensor([0.3, -1.0, 0.5, 2.0], dtype=DT))
            model[1].running_var.copy_(torch.tensor([0.5, 2.0, 1.5, 0.8], dtype=DT))
    return model


def brute_force_path_norm(model, bn: bool) -> float:
    """Σ over every path (input or bias unit → … → output) of the product of its squared weights."""
    w1, b1, w2, b2 = (t.detach() for t in (model[0].weight, model[0].bias, model[-1].weight, model[-1].bias))
    if bn:  # eval-mode BN is the diagonal affine map x -> a·x + c, one more layer of paths
        m = model[1]
        a = m.weight.detach() / torch.sqrt(m.running_var + m.eps)
        c = m.bias.detach() - a * m.running_mean
    else:
        a, c = torch.ones(4, dtype=DT), torch.zeros(4, dtype=DT)
    total = 0.0
    for i, j, k in itertools.product(range(3), range(4), range(2)):   # input i → hidden j → output k
        total += float(w1[j, i] ** 2 * a[j] ** 2 * w2[k, j] ** 2)
    for j, k in itertools.product(range(4), range(2)):
        total += float(b1[j] ** 2 * a[j] ** 2 * w2[k, j] ** 2)   # first bias → hidden j → output k
        total += float(c[j] ** 2 * w2[k, j] ** 2)                 # BN shift of unit j → output k
    total += float((b2 ** 2).sum())
    return total


@pytest.mark.parametrize("bn", [False, True])
def test_path_norm_against_path_enumeration(ref, bn):
    model = tiny_relu_mlp(bn).train()
    before = ref.snapshot(model)
    out = sm.path_norm(model, (3,))
    expected = brute_force_path_norm(model, bn)
    assert out.squared == pytest.approx(expected, rel=1e-12)
    assert out.value == pytest.approx(math.sqrt(expected), rel=1e-12)
    assert out.input_shape == (3,)
    ref.assert_same_snapshot(before, model)


def test_path_norm_refuses_normalisation_without_running_statistics():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"1 \(LayerNorm\)"):
        sm.path_norm(model, (3,))


def test_spectral_product_against_matrix_norm(ref):
    model = ref.make_model("conv")
    out = sm.spectral_product(model)
    assert out.layers == ("features.0.weight", "features.4.weight", "head.weight")
    params = dict(model.named_parameters())
    norms = [float(torch.linalg.matrix_norm(params[n].detach().flatten(1), ord=2)) for n in out.layers]
    assert out.norms == pytest.approx(norms, rel=1e-12)
    assert out.value == pytest.approx(math.prod(norms), rel=1e-12)
    assert out.log_value == pytest.approx(sum(math.log(v) for v in norms), rel=1e-12)


def test_distance_to_init(ref):
    model = ref.make_model("mlp")
    init = copy.deepcopy(model.state_dict())
    assert sm.distance_to_init(model, init).value == 0.0
    with torch.no_grad():
        model.net[0].weight[0, 0] += 3.0
        model.net[-1].bias[1] -= 4.0
    out = sm.distance_to_init(model, init)
    assert out.value == pytest.approx(5.0, rel=1e-12)
    assert out.n_params == sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match="lacks the parameters"):
        sm.distance_to_init(model, {})


@pytest.mark.parametrize("final", [nn.LogSoftmax(dim=1), nn.Softmax(dim=1)])
def test_path_norm_of_a_network_ending_in_softmax_is_that_of_its_logits(ref, final):
    logits = tiny_relu_mlp(bn=True)
    model = nn.Sequential(copy.deepcopy(logits), final)
    before = ref.snapshot(model)
    out = sm.path_norm(model, (3,))
    assert out.squared == pytest.approx(brute_force_path_norm(logits, bn=True), rel=1e-12)
    assert out.dropped == f"1 ({type(final).__name__})"
    assert sm.path_norm(logits, (3,)).dropped is None
    ref.assert_same_snapshot(before, model)


def test_path_norm_refuses_a_functional_log_softmax():
    class FunctionalLogSoftmax(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = tiny_relu_mlp(bn=False)

        def forward(self, x):
            return torch.log_softmax(self.net(x), dim=1)

    with pytest.raises(ValueError, match="not a path sum on its logits"):
        sm.path_norm(FunctionalLogSoftmax(), (3,))
