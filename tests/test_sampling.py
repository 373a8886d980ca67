"""Tests for lightning_spacefold.sampling (pair selection)."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_spacefold.sampling import (
    PairBatch,
    _update_centroids,
    all_pairs,
    centroid_pairs,
    class_pairs,
    kmeans,
    random_pairs,
)

BLOB_MEANS = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])


def indexed_inputs(n: int) -> torch.Tensor:
    """Inputs whose value is their own index, so a chosen sample can be looked up: shape [n, 1, 2]."""
    return torch.arange(n, dtype=torch.float32)[:, None, None].expand(n, 1, 2).clone()


def indices_of(points: torch.Tensor) -> torch.Tensor:
    return points[:, 0, 0].long()


def blobs(per_blob: int = 40, spread: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """Three well-separated Gaussian blobs around BLOB_MEANS, labelled 7, -2 and 40."""
    noise = spread * torch.randn(3, per_blob, 2, generator=torch.Generator().manual_seed(123))
    points = (BLOB_MEANS[:, None] + noise).reshape(-1, 2)
    labels = torch.tensor([7, -2, 40]).repeat_interleave(per_blob)
    return points, labels


def pair_counts(batch: PairBatch) -> Counter[tuple[int, int]]:
    return Counter(zip(batch.start_labels.tolist(), batch.end_labels.tolist(), strict=True))


def sorted_rows(points: torch.Tensor) -> torch.Tensor:
    return points[torch.argsort(points[:, 0] * 1000 + points[:, 1])]


LABELS = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2])
SAMPLERS: dict[str, Callable[..., object]] = {
    "random_pairs": lambda g: random_pairs(indexed_inputs(12), 30, labels=LABELS, generator=g),
    "class_pairs": lambda g: class_pairs(indexed_inputs(12), LABELS, 30, generator=g),
    "centroid_pairs": lambda g: centroid_pairs(torch.randn(12, 3, generator=torch.Generator()), LABELS, 2, generator=g),
    "kmeans": lambda g: kmeans(torch.randn(30, 3, generator=torch.Generator()), 4, generator=g),
}


def as_tensors(result: object) -> list[torch.Tensor]:
    if isinstance(result, PairBatch):
        return [result.starts, result.ends]
    return list(result)


def identical(first: object, second: object) -> bool:
    return all(torch.equal(a, b) for a, b in zip(as_tensors(first), as_tensors(second), strict=True))


# --- PairBatch ----------------------------------------------------------------------------------------


def test_pair_batch_is_frozen_and_has_length() -> None:
    batch = PairBatch(torch.zeros(3, 2), torch.ones(3, 2))
    assert len(batch) == 3
    assert batch.start_labels is None and batch.end_labels is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        batch.starts = torch.zeros(1, 2)  # type: ignore[misc]


# --- determinism and RNG hygiene ----------------------------------------------------------------------


@pytest.mark.parametrize("name", SAMPLERS)
def test_same_seed_same_result_different_seed_different_result(name: str) -> None:
    sample = SAMPLERS[name]
    assert identical(sample(3), sample(3))
    assert identical(sample(3), sample(torch.Generator().manual_seed(3)))
    assert identical(sample(None), sample(0))
    assert not identical(sample(3), sample(4))


@pytest.mark.parametrize("name", SAMPLERS)
def test_global_rng_untouched(name: str) -> None:
    torch.manual_seed(2024)
    state = torch.get_rng_state()
    SAMPLERS[name](5)
    assert torch.equal(torch.get_rng_state(), state)


def test_shared_generator_advances_between_calls() -> None:
    generator = torch.Generator().manual_seed(1)
    first = random_pairs(indexed_inputs(10), 20, generator=generator)
    second = random_pairs(indexed_inputs(10), 20, generator=generator)
    assert not identical(first, second)


# --- random_pairs -------------------------------------------------------------------------------------


def test_random_pairs_distinct_uniform_with_labels() -> None:
    labels = torch.tensor([5, 3, 9, 3, 1])
    batch = random_pairs(indexed_inputs(5), 2000, labels=labels, generator=0)
    starts, ends = indices_of(batch.starts), indices_of(batch.ends)
    assert len(batch) == 2000 and batch.starts.shape == (2000, 1, 2)
    assert bool((starts != ends).all())
    pairs = Counter(zip(starts.tolist(), ends.tolist(), strict=True))
    assert len(pairs) == 20 and min(pairs.values()) > 60  # every ordered pair, about 100 each
    assert torch.equal(batch.start_labels, labels[starts])
    assert torch.equal(batch.end_labels, labels[ends])


def test_random_pairs_two_samples_and_replacement() -> None:
    batch = random_pairs(indexed_inputs(2), 7, generator=0)
    assert len(batch) == 7  # more than the 2 distinct ordered pairs: drawn with replacement
    assert torch.equal(indices_of(batch.starts) + indices_of(batch.ends), torch.ones(7, dtype=torch.long))
    assert batch.start_labels is None and batch.end_labels is None


# --- class_pairs --------------------------------------------------------------------------------------


def test_class_pairs_exact_balance_with_same_class() -> None:
    batch = class_pairs(indexed_inputs(12), LABELS * 10, 27, generator=0)
    assert pair_counts(batch) == {(a, b): 3 for a in (0, 10, 20) for b in (0, 10, 20)}


def test_class_pairs_without_same_class() -> None:
    labels = torch.tensor([4, 4, 1, 1, 1, 8])  # class 8 has one sample: fine without same-class pairs
    batch = class_pairs(indexed_inputs(6), labels, 12, include_same_class=False, generator=0)
    assert pair_counts(batch) == {(a, b): 2 for a in (1, 4, 8) for b in (1, 4, 8) if a != b}


def test_class_pairs_labels_match_chosen_samples_and_samples_distinct() -> None:
    labels = torch.tensor([3, 3, 0, 0, 0, 0, 0, 3, 9, 9])
    batch = class_pairs(indexed_inputs(10), labels, 900, generator=1)
    starts, ends = indices_of(batch.starts), indices_of(batch.ends)
    assert torch.equal(batch.start_labels, labels[starts])
    assert torch.equal(batch.end_labels, labels[ends])
    assert bool((starts != ends).all())
    same_nine = (batch.start_labels == 9) & (batch.end_labels == 9)
    assert set(zip(starts[same_nine].tolist(), ends[same_nine].tolist(), strict=True)) == {(8, 9), (9, 8)}
    # within class 0 (five samples) every sample is drawn as a start
    assert set(starts[batch.start_labels == 0].tolist()) == {2, 3, 4, 5, 6}


def test_class_pairs_grouped_in_sorted_class_pair_order() -> None:
    batch = class_pairs(indexed_inputs(12), LABELS, 18, generator=0)
    keys = list(zip(batch.start_labels.tolist(), batch.end_labels.tolist(), strict=True))
    assert keys == sorted(keys)


def test_class_pairs_remainder_spread_randomly() -> None:
    counts = pair_counts(class_pairs(indexed_inputs(12), LABELS, 11, generator=0))
    assert sum(counts.values()) == 11 and sorted(counts.values()) == [1] * 7 + [2] * 2
    chosen = {frozenset(pair_counts(class_pairs(indexed_inputs(12), LABELS, 4, generator=s))) for s in range(8)}
    assert all(len(keys) == 4 for keys in chosen)
    assert len(chosen) > 1  # not always the same (e.g. the first sorted) class pairs


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.integers(2, 5), min_size=1, max_size=4),
    per_class_pair=st.integers(1, 3),
    include_same_class=st.booleans(),
)
def test_class_pairs_balance_property(sizes: list[int], per_class_pair: int, include_same_class: bool) -> None:
    labels = torch.arange(len(sizes)).repeat_interleave(torch.tensor(sizes))
    num_classes = len(sizes)
    if num_classes == 1 and not include_same_class:
        return
    num_class_pairs = num_classes**2 if include_same_class else num_classes * (num_classes - 1)
    inputs = indexed_inputs(len(labels))
    batch = class_pairs(
        inputs, labels, per_class_pair * num_class_pairs, include_same_class=include_same_class, generator=0
    )
    counts = pair_counts(batch)
    assert len(counts) == num_class_pairs and set(counts.values()) == {per_class_pair}
    assert bool((indices_of(batch.starts) != indices_of(batch.ends)).all())
    assert torch.equal(batch.start_labels, labels[indices_of(batch.starts)])


# --- kmeans -------------------------------------------------------------------------------------------


def test_kmeans_recovers_blob_means() -> None:
    points, labels = blobs()
    centroids, assignment = kmeans(points, 3, generator=0)
    assert torch.allclose(sorted_rows(centroids), sorted_rows(BLOB_MEANS), atol=0.2)
    for label in labels.unique():
        assert len(assignment[labels == label].unique()) == 1  # each blob is one cluster
    assert len(assignment.unique()) == 3 and assignment.dtype == torch.long


def test_kmeans_keeps_input_shape_and_dtype() -> None:
    points, _ = blobs(per_blob=10)
    centroids, assignment = kmeans(points.double().reshape(-1, 1, 2, 1), 3, generator=0)
    assert centroids.shape == (3, 1, 2, 1) and centroids.dtype == torch.float64 and assignment.shape == (30,)
    half_centroids, _ = kmeans(points.half(), 3, generator=0)
    assert half_centroids.dtype == torch.float16


def test_kmeans_single_cluster_is_mean_and_zero_iterations_gives_seeds() -> None:
    points, _ = blobs(per_blob=10)
    centroid, assignment = kmeans(points, 1)
    assert torch.allclose(centroid[0], points.mean(0), atol=1e-5) and bool((assignment == 0).all())
    seeds, _ = kmeans(points, 3, iterations=0, generator=2)
    assert all(bool((points == seed).all(1).any()) for seed in seeds)  # k-means++ seeds are data points


def test_kmeans_with_fewer_distinct_points_than_clusters() -> None:
    points = torch.tensor([[0.0, 0.0], [0.0, 0.0], [4.0, 0.0], [4.0, 0.0]])
    centroids, assignment = kmeans(points, 3, generator=0)
    assert bool(torch.isfinite(centroids).all())
    assert all(bool((points == c).all(1).any()) for c in centroids)  # some centroids coincide
    assert torch.equal(centroids[assignment], points)


def test_empty_cluster_reseeded_with_farthest_points() -> None:
    points = torch.tensor([[[0.0], [1.0], [10.0], [4.0]]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    assignment = torch.zeros(1, 4, dtype=torch.long)  # clusters 1 and 2 are empty
    centroids = torch.tensor([[[0.0], [50.0], [60.0]]])
    distance = (points[..., 0] - 0.0).square()
    updated = _update_centroids(points, mask, assignment, distance, centroids)
    assert torch.equal(updated, torch.tensor([[[3.75], [10.0], [4.0]]]))


# --- centroid_pairs -----------------------------------------------------------------------------------


def test_centroid_pairs_counts_three_classes_two_centroids() -> None:
    points, labels = blobs(per_blob=12)
    batch = centroid_pairs(points, labels, 2, generator=0)
    # 6 ordered pairs of different classes x 2*2 centroid pairs + 3 classes x 2*1 distinct centroid pairs
    assert len(batch) == 6 * 4 + 3 * 2 == 30
    expected = {(a, b): 4 if a != b else 2 for a in (7, -2, 40) for b in (7, -2, 40)}
    assert pair_counts(batch) == expected
    assert bool((batch.starts != batch.ends).any(1).all())  # never a centroid with itself
    without_same = centroid_pairs(points, labels, 2, include_same_class=False, generator=0)
    assert len(without_same) == 24 == 6 * 4
    assert all(a != b for a, b in pair_counts(without_same))


def test_centroid_pairs_centroids_lie_in_their_class() -> None:
    points, labels = blobs(per_blob=15)
    batch = centroid_pairs(points.reshape(-1, 1, 2), labels, 3, generator=0)
    assert batch.starts.shape == (9 * 8, 1, 2)
    mean_of = {7: BLOB_MEANS[0], -2: BLOB_MEANS[1], 40: BLOB_MEANS[2]}
    for ends, end_labels in ((batch.starts, batch.start_labels), (batch.ends, batch.end_labels)):
        expected = torch.stack([mean_of[int(label)] for label in end_labels])
        assert bool(((ends[:, 0] - expected).norm(dim=1) < 1.5).all())


def test_centroid_pairs_one_centroid_is_class_mean() -> None:
    points = torch.tensor([[0.0, 0.0], [2.0, 0.0], [10.0, 10.0], [10.0, 12.0], [10.0, 14.0]])
    labels = torch.tensor([1, 1, 0, 0, 0])
    batch = centroid_pairs(points, labels, 1)
    assert torch.allclose(batch.starts, torch.tensor([[10.0, 12.0], [1.0, 0.0]]))
    assert torch.allclose(batch.ends, torch.tensor([[1.0, 0.0], [10.0, 12.0]]))
    assert batch.start_labels.tolist() == [0, 1] and batch.end_labels.tolist() == [1, 0]


# --- all_pairs ----------------------------------------------------------------------------------------


def test_all_pairs_enumerates_ordered_distinct_pairs() -> None:
    labels = torch.tensor([2, 0, 2, 1])
    batch = all_pairs(indexed_inputs(4), labels=labels)
    starts, ends = indices_of(batch.starts), indices_of(batch.ends)
    expected = [(i, j) for i in range(4) for j in range(4) if i != j]
    assert list(zip(starts.tolist(), ends.tolist(), strict=True)) == expected
    assert torch.equal(batch.start_labels, labels[starts]) and torch.equal(batch.end_labels, labels[ends])
    assert all_pairs(indexed_inputs(3)).start_labels is None


# --- argument validation ------------------------------------------------------------------------------

X = indexed_inputs(6)
Y = torch.tensor([0, 0, 1, 1, 2, 2])


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: random_pairs([[0.0], [1.0]], 3), TypeError, "inputs must be a torch.Tensor"),
        (lambda: random_pairs(torch.arange(4), 3), TypeError, "floating point.*float()"),
        (lambda: random_pairs(torch.zeros(1, 3), 3), ValueError, "at least 2 samples.*got 1"),
        (lambda: all_pairs(torch.tensor(1.0)), ValueError, "at least 2 samples.*0-d"),
        (lambda: random_pairs(X, 0), ValueError, "num_pairs must be at least 1, got 0"),
        (lambda: random_pairs(X, 2.0), TypeError, "num_pairs must be an int"),
        (lambda: random_pairs(X, True), TypeError, "num_pairs must be an int"),
        (lambda: random_pairs(X, 3, generator="seed"), TypeError, "generator.*got str"),
        (lambda: random_pairs(X, 3, labels=Y[:5]), ValueError, r"one label per input \(6\).*\(5,\)"),
        (lambda: all_pairs(X, labels=Y[:, None]), ValueError, "labels must be 1-D"),
        (lambda: random_pairs(X, 3, labels=Y.float()), TypeError, "integer dtype.*long()"),
        (lambda: all_pairs(X, labels=Y.bool()), TypeError, "integer dtype"),
        (lambda: all_pairs(X, labels=[0, 1, 2, 3, 4, 5]), TypeError, "labels must be a torch.Tensor"),
        (lambda: class_pairs(X, None, 3), TypeError, "labels are required.*random_pairs"),
        (lambda: class_pairs(X, Y, 0), ValueError, "num_pairs must be at least 1"),
        (
            lambda: class_pairs(X, torch.full((6,), 4), 3, include_same_class=False),
            ValueError,
            "single class 4.*include_same_class=True",
        ),
        (
            lambda: class_pairs(X, torch.tensor([0, 0, 5, 1, 1, 1]), 3),
            ValueError,
            "class 5 has 1 sample.*include_same_class=False",
        ),
        (
            lambda: centroid_pairs(X, torch.tensor([0, 0, 0, 2, 1, 1]), 2),
            ValueError,
            r"class 2 has 1 sample\(s\).*at least 2.*lower centroids_per_class",
        ),
        (lambda: centroid_pairs(X, Y, 0), ValueError, "centroids_per_class must be at least 1"),
        (lambda: centroid_pairs(X, Y, 2, iterations=-1), ValueError, "iterations must be at least 0"),
        (lambda: centroid_pairs(X, Y.float(), 2), TypeError, "integer dtype"),
        (
            lambda: centroid_pairs(X, torch.zeros(6, dtype=torch.long), 1),
            ValueError,
            "single class 0 and centroids_per_class=1.*raise centroids_per_class",
        ),
        (
            lambda: centroid_pairs(X, torch.zeros(6, dtype=torch.long), 2, include_same_class=False),
            ValueError,
            "single class 0.*include_same_class=True",
        ),
        (lambda: kmeans(X, 7), ValueError, "at least k=7 points but got 6; lower k"),
        (lambda: kmeans(X, 0), ValueError, "k must be at least 1"),
        (lambda: kmeans(X, 2, iterations=1.5), TypeError, "iterations must be an int"),
        (lambda: kmeans(torch.zeros(0, 2), 1), ValueError, "points must hold at least 1 samples"),
        (
            lambda: kmeans(torch.ones(3, 2, dtype=torch.int32), 1),
            TypeError,
            "points must be a floating point",
        ),
    ],
)
def test_bad_arguments(call: Callable[[], object], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        call()


def test_centroid_pairs_reject_classes_with_too_few_distinct_points() -> None:
    points = torch.cat([torch.zeros(5, 2), torch.ones(5, 2), torch.randn(5, 2)])
    labels = torch.arange(3).repeat_interleave(5)
    with pytest.raises(ValueError, match="class 0 has 1 sample.*distinct"):
        centroid_pairs(points, labels, 2)
