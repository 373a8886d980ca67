"""Choosing the pairs of inputs between which space folding is measured.

Folding is measured along straight segments between two inputs. This module picks those pairs, in pure
torch and without any knowledge of Lightning:

* :func:`random_pairs` draws ordered pairs of distinct samples uniformly at random;
* :func:`class_pairs` draws pairs balanced over every ordered pair of classes;
* :func:`centroid_pairs` pairs k-means centroids of every class with each other, the efficient strategy of
  Lewandowski et al., "The Space Between: On Folding, Symmetries and Sampling";
* :func:`all_pairs` enumerates every ordered pair of distinct samples, for reference measurements on small
  sets;
* :func:`kmeans` is the batched k-means (k-means++ initialisation, Lloyd iterations) used by
  :func:`centroid_pairs`.

Randomness: every random function takes ``generator``, which is a :class:`torch.Generator` (used and
advanced in place, so consecutive calls sharing one generator give different draws), an ``int`` seed, or
``None`` for a fresh generator seeded with 0. The same seed always gives the same result and the global
torch RNG is never touched. Random numbers are drawn on the generator's device (CPU for seeds and ``None``)
and moved to the inputs' device, where all other computation happens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

import torch
from torch import Tensor

from lightning_spacefold.checks import is_int

__all__ = [
    "GeneratorLike",
    "PairBatch",
    "all_pairs",
    "centroid_pairs",
    "class_pairs",
    "kmeans",
    "random_pairs",
]

GeneratorLike: TypeAlias = torch.Generator | int | None
"""A :class:`torch.Generator`, an ``int`` seed, or ``None`` (a fresh generator seeded with 0)."""


@dataclass(frozen=True)
class PairBatch:
    """Start and end points of the segments along which folding is measured.

    Attributes:
        starts: Segment start points, shape ``[P, *shape]``.
        ends: Segment end points, shape ``[P, *shape]``.
        start_labels: Class labels of the start points, shape ``[P]``, or ``None`` when unlabelled.
        end_labels: Class labels of the end points, shape ``[P]``, or ``None`` when unlabelled.
    """

    starts: Tensor
    ends: Tensor
    start_labels: Tensor | None = None
    end_labels: Tensor | None = None

    def __len__(self) -> int:
        """Returns the number of pairs ``P``."""
        return self.starts.shape[0]

    def select(self, index: Tensor | slice) -> PairBatch:
        """The pairs at ``index`` (an index tensor, a boolean mask or a slice), with their labels."""
        start_labels, end_labels = self.start_labels, self.end_labels
        return PairBatch(
            self.starts[index],
            self.ends[index],
            None if start_labels is None else start_labels[index],
            None if end_labels is None else end_labels[index],
        )


def random_pairs(
    inputs: Tensor,
    num_pairs: int,
    *,
    labels: Tensor | None = None,
    generator: GeneratorLike = None,
) -> PairBatch:
    """Draws ordered pairs ``(i, j)`` of distinct samples uniformly at random.

    Each pair is drawn independently and uniformly from the ``n * (n - 1)`` ordered pairs with ``i != j``,
    i.e. with replacement: the same pair may occur more than once, and ``num_pairs`` may exceed
    ``n * (n - 1)``.

    Args:
        inputs: Samples, shape ``[n, *shape]`` with ``n >= 2``, floating point.
        num_pairs: Number of pairs ``P >= 1`` to draw.
        labels: Optional integer class labels, shape ``[n]``, carried along to the pairs.
        generator: Generator, seed or ``None`` (seed 0); see the module docstring.

    Returns:
        The ``P`` pairs, with labels when ``labels`` is given.

    Raises:
        TypeError: If an argument has the wrong type or dtype.
        ValueError: If ``inputs`` has fewer than 2 samples, ``labels`` has the wrong shape or
            ``num_pairs < 1``.

    Examples:
        From the two inputs 0 and 1, every pair of distinct samples is ``0 -> 1`` or ``1 -> 0``:

        >>> import torch
        >>> from lightning_spacefold.sampling import random_pairs
        >>> pairs = random_pairs(torch.tensor([[0.0], [1.0]]), 4, generator=0)
        >>> len(pairs), (pairs.starts + pairs.ends).flatten()
        (4, tensor([1., 1., 1., 1.]))
    """
    _check_inputs(inputs)
    labels = _check_labels(labels, inputs)
    _check_positive_int(num_pairs, "num_pairs")
    gen = _as_generator(generator)
    sizes = torch.full((num_pairs,), inputs.shape[0], dtype=torch.long, device=inputs.device)
    starts, ends = _draw_positions(sizes, sizes, torch.ones_like(sizes, dtype=torch.bool), gen)
    return _gather_pairs(inputs, labels, starts, ends)


def class_pairs(
    inputs: Tensor,
    labels: Tensor,
    num_pairs: int,
    *,
    include_same_class: bool = True,
    generator: GeneratorLike = None,
) -> PairBatch:
    """Draws pairs of samples balanced over every ordered pair of classes.

    The ``K`` class pairs are every ordered ``(a, b)`` of classes present in ``labels``, without ``(a, a)``
    when ``include_same_class`` is false. Each class pair gets ``num_pairs // K`` pairs; the remaining
    ``num_pairs % K`` pairs go one each to a uniformly random subset of class pairs (drawn from
    ``generator``), so no class pair is systematically favoured. In particular, when ``num_pairs < K`` only
    a random subset of ``num_pairs`` class pairs gets a pair. Within class pair ``(a, b)`` the start is drawn
    uniformly from class ``a`` and the end uniformly from class ``b``; for ``a == b`` start and end are
    always distinct samples. The pairs are returned grouped by class pair in sorted ``(a, b)`` order.

    Args:
        inputs: Samples, shape ``[n, *shape]`` with ``n >= 2``, floating point.
        labels: Integer class labels, shape ``[n]``.
        num_pairs: Total number of pairs ``P >= 1``.
        include_same_class: Whether to include the class pairs ``(a, a)``.
        generator: Generator, seed or ``None`` (seed 0); see the module docstring.

    Returns:
        The ``P`` pairs with their start and end labels.

    Raises:
        TypeError: If an argument has the wrong type or dtype.
        ValueError: If ``inputs`` has fewer than 2 samples, ``labels`` has the wrong shape,
            ``num_pairs < 1``, there is a single class and ``include_same_class`` is false, or
            ``include_same_class`` is true and a class has a single sample.

    Examples:
        Two classes without same-class pairs: the 4 pairs are spread evenly over ``0 -> 1`` and ``1 -> 0``.

        >>> import torch
        >>> from lightning_spacefold.sampling import class_pairs
        >>> inputs, labels = torch.tensor([[0.0], [2.0], [10.0], [12.0]]), torch.tensor([0, 0, 1, 1])
        >>> pairs = class_pairs(inputs, labels, 4, include_same_class=False)
        >>> pairs.start_labels, pairs.end_labels
        (tensor([0, 0, 1, 1]), tensor([1, 1, 0, 0]))
    """
    _check_inputs(inputs)
    labels = _require_labels(_check_labels(labels, inputs))
    _check_positive_int(num_pairs, "num_pairs")
    gen = _as_generator(generator)
    classes, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    _check_class_count(classes, include_same_class)
    if include_same_class:
        fix = "add samples of that class or pass include_same_class=False"
        _check_min_class_size(classes, counts, 2, f"same-class pairs need two distinct samples; {fix}")
    first_class, second_class = _class_pair_indices(len(classes), include_same_class, inputs.device)
    per_class_pair = _spread(num_pairs, len(first_class), gen, inputs.device)
    start_class = first_class.repeat_interleave(per_class_pair)
    end_class = second_class.repeat_interleave(per_class_pair)
    start_pos, end_pos = _draw_positions(counts[start_class], counts[end_class], start_class == end_class, gen)
    by_class, offsets = _group_by_class(inverse, counts)
    starts = by_class[offsets[start_class] + start_pos]
    ends = by_class[offsets[end_class] + end_pos]
    return _gather_pairs(inputs, labels, starts, ends)


def centroid_pairs(
    inputs: Tensor,
    labels: Tensor,
    centroids_per_class: int = 5,
    *,
    include_same_class: bool = True,
    iterations: int = 50,
    generator: GeneratorLike = None,
) -> PairBatch:
    """Pairs the k-means centroids of every class with each other.

    Each class is clustered into ``k = centroids_per_class`` centroids with :func:`kmeans` (all classes in
    one batch). Then every ordered pair of distinct centroids is returned: for classes ``a != b`` all
    ``k * k`` centroid pairs, and for ``(a, a)`` (only when ``include_same_class``) the ``k * (k - 1)``
    pairs of distinct centroids. With ``C`` classes that is ``C * (C - 1) * k**2`` pairs, plus
    ``C * k * (k - 1)`` when ``include_same_class``. Pairs are ordered by (start class, start centroid,
    end class, end centroid), classes in sorted order. A class with fewer than ``k`` samples is an error
    (rather than silently using fewer centroids), so every class contributes the same number of centroids.

    Args:
        inputs: Samples, shape ``[n, *shape]`` with ``n >= 2``, floating point.
        labels: Integer class labels, shape ``[n]``.
        centroids_per_class: Number of centroids ``k >= 1`` per class.
        include_same_class: Whether to include pairs of centroids of the same class.
        iterations: Maximum number of Lloyd iterations (``>= 0``).
        generator: Generator, seed or ``None`` (seed 0); see the module docstring.

    Returns:
        The centroid pairs, shape ``[P, *shape]``, labelled with the classes of their centroids.

    Raises:
        TypeError: If an argument has the wrong type or dtype.
        ValueError: If ``inputs`` has fewer than 2 samples, ``labels`` has the wrong shape,
            ``centroids_per_class < 1``, ``iterations < 0``, a class has fewer than ``centroids_per_class``
            (distinct) samples, or no pair of distinct centroids exists (a single class with ``include_same_class``
            false or with ``centroids_per_class == 1``).

    Examples:
        With one centroid per class, the centroids are the class means 1 and 11:

        >>> import torch
        >>> from lightning_spacefold.sampling import centroid_pairs
        >>> inputs, labels = torch.tensor([[0.0], [2.0], [10.0], [12.0]]), torch.tensor([0, 0, 1, 1])
        >>> pairs = centroid_pairs(inputs, labels, 1, include_same_class=False)
        >>> pairs.starts.flatten(), pairs.ends.flatten(), pairs.start_labels, pairs.end_labels
        (tensor([ 1., 11.]), tensor([11.,  1.]), tensor([0, 1]), tensor([1, 0]))
    """
    _check_inputs(inputs)
    labels = _require_labels(_check_labels(labels, inputs))
    _check_positive_int(centroids_per_class, "centroids_per_class")
    _check_non_negative_int(iterations, "iterations")
    gen = _as_generator(generator)
    classes, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    _check_class_count(classes, include_same_class)
    if len(classes) == 1 and centroids_per_class == 1:
        raise ValueError(
            f"labels contain the single class {classes[0].item()} and centroids_per_class=1, so there is no "
            "pair of distinct centroids; raise centroids_per_class or add samples of another class"
        )
    _check_min_class_size(
        classes, counts, centroids_per_class, f"lower centroids_per_class (now {centroids_per_class})"
    )
    flat = _flatten(inputs)
    # Fewer distinct points than centroids would give coincident centroids: zero-length paths that never fold.
    distinct = torch.unique(torch.cat([inverse.to(flat.dtype).unsqueeze(1), flat], dim=1), dim=0)
    distinct_counts = torch.bincount(distinct[:, 0].long(), minlength=len(classes))
    _check_min_class_size(
        classes,
        distinct_counts,
        centroids_per_class,
        f"its samples repeat, so only {int(distinct_counts.min())} distinct point(s) can be centroids; lower "
        f"centroids_per_class (now {centroids_per_class})",
    )

    by_class, offsets = _group_by_class(inverse, counts)
    sorted_class = inverse[by_class]
    position = torch.arange(len(by_class), device=inputs.device) - offsets[sorted_class]
    padded = flat.new_zeros(len(classes), int(counts.max()), flat.shape[1])
    padded[sorted_class, position] = flat[by_class]
    mask = torch.zeros(padded.shape[:2], dtype=torch.bool, device=inputs.device)
    mask[sorted_class, position] = True
    centroids, _ = _batched_kmeans(padded, mask, centroids_per_class, iterations, gen)

    centroids = centroids.reshape(-1, *inputs.shape[1:]).to(inputs.dtype)
    centroid_class = torch.arange(len(classes), device=inputs.device).repeat_interleave(centroids_per_class)
    starts, ends = _distinct_index_pairs(len(centroids), inputs.device)
    if not include_same_class:
        keep = centroid_class[starts] != centroid_class[ends]
        starts, ends = starts[keep], ends[keep]
    return _gather_pairs(centroids, classes[centroid_class], starts, ends)


def all_pairs(inputs: Tensor, *, labels: Tensor | None = None) -> PairBatch:
    """Enumerates every ordered pair ``(i, j)`` of distinct samples.

    Gives ``n * (n - 1)`` pairs, ordered by ``i`` and then ``j``; meant for reference measurements on small
    sets.

    Args:
        inputs: Samples, shape ``[n, *shape]`` with ``n >= 2``, floating point.
        labels: Optional integer class labels, shape ``[n]``, carried along to the pairs.

    Returns:
        The ``n * (n - 1)`` pairs, with labels when ``labels`` is given.

    Raises:
        TypeError: If an argument has the wrong type or dtype.
        ValueError: If ``inputs`` has fewer than 2 samples or ``labels`` has the wrong shape.

    Examples:
        >>> import torch
        >>> from lightning_spacefold.sampling import all_pairs
        >>> pairs = all_pairs(torch.tensor([[0.0], [1.0], [2.0]]))
        >>> pairs.starts.flatten(), pairs.ends.flatten()
        (tensor([0., 0., 1., 1., 2., 2.]), tensor([1., 2., 0., 2., 0., 1.]))
    """
    _check_inputs(inputs)
    labels = _check_labels(labels, inputs)
    starts, ends = _distinct_index_pairs(inputs.shape[0], inputs.device)
    return _gather_pairs(inputs, labels, starts, ends)


def kmeans(
    points: Tensor,
    k: int,
    *,
    iterations: int = 50,
    generator: GeneratorLike = None,
) -> tuple[Tensor, Tensor]:
    """Clusters points with k-means (k-means++ initialisation, then Lloyd iterations).

    Points of any shape ``[n, *shape]`` are flattened to ``[n, D]`` for clustering (computed in at least
    float32 precision on the points' device). Lloyd iterations stop when the assignment no longer changes
    or after ``iterations`` steps. A cluster that becomes empty is re-seeded with the point farthest from
    its current centroid (several empty clusters take the farthest points in turn). With fewer than ``k``
    distinct points some centroids coincide.

    Args:
        points: Points, shape ``[n, *shape]`` with ``n >= k``, floating point.
        k: Number of clusters, ``k >= 1``.
        iterations: Maximum number of Lloyd iterations (``>= 0``; 0 keeps the k-means++ seeds).
        generator: Generator, seed or ``None`` (seed 0); see the module docstring.

    Returns:
        The centroids, shape ``[k, *shape]`` in the points' dtype, and the index of each point's
        nearest centroid, shape ``[n]``, dtype ``long``.

    Raises:
        TypeError: If an argument has the wrong type or dtype.
        ValueError: If ``k < 1``, ``iterations < 0`` or there are fewer than ``k`` points.

    Examples:
        Two clusters, around 1 and around 11:

        >>> import torch
        >>> from lightning_spacefold.sampling import kmeans
        >>> centroids, assignment = kmeans(torch.tensor([[0.0], [2.0], [10.0], [12.0]]), 2)
        >>> centroids.flatten().sort().values
        tensor([ 1., 11.])
        >>> assignment[0] == assignment[1] != assignment[2] == assignment[3]
        tensor(True)
    """
    _check_inputs(points, name="points", min_count=1)
    _check_positive_int(k, "k")
    _check_non_negative_int(iterations, "iterations")
    if points.shape[0] < k:
        raise ValueError(f"kmeans needs at least k={k} points but got {points.shape[0]}; lower k")
    gen = _as_generator(generator)
    flat = _flatten(points)
    mask = torch.ones(1, flat.shape[0], dtype=torch.bool, device=points.device)
    centroids, assignment = _batched_kmeans(flat[None], mask, k, iterations, gen)
    return centroids[0].reshape(k, *points.shape[1:]).to(points.dtype), assignment[0]


# --- validation ---------------------------------------------------------------------------------------


def _check_inputs(inputs: Tensor, *, name: str = "inputs", min_count: int = 2) -> None:
    if not isinstance(inputs, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [n, ...], got {type(inputs).__name__}")
    if not inputs.is_floating_point():
        raise TypeError(f"{name} must be a floating point tensor, got dtype {inputs.dtype}; convert with .float()")
    if inputs.dim() == 0 or inputs.shape[0] < min_count:
        got = "a 0-d tensor" if inputs.dim() == 0 else f"{inputs.shape[0]}"
        raise ValueError(f"{name} must hold at least {min_count} samples along dim 0, got {got}")


def _check_labels(labels: Tensor | None, inputs: Tensor) -> Tensor | None:
    if labels is None:
        return None
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor of shape [n], got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must have an integer dtype, got {labels.dtype}; convert with .long()")
    if labels.dim() != 1 or labels.shape[0] != inputs.shape[0]:
        raise ValueError(
            f"labels must be 1-D with one label per input ({inputs.shape[0]}), got shape {tuple(labels.shape)}"
        )
    return labels.to(inputs.device)


def _require_labels(labels: Tensor | None) -> Tensor:
    if labels is None:
        raise TypeError("labels are required for class-based pairs; use random_pairs for unlabelled inputs")
    return labels


def _check_positive_int(value: int, name: str) -> None:
    _check_int(value, name)
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")


def _check_non_negative_int(value: int, name: str) -> None:
    _check_int(value, name)
    if value < 0:
        raise ValueError(f"{name} must be at least 0, got {value}")


def _check_int(value: int, name: str) -> None:
    if not is_int(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")


def _check_class_count(classes: Tensor, include_same_class: bool) -> None:
    if len(classes) == 1 and not include_same_class:
        raise ValueError(
            f"labels contain the single class {classes[0].item()}, so with include_same_class=False there are "
            "no class pairs; pass include_same_class=True or add samples of another class"
        )


def _check_min_class_size(classes: Tensor, counts: Tensor, minimum: int, fix: str) -> None:
    small = torch.nonzero(counts < minimum).flatten()
    if len(small) > 0:
        first = int(small[0])
        raise ValueError(
            f"class {classes[first].item()} has {int(counts[first])} sample(s) but at least {minimum} are needed; {fix}"
        )


def _as_generator(generator: GeneratorLike) -> torch.Generator:
    if isinstance(generator, torch.Generator):
        return generator
    if generator is None:
        generator = 0
    _check_int(generator, "generator (a torch.Generator, an int seed or None)")
    return torch.Generator().manual_seed(generator)


# --- pair construction --------------------------------------------------------------------------------


def _gather_pairs(points: Tensor, labels: Tensor | None, starts: Tensor, ends: Tensor) -> PairBatch:
    if labels is None:
        return PairBatch(points[starts], points[ends])
    return PairBatch(points[starts], points[ends], labels[starts], labels[ends])


def _group_by_class(inverse: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """Sample indices sorted by class (stable), and where each class starts in that order."""
    return torch.argsort(inverse, stable=True), torch.cumsum(counts, 0) - counts


def _distinct_index_pairs(n: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """All ordered ``(i, j)`` with ``i != j``, ordered by ``i`` then ``j``."""
    grid = torch.arange(n, device=device)
    starts, ends = torch.meshgrid(grid, grid, indexing="ij")
    keep = starts != ends
    return starts[keep], ends[keep]


def _class_pair_indices(num_classes: int, include_same_class: bool, device: torch.device) -> tuple[Tensor, Tensor]:
    """Class indices of every ordered class pair, in sorted order."""
    grid = torch.arange(num_classes, device=device)
    first, second = (t.flatten() for t in torch.meshgrid(grid, grid, indexing="ij"))
    if include_same_class:
        return first, second
    keep = first != second
    return first[keep], second[keep]


def _spread(total: int, bins: int, generator: torch.Generator, device: torch.device) -> Tensor:
    """Splits ``total`` over ``bins`` evenly; the remainder goes one each to a random subset of bins."""
    counts = torch.full((bins,), total // bins, dtype=torch.long)
    counts[torch.randperm(bins, generator=generator, device=generator.device)[: total % bins].cpu()] += 1
    return counts.to(device)


def _uniform_below(high: Tensor, generator: torch.Generator) -> Tensor:
    """Independent uniform integers in ``[0, high)``, elementwise, on ``high``'s device."""
    uniform = torch.rand(high.shape, generator=generator, device=generator.device, dtype=torch.float64)
    bound = high.to(generator.device)
    return torch.minimum((uniform * bound).long(), bound - 1).to(high.device)


def _draw_positions(
    start_sizes: Tensor, end_sizes: Tensor, distinct: Tensor, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Uniform positions within groups; where ``distinct``, the end position differs from the start's."""
    starts = _uniform_below(start_sizes, generator)
    ends = _uniform_below(end_sizes - distinct.long(), generator)
    return starts, ends + (distinct & (ends >= starts)).long()


# --- k-means ------------------------------------------------------------------------------------------


def _flatten(points: Tensor) -> Tensor:
    return points.reshape(points.shape[0], -1).to(torch.promote_types(points.dtype, torch.float32))


def _batched_kmeans(
    points: Tensor, mask: Tensor, k: int, iterations: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """k-means on ``B`` padded point sets ``[B, N, D]`` at once; ``mask [B, N]`` marks the real points.

    Returns centroids ``[B, k, D]`` and assignments ``[B, N]`` (0 for padding).
    """
    centroids = _kmeanspp_init(points, mask, k, generator)
    assignment, distance = _assign(points, mask, centroids)
    for _ in range(iterations):
        centroids = _update_centroids(points, mask, assignment, distance, centroids)
        new_assignment, distance = _assign(points, mask, centroids)
        if torch.equal(new_assignment, assignment):
            break
        assignment = new_assignment
    return centroids, assignment


def _kmeanspp_init(points: Tensor, mask: Tensor, k: int, generator: torch.Generator) -> Tensor:
    batch = torch.arange(points.shape[0], device=points.device)
    chosen = _sample_weighted(mask.to(points.dtype), generator)
    centroids = [points[batch, chosen]]
    nearest = _squared_distances(points, centroids[0][:, None])[..., 0]
    for _ in range(1, k):
        weights = nearest.masked_fill(~mask, 0)
        # All real points already coincide with a centroid: fall back to uniform over real points.
        weights = torch.where(weights.sum(1, keepdim=True) > 0, weights, mask.to(points.dtype))
        chosen = _sample_weighted(weights, generator)
        centroids.append(points[batch, chosen])
        nearest = torch.minimum(nearest, _squared_distances(points, centroids[-1][:, None])[..., 0])
    return torch.stack(centroids, 1)


def _sample_weighted(weights: Tensor, generator: torch.Generator) -> Tensor:
    """One index per row of ``weights [B, N]`` with probability proportional to the (non-negative) weights."""
    cdf = torch.cumsum(weights.to(generator.device, torch.float64), 1)
    target = torch.rand(cdf.shape[0], 1, generator=generator, device=generator.device, dtype=torch.float64)
    chosen = torch.searchsorted(cdf, target * cdf[:, -1:], right=True)[:, 0]
    # Guard against rounding past the last positive weight.
    last_positive = (weights.to(generator.device) > 0).cumsum(1).argmax(1)
    return torch.minimum(chosen, last_positive).to(weights.device)


def _squared_distances(points: Tensor, centroids: Tensor) -> Tensor:
    """Squared Euclidean distances ``[B, N, k]`` between ``points [B, N, D]`` and ``centroids [B, k, D]``."""
    return torch.cdist(points, centroids).square()


def _assign(points: Tensor, mask: Tensor, centroids: Tensor) -> tuple[Tensor, Tensor]:
    """Nearest centroid of each point and the squared distance to it (both 0 for padding)."""
    distance, assignment = _squared_distances(points, centroids).min(2)
    return assignment.masked_fill(~mask, 0), distance.masked_fill(~mask, 0)


def _update_centroids(points: Tensor, mask: Tensor, assignment: Tensor, distance: Tensor, centroids: Tensor) -> Tensor:
    """Lloyd update: cluster means, with empty clusters re-seeded at the farthest points."""
    weight = mask.to(points.dtype)
    sums = torch.zeros_like(centroids).scatter_add_(
        1, assignment[..., None].expand_as(points), points * weight[..., None]
    )
    counts = torch.zeros(centroids.shape[:2], dtype=points.dtype, device=points.device)
    counts.scatter_add_(1, assignment, weight)
    means = sums / counts.clamp(min=1)[..., None]
    empty = counts == 0
    if not bool(empty.any()):
        return means
    batch = torch.arange(points.shape[0], device=points.device)
    remaining = distance.masked_fill(~mask, -torch.inf)
    for cluster in range(centroids.shape[1]):
        farthest = remaining.argmax(1)
        reseed = empty[:, cluster]
        means[:, cluster] = torch.where(reseed[:, None], points[batch, farthest], means[:, cluster])
        remaining[batch[reseed], farthest[reseed]] = -torch.inf
    return means
