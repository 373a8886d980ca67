"""Non-finite networks: an error naming the layer for measurements, NaN per path for the regulariser's surrogate."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_spacefold import NonFiniteError, SpaceFolding, path_folding, path_patterns, soft_folding
from lightning_spacefold.finite import finite_sum, output_sum


class PoisonAbove(nn.Module):
    """Identity, except that points whose first input coordinate is above ``threshold`` become NaN."""

    def __init__(self, threshold: float) -> None:
        super().__init__()
        self.threshold = threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.where(x[:, :1] <= self.threshold, torch.nan)


def tent(poison: nn.Module | None = None) -> nn.Sequential:
    """The 1-D tent of ``test_folding``: along 0 -> 1 the pattern walks 00, 10, 11, 01 (chi = 1/4)."""
    model = nn.Sequential(nn.Linear(1, 2), nn.ReLU(), poison or nn.Identity(), nn.Linear(2, 1), nn.ReLU())
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0], [1.0]]))
        model[0].bias.copy_(torch.tensor([-0.3, -0.7]))
        model[3].weight.copy_(torch.tensor([[1.0, -3.0]]))
        model[3].bias.copy_(torch.tensor([-0.1]))
    return model


def test_a_healthy_tent_is_measured() -> None:
    # The reference for the tests below: the same network measures chi = 1/4 while it is finite.
    result = path_folding(tent(PoisonAbove(2.0)), torch.tensor([[0.0]]), torch.tensor([[1.0]]), steps=16)
    assert result.chi.tolist() == [0.25]


@pytest.mark.parametrize("exact", [False, True])
def test_nan_weights_name_the_first_layer_they_reach(exact: bool) -> None:
    model = tent()
    with torch.no_grad():
        model[3].weight[0, 1] = torch.nan
    with pytest.raises(NonFiniteError, match=r"fed layer '4' NaN or infinite.*non-finite values.*diverged"):
        path_folding(model, torch.tensor([[0.0]]), torch.tensor([[1.0]]), steps=16, exact=exact)


@pytest.mark.parametrize("exact", [False, True])
def test_an_infinite_output_alone_names_the_output(exact: bool) -> None:
    model = nn.Sequential(tent(), nn.Linear(1, 1))
    with torch.no_grad():
        model[1].weight.fill_(torch.inf)
        model[1].bias.fill_(0.0)
    # The tent's output is 0 at t = 0 (inf * 0 = NaN) and positive inside: the output alone is not finite.
    with pytest.raises(NonFiniteError, match="returned NaN or infinite values"):
        path_folding(model, torch.tensor([[0.0]]), torch.tensor([[1.0]]), steps=16, exact=exact)


def test_a_path_into_a_non_finite_region_fails_the_whole_measurement() -> None:
    model = tent(PoisonAbove(2.0))
    starts, ends = torch.tensor([[0.0], [0.0]]), torch.tensor([[1.0], [3.0]])
    with pytest.raises(NonFiniteError, match="fed layer '4'"):
        path_folding(model, starts, ends, steps=16)
    with pytest.raises(NonFiniteError, match="fed layer '4'"):
        path_folding(model, starts, ends, steps=16, batch_size=17)  # the bad path in a later forward pass
    with pytest.raises(NonFiniteError, match="fed layer '4'"):
        path_patterns(model, starts, ends, steps=16)
    metric = SpaceFolding(steps=16)
    with pytest.raises(NonFiniteError, match="fed layer '4'"):
        metric.update(model, starts, ends)
    metric.update(model, starts[:1], ends[:1])  # the failed update left nothing behind
    assert metric.compute()["folding"].item() == 0.25


def test_overflow_in_a_narrow_dtype_says_so() -> None:
    model = nn.Sequential(nn.Linear(1, 1), nn.ReLU(), nn.Linear(1, 1), nn.ReLU()).to(torch.float16)
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.weight.fill_(300.0)
            layer.bias.fill_(0.0)
    # 300 * 300 * x overflows float16 (largest 65504) for x > 0.73; the first layer stays finite.
    starts, ends = torch.tensor([[0.0]], dtype=torch.float16), torch.tensor([[1.0]], dtype=torch.float16)
    with pytest.raises(NonFiniteError, match=r"fed layer '3'.*overflowed in torch\.float16"):
        path_folding(model, starts, ends, steps=8)
    assert path_folding(model.double(), starts.double(), ends.double(), steps=8).chi.tolist() == [0.0]


def test_soft_folding_is_nan_exactly_for_the_paths_through_non_finite_values() -> None:
    model = tent(PoisonAbove(2.0))
    starts, ends = torch.tensor([[0.0], [0.0], [1.0]]), torch.tensor([[1.0], [3.0], [0.0]])
    chi = soft_folding(model, starts, ends, steps=16)
    assert torch.isnan(chi).tolist() == [False, True, False]
    healthy = soft_folding(model, starts[[0, 2]], ends[[0, 2]], steps=16)
    assert chi[[0, 2]].tolist() == healthy.tolist()
    # Close to the hard values of these two paths, 1/4 and 1/2.
    torch.testing.assert_close(healthy, torch.tensor([0.25, 0.5]), atol=0.03, rtol=0)


def test_finite_sum_is_not_fooled_by_a_narrow_dtype() -> None:
    assert torch.isfinite(finite_sum(torch.full((100,), 60000.0, dtype=torch.float16)))  # 6e6 > float16's max
    assert torch.isnan(finite_sum(torch.tensor([1.0, torch.nan, 2.0])))
    assert torch.isinf(finite_sum(torch.tensor([1.0, -torch.inf])))
    output = {"logits": torch.tensor([1.0, 2.0]), "extra": (torch.tensor([torch.inf]), torch.tensor([3]))}
    assert torch.isinf(output_sum(output))
    assert output_sum({"ids": torch.tensor([1, 2])}) is None
