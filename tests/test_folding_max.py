"""The maximal folding over a walk's prefixes, chi_max (specification, section 4), everywhere chi is."""

from __future__ import annotations

from fractions import Fraction

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_spacefold import (
    SpaceFolding,
    SpaceFoldingCallback,
    fold_measure,
    folding,
    max_fold_measure,
    path_folding,
    path_patterns,
)
from lightning_spacefold.exact import _segment_cummax, _segment_cumsum
from lightning_spacefold.measure import prefix_folding, step_distances
from tests.test_callback import trainer


def reference_max(walk: list[str]) -> Fraction:
    """chi_max of a walk of bit strings, by the definition, with exact fractions."""
    best = Fraction(0)
    for j in range(1, len(walk)):
        r1 = max(sum(a != b for a, b in zip(walk[0], walk[i], strict=True)) for i in range(j + 1))
        r2 = sum(sum(a != b for a, b in zip(walk[i], walk[i + 1], strict=True)) for i in range(j))
        if r2:
            best = max(best, 1 - Fraction(r1, r2))
    return best


def as_patterns(walk: list[str]) -> torch.Tensor:
    return torch.tensor([[int(bit) for bit in pattern] for pattern in walk])


@pytest.mark.parametrize(
    ("walk", "chi", "chi_max"),
    [
        # The specification's example: chi_j = 0, 1/2, 2/3, 1/2.
        (["00", "10", "00", "01", "11"], 0.5, 2 / 3),
        # Section 2's examples, whose maximum is at the end.
        (["0000", "1100", "0011"], 2 / 3, 2 / 3),
        (["000", "100", "110", "010", "011", "001", "000"], 2 / 3, 2 / 3),
        (["000", "100", "110", "111"], 0.0, 0.0),
        (["00", "10", "01"], 2 / 3, 2 / 3),
        # Folds early, then walks straight away: chi_j = 0, 1/2, 2/3, 1/2, 2/5.
        (["0000", "1000", "0000", "0100", "0110", "0111"], 0.4, 2 / 3),
        (["01", "01", "01"], 0.0, 0.0),
    ],
)
def test_worked_examples(walk: list[str], chi: float, chi_max: float) -> None:
    patterns = as_patterns(walk)
    assert float(reference_max(walk)) == pytest.approx(chi_max)
    assert max_fold_measure(patterns).item() == pytest.approx(chi_max)
    assert fold_measure(patterns).item() == pytest.approx(chi)


def test_prefix_folding_continues_a_walk_from_its_range_and_length() -> None:
    # 00, 10, 00 | 01, 11 fed in two chunks: the second chunk's prefixes continue from r1 = 1, r2 = 2.
    whole = prefix_folding(torch.tensor([0, 1, 0, 1, 2]), torch.tensor([0, 1, 1, 1, 1]))
    torch.testing.assert_close(whole, torch.tensor([0.0, 0.0, 0.5, 2 / 3, 0.5]))
    second = prefix_folding(torch.tensor([1, 2]), torch.tensor([1, 1]), torch.tensor(1), torch.tensor(2))
    torch.testing.assert_close(second, whole[3:])


def test_batched_random_walks_against_the_definition() -> None:
    generator = torch.Generator().manual_seed(0)
    # Few units and sticky steps, so that walks fold and return.
    patterns = torch.rand(40, 12, 3, generator=generator) < 0.5
    patterns[:, 1::2] = patterns[:, :-1:2]  # repeated patterns change nothing
    expected = torch.tensor(
        [float(reference_max(["".join(str(int(b)) for b in row) for row in walk])) for walk in patterns]
    )
    torch.testing.assert_close(max_fold_measure(patterns), expected)
    assert bool((max_fold_measure(patterns) >= fold_measure(patterns)).all())
    assert bool(((max_fold_measure(patterns) > 0) == (fold_measure(patterns) > 0)).all())
    assert 0 < int((max_fold_measure(patterns) > fold_measure(patterns)).sum()) < len(patterns)


def test_segment_running_values_by_hand() -> None:
    # Three paths' rows: [3, 1 | 2 | 0, 5, 4].
    values = torch.tensor([[3], [1], [2], [0], [5], [4]])
    first = torch.tensor([True, False, True, True, False, False])
    torch.testing.assert_close(_segment_cumsum(values, first), torch.tensor([[3], [4], [2], [0], [5], [9]]))
    segment = first.cumsum(0) - 1
    torch.testing.assert_close(_segment_cummax(values, segment), torch.tensor([[3], [3], [2], [0], [5], [5]]))


def staircase() -> nn.Module:
    """a = relu(x), b = relu(x - 1), c_k = relu(x - 3 - k / 20) (k = 0..3), then e = relu(a - 2 b - 0.5).

    e is on for 0.5 < x < 1.5 only; along x = 0.25 .. 3.75 the walk folds back on e, then walks straight away on the
    four c units.
    """
    model = nn.Sequential(nn.Linear(1, 6), nn.ReLU(), nn.Linear(6, 1), nn.ReLU())
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].bias.copy_(torch.tensor([0.0, -1.0, -3.0, -3.05, -3.1, -3.15]))
        model[2].weight.copy_(torch.tensor([[1.0, -2.0, 0.0, 0.0, 0.0, 0.0]]))
        model[2].bias.fill_(-0.5)
    return model


