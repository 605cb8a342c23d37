"""experiments.losses: the square loss is Cohen et al.'s, and every loss takes mean and sum reductions."""
import pytest
import torch
import torch.nn.functional as F

from experiments.losses import LOSSES, get_loss, squared_error


def test_squared_error_is_half_the_squared_distance_to_the_one_hot_target():
    out = torch.tensor([[0.5, -1.0, 2.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([2, 0])
    per_example = [0.5 * (0.5 ** 2 + 1.0 ** 2 + 1.0 ** 2), 0.5 * 1.0]
    assert float(squared_error(out, y)) == pytest.approx(sum(per_example) / 2)
    assert float(squared_error(out, y, reduction="sum")) == pytest.approx(sum(per_example))
    with pytest.raises(ValueError, match="reduction must be"):
        squared_error(out, y, reduction="none")


@pytest.mark.parametrize("name", list(LOSSES))
def test_sum_is_n_times_mean(name):
    g = torch.Generator().manual_seed(0)
    out, y = torch.randn(7, 10, generator=g, dtype=torch.float64), torch.randint(0, 10, (7,), generator=g)
    fn = get_loss(name)
    assert float(fn(out, y, reduction="sum")) == pytest.approx(7 * float(fn(out, y)))


def test_registry():
    assert get_loss("cross-entropy") is F.cross_entropy
    with pytest.raises(ValueError, match="unknown loss 'hinge' \\(--loss\\); choose one of: cross-entropy, mse"):
        get_loss("hinge")
