"""`forward=` functions: found layers are reused per forward, a failed discovery leaves nothing behind, and the
callback takes callables for `embedding_fn` and `forward_fn`."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_spacefold import SpaceFoldingCallback, path_folding
from lightning_spacefold.folding import _KNOWN_LAYERS
from tests.test_callback import trainer


def tent() -> nn.Module:
    """a = relu(x), b = relu(x - 1), c = relu(a - 2 b - 0.5) (on for 0.5 < x < 1.5): chi = 1/3 from 0.25 to 1.75."""
    model = nn.Sequential(nn.Linear(1, 2), nn.ReLU(), nn.Linear(2, 1), nn.ReLU())
    nn.utils.vector_to_parameters(torch.tensor([1.0, 1.0, 0.0, -1.0, 1.0, -2.0, -0.5]), model.parameters())
    return model


STARTS, ENDS = torch.tensor([[0.25]]), torch.tensor([[1.75]])


@pytest.mark.parametrize("forward", [lambda points: None, lambda points: points * 2])
def test_a_forward_that_runs_no_layer_does_not_poison_the_next_call(forward) -> None:
    model = tent()
    with pytest.raises(ValueError, match=r"`forward` ran none of the model's activation layers \(the model has 1, 3\)"):
        path_folding(model, STARTS, ENDS, steps=3, forward=forward)
    assert model not in _KNOWN_LAYERS
    assert path_folding(model, STARTS, ENDS, steps=3).chi.item() == pytest.approx(1 / 3)


def test_a_model_without_activations_is_named_as_such() -> None:
    with pytest.raises(ValueError, match=r"No supported activation found in the model \(its modules: Linear\)"):
        path_folding(nn.Linear(1, 1), STARTS, ENDS, steps=3, forward=lambda points: points)


def test_two_forwards_in_turn_on_one_model() -> None:
    model = tent()

    def first_layer_only(points: torch.Tensor) -> torch.Tensor:
        return model[1](model[0](points))

    def whole(points: torch.Tensor) -> torch.Tensor:
        return model(points)

    for _ in range(2):
        # The first layer's bits (a, b) switch once each; the whole network folds on c.
        partial = path_folding(model, STARTS, ENDS, steps=3, forward=first_layer_only)
        assert partial.layer_names == ["1"] and partial.chi.item() == 0.0
        full = path_folding(model, STARTS, ENDS, steps=3, forward=whole)
        assert full.layer_names == ["1", "3"] and full.chi.item() == pytest.approx(1 / 3)


class Tokens(pl.LightningModule):
    """Three tokens embedded at 0.25, 1.75 and 0.4 on the line through the tent."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Embedding(3, 1)
        self.tent = tent()
        with torch.no_grad():
            self.table.weight.copy_(torch.tensor([[0.25], [1.75], [0.4]]))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tent(self.table(tokens).squeeze(1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _index: int) -> torch.Tensor:
        return self(batch[0]).square().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def embed(module: Tokens, tokens: torch.Tensor) -> torch.Tensor:
    return module.table(tokens).squeeze(1)


def run_tent(module: Tokens, points: torch.Tensor) -> torch.Tensor:
    return module.tent(points)


def test_the_callback_takes_callables(tmp_path: Path) -> None:
    tokens = torch.tensor([[0], [1], [2]])
    callback = SpaceFoldingCallback(
        every_n_train_steps=1,
        num_pairs=6,
        steps=3,
        pairing="class",
        include_same_class=False,
        probe_dataset=TensorDataset(tokens, torch.tensor([0, 1, 2])),
        embedding_fn=embed,
        forward_fn=run_tent,
        log_figures=False,
    )
    loader = DataLoader(TensorDataset(tokens, torch.tensor([0, 1, 2])), batch_size=3)
    trainer(tmp_path, callback, max_steps=2).fit(Tokens(), loader)
    result = callback.latest_result
    # The six ordered pairs of tokens at 4 points each: every path across c's interval (0.5, 1.5) samples the
    # patterns 100, 101, 111, 110 or their reverse (chi = 1/3); 0.25 <-> 0.4 stays in one region.
    assert sorted(result.chi.tolist()) == pytest.approx([0.0] * 2 + [1 / 3] * 4)
    # The checkpoint key names the function, not its address: a resumed run finds the callback's state.
    assert "test_forward_functions.embed" in callback.state_key and " at 0x" not in callback.state_key
