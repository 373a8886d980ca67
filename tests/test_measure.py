"""The folding measure against the specification's worked examples and properties (section 2)."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_spacefold import fold_measure, fold_ranges, interaction_profile, measure, symmetric_fold_measure
from lightning_spacefold.measure import pack_words, popcount, segment_sums, step_distances

# NumPy packs and counts on CPU; the integer operations do it on accelerators: both run here.
BY_NUMPY = pytest.mark.parametrize("by_numpy", [True, False], ids=["numpy", "integer-ops"])


def packing_by(by_numpy: bool) -> mock._patch:
    return mock.patch.object(measure, "_by_numpy", lambda _tensor: by_numpy)


def walk(*patterns: str) -> torch.Tensor:
    return torch.tensor([[bit == "1" for bit in pattern] for pattern in patterns])


@pytest.mark.parametrize(
    ("patterns", "r1", "r2", "chi"),
    [
        (("0000", "1100", "0011"), 2, 6, 2 / 3),
        (("000", "100", "110", "010", "011", "001", "000"), 2, 6, 2 / 3),
        (("000", "100", "110", "111"), 3, 3, 0.0),
        (("00", "10", "01"), 1, 3, 2 / 3),
        (("101", "101", "101"), 0, 0, 0.0),
        (("1",), 0, 0, 0.0),
    ],
)
def test_worked_examples(patterns: tuple[str, ...], r1: int, r2: int, chi: float) -> None:
    assert fold_ranges(walk(*patterns)) == (r1, r2)
    assert fold_measure(walk(*patterns)).item() == pytest.approx(chi, abs=1e-7)


def test_accepts_zero_one_tensors_and_batches() -> None:
    batch = torch.stack([walk("0000", "1100", "0011"), walk("0000", "1000", "1100")])
    expected = torch.tensor([2 / 3, 0.0])
    torch.testing.assert_close(fold_measure(batch), expected)
    torch.testing.assert_close(fold_measure(batch.to(torch.uint8)), expected)
    torch.testing.assert_close(fold_measure(batch.double()), expected)


def test_rejects_bad_patterns() -> None:
    with pytest.raises(TypeError, match="torch.Tensor"):
        fold_measure([[0, 1]])
    with pytest.raises(ValueError, match=r"\[\.\.\., N, M\]"):
        fold_measure(torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="only 0 and 1"):
        fold_measure(torch.tensor([[0.0, 0.5]]))
    with pytest.raises(ValueError, match="no point"):
        fold_measure(torch.zeros(0, 4, dtype=torch.bool))


def test_interaction_profile_by_hand() -> None:
    # (000, 100, 110, 010, 011, 001, 000): whole chi = 2/3.
    # k = 1: prefix (000, 100) is flat; suffix (100, 110, 010, 011, 001, 000) has distances 1, 2, 3, 2, 1 from its
    #        start -> r1 = 3, r2 = 5, chi = 2/5; I = 2/3 - 0 - 2/5 = 4/15.
    # k = 3: prefix (000,100,110,010): r1 = 2, r2 = 3 -> 1/3; suffix (010,011,001,000): r1 = 2, r2 = 3 -> 1/3; I = 0.
    profile = interaction_profile(walk("000", "100", "110", "010", "011", "001", "000"))
    assert profile[0].item() == pytest.approx(0.0)
    assert profile[1].item() == pytest.approx(4 / 15)
    assert profile[3].item() == pytest.approx(0.0)
    assert profile[-1].item() == pytest.approx(0.0)


def test_symmetric_value_by_hand() -> None:
    # Forward (00, 10, 01): 2/3. Reverse (01, 10, 00): r1 = 2, r2 = 3 -> 1/3. Mean 1/2.
    assert symmetric_fold_measure(walk("00", "10", "01")).item() == pytest.approx(0.5)


def test_step_distances_count_the_changed_units() -> None:
    bits = torch.rand(3, 5, 13) > 0.5
    from_start, from_previous = step_distances(bits, bits[:, 0])
    assert torch.equal(from_start, (bits != bits[:, :1]).sum(-1).int())
    assert from_previous[:, 0].eq(0).all()
    assert torch.equal(from_previous[:, 1:], (bits[:, 1:] != bits[:, :-1]).sum(-1).int())


@BY_NUMPY
def test_pack_words_puts_unit_j_at_bit_j_of_its_word(by_numpy: bool) -> None:
    with packing_by(by_numpy):
        check_pack_words()


def check_pack_words() -> None:
    bits = torch.zeros(2, 70, dtype=torch.bool)
    bits[0, [0, 9]] = True  # 1 + 2**9
    bits[1, [63, 64, 69]] = True  # the sign bit of word 0; bits 0 and 5 of word 1
    assert pack_words(bits).tolist() == [[513, 0], [-(2**63), 33]]
    assert pack_words(bits[:, :8]).tolist() == [[1], [0]]  # padded to one word
    # Columns of a wider tensor (not contiguous) pack as the same units.
    assert torch.equal(pack_words(torch.cat([bits, bits], 1)[:, :70]), pack_words(bits))


@BY_NUMPY
def test_popcount_of_words_by_hand(by_numpy: bool) -> None:
    words = torch.tensor([0, -1, 0x5555555555555555, -(2**63), 255, 2**62 + 7])
    with packing_by(by_numpy):
        counts = popcount(words)
    assert counts.dtype == torch.int64
    assert counts.tolist() == [0, 64, 32, 1, 8, 4]
    with pytest.raises(TypeError, match="int64 words"):
        popcount(words.int())  # NumPy's view as uint64 would pair its words silently


def test_segment_sums_add_each_layers_words() -> None:
    counts = popcount(torch.tensor([[-1, 3, 0, 7], [0, 0, 1, 1]]))
    assert segment_sums(counts, [1, 0, 3]).tolist() == [[64, 0, 5], [0, 0, 2]]


@given(st.integers(1, 200), st.integers(1, 4))
@settings(max_examples=30, deadline=None)
def test_packed_hamming_distances_equal_counted_units(num_units: int, rows: int) -> None:
    generator = torch.Generator().manual_seed(num_units * 7 + rows)
    first, second = (torch.rand(rows, num_units, generator=generator) > 0.5 for _ in range(2))
    for by_numpy in (True, False):
        with packing_by(by_numpy):
            distances = popcount(pack_words(first) ^ pack_words(second)).sum(-1)
        assert torch.equal(distances, (first != second).sum(-1))


def random_walks(max_points: int = 12, max_units: int = 10) -> st.SearchStrategy[torch.Tensor]:
    return st.integers(1, max_units).flatmap(
        lambda units: st.lists(
            st.lists(st.booleans(), min_size=units, max_size=units), min_size=1, max_size=max_points
        ).map(torch.tensor)
    )


@settings(max_examples=200, deadline=None)
@given(random_walks(), st.data())
def test_repeating_patterns_changes_nothing(patterns: torch.Tensor, data: st.DataObject) -> None:
    repeats = torch.tensor(data.draw(st.lists(st.integers(1, 3), min_size=len(patterns), max_size=len(patterns))))
    assert torch.equal(fold_measure(patterns.repeat_interleave(repeats, dim=0)), fold_measure(patterns))


@settings(max_examples=200, deadline=None)
@given(random_walks())
def test_flat_iff_reverse_flat(patterns: torch.Tensor) -> None:
    assert (fold_measure(patterns) == 0) == (fold_measure(patterns.flip(0)) == 0)


@settings(max_examples=200, deadline=None)
@given(random_walks())
def test_range_and_bounds(patterns: torch.Tensor) -> None:
    chi = fold_measure(patterns).item()
    _, r2 = fold_ranges(patterns)
    assert 0 <= chi < 1
    if r2 > 0:
        ratio = 1 - (patterns[0] != patterns[-1]).sum().item() / r2.item()
        assert 0.5 * ratio - 1e-6 <= chi <= ratio + 1e-6


@settings(max_examples=200, deadline=None)
@given(random_walks())
def test_returning_walk_folds_at_least_half(patterns: torch.Tensor) -> None:
    closed = torch.cat([patterns, patterns[:1]])
    if fold_ranges(closed)[1] > 0:
        assert fold_measure(closed).item() >= 0.5 - 1e-6


@settings(max_examples=100, deadline=None)
@given(random_walks())
def test_interaction_matches_direct_definition(patterns: torch.Tensor) -> None:
    whole = fold_measure(patterns)
    direct = torch.stack(
        [whole - fold_measure(patterns[: k + 1]) - fold_measure(patterns[k:]) for k in range(len(patterns))]
    )
    torch.testing.assert_close(interaction_profile(patterns), direct)