def test_a_network_whose_walk_folds_most_before_its_end() -> None:
    model, starts, ends = staircase(), torch.tensor([[0.25]]), torch.tensor([[3.75]])
    # x = 0.25, 0.75, ..., 3.75: distances 0, 1, 2, 1, 1, 1, 5, 5 from the start (all four c units at once), lengths
    # 0, 1, 2, 3, 3, 3, 7, 7: chi_j = 0, 0, 1/3, 1/3, 1/3, 2/7, 2/7.
    sampled = path_folding(model, starts, ends, steps=7, return_distances=True)
    assert sampled.distances.tolist() == [[0, 1, 2, 1, 1, 1, 5, 5]]
    assert sampled.walked.tolist() == [[0, 1, 2, 3, 3, 3, 7, 7]]
    assert sampled.chi.item() == pytest.approx(2 / 7)
    assert sampled.chi_max.item() == pytest.approx(1 / 3)
    # Layer 1 (a, b, c) never turns back; layer 3 (e) goes on and off: 1/2 at its end and its maximum.
    torch.testing.assert_close(sampled.layer_chi_max, torch.tensor([[0.0, 0.5]]))
    # Exactly, the c units switch one at a time: distances 0, 1, 2, 1, 2, 3, 4, 5 over lengths 0, 1, ..., 7, so
    # chi_j peaks at 1/2 where the first c unit switches on, and the walk ends at 2/7.
    exact = path_folding(model, starts, ends, exact=True)
    assert exact.regions.item() == 8
    assert exact.chi.item() == pytest.approx(2 / 7)
    assert exact.chi_max.item() == pytest.approx(1 / 2)
    torch.testing.assert_close(exact.layer_chi_max, torch.tensor([[0.0, 0.5]]))


def random_mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    return model, torch.randn(24, 5) * 3, torch.randn(24, 5) * 3


@pytest.mark.parametrize("walk_words", [folding.WALK_WORDS, 0], ids=["passes-per-chunk", "a-chunk-a-pass"])
@pytest.mark.parametrize("batch_size", [None, 7, 40])
def test_streamed_chunks_equal_the_whole_walk(
    batch_size: int | None, walk_words: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # batch_size 7 runs a few points of a path per pass, 40 half a path; by default the walk counts all passes in
    # one chunk (its words are small), with walk_words=0 every pass is a chunk, streamed into the next.
    monkeypatch.setattr(folding, "WALK_WORDS", walk_words)
    counts = {"passes": 0, "chunks": 0}
    end_chunk = folding._Walk.end_chunk

    def counted_end_chunk(walk: folding._Walk) -> None:
        counts["chunks"] += 1
        end_chunk(walk)

    monkeypatch.setattr(folding._Walk, "end_chunk", counted_end_chunk)
    model, starts, ends = random_mlp()
    folding.discover_layers(model, starts, ends)  # its pass on two points is not one of the measurement's
    model[0].register_forward_pre_hook(lambda *_: counts.update(passes=counts["passes"] + 1))
    result = path_folding(model, starts, ends, steps=50, batch_size=batch_size, return_distances=True)
    assert counts["passes"] == {None: 1, 7: 24 * 8, 40: 24 * 2}[batch_size]
    assert counts["chunks"] == (counts["passes"] if walk_words == 0 else 1)
    patterns = path_patterns(model, starts, ends, steps=50)
    assert bool((result.chi_max > result.chi).any())
    torch.testing.assert_close(result.chi_max, max_fold_measure(patterns), rtol=0, atol=0)
    layer_maxima = torch.stack([max_fold_measure(patterns[..., :16]), max_fold_measure(patterns[..., 16:])], 1)
    torch.testing.assert_close(result.layer_chi_max, layer_maxima, rtol=0, atol=0)
    from_start, from_previous = step_distances(patterns, patterns[:, 0])
    assert torch.equal(result.distances, from_start)
    assert torch.equal(result.walked, from_previous.cumsum(1))
    assert torch.equal(result.r1, from_start.amax(1))
    assert torch.equal(result.layer_r2[:, 1], step_distances(patterns[..., 16:], patterns[:, 0, 16:])[1].sum(1))


def test_exact_maximum_is_the_limit_of_dense_sampling() -> None:
    model, starts, ends = random_mlp()
    exact = path_folding(model, starts, ends, exact=True, batch_size=16)  # several passes, streamed in pieces
    dense = path_folding(model, starts, ends, steps=20_000)
    assert torch.equal(exact.r2, dense.r2)
    torch.testing.assert_close(exact.chi_max, dense.chi_max)
    torch.testing.assert_close(exact.layer_chi_max, dense.layer_chi_max)
    assert bool((exact.chi_max > exact.chi).any())


class Digits(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _index: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_the_callback_logs_the_maxima(tmp_path) -> None:
    torch.manual_seed(0)
    inputs, labels = torch.randn(60, 8) * 2, torch.randint(0, 3, (60,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs, labels), batch_size=20)
    callback = SpaceFoldingCallback(every_n_train_steps=3, num_pairs=30, steps=32, log_figures=False)
    trainer(tmp_path, callback, max_steps=3).fit(Digits(), loader, loader)
    metrics, result = callback.latest_metrics, callback.latest_result
    assert metrics["spacefold/folding_max"] == pytest.approx(result.chi_max.mean().item())
    assert metrics["spacefold/folding_max"] > metrics["spacefold/folding"]
    expected = SpaceFolding()
    expected.update_from_result(result)
    median = expected.compute()["folding_max_median_nonzero"].item()
    assert metrics["spacefold/folding_max_median_nonzero"] == pytest.approx(median)
    for position, name in enumerate(result.layer_names):
        assert metrics[f"spacefold/layer_max/{name}"] == pytest.approx(result.layer_chi_max[:, position].mean().item())
