"""The folding measure of one path, as pure tensor functions.

A path is a sequence of activation patterns ``pi_0 .. pi_{N-1}`` (``[..., N, M]``: N points, M binary units).
With ``d_H`` the Hamming distance, the range is ``r1 = max_i d_H(pi_0, pi_i)``, the length is
``r2 = sum_i d_H(pi_i, pi_{i+1})`` and the folding is ``chi = 1 - r1 / r2`` (``0`` when ``r2 = 0``). Every function
is batched over the leading dimensions, differentiable nowhere (patterns are discrete) and device-agnostic.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "fold_measure",
    "fold_ranges",
    "greater_than_zero",
    "folding_from_ranges",
    "count_ones",
    "interaction_profile",
    "max_fold_measure",
    "pack_words",
    "prefix_folding",
    "popcount",
    "segment_sums",
    "step_distances",
    "symmetric_fold_measure",
]


def _as_patterns(patterns: Tensor) -> Tensor:
    if not isinstance(patterns, Tensor):
        raise TypeError(f"`patterns` must be a torch.Tensor, got {type(patterns).__name__}.")
    if patterns.ndim < 2:
        raise ValueError(
            f"`patterns` must have shape [..., N, M] (N points along the path, M units), got {tuple(patterns.shape)}."
        )
    if patterns.shape[-2] == 0:
        raise ValueError("`patterns` holds no point along the path (N = 0); a path needs at least one pattern.")
    if patterns.dtype == torch.bool:
        return patterns
    if not bool(((patterns == 0) | (patterns == 1)).all()):
        raise ValueError("`patterns` must be boolean or hold only 0 and 1; binarise activations first (z > 0).")
    return patterns != 0


def count_ones(bits: Tensor) -> Tensor:
    """Number of ``True`` values along the last dimension of a boolean tensor.

    Summing bytes one by one is the slowest step of a measurement on CPU, so eight 0/1 bytes are added at once as
    the byte lanes of one int64 word. A lane holds at most 255 before it would carry into the next one, so words
    are added in blocks of 255 and the lanes of the block sums last. Exact; falls back to a plain sum when the last
    dimension is not a multiple of 8 or not contiguous.

    Args:
        bits: Boolean tensor ``[..., M]``.

    Returns:
        ``int64`` counts ``[...]``.
    """
    width = bits.shape[-1]
    if (
        width % 8
        or bits.stride(-1) != 1
        or bits.storage_offset() % 8
        or any(stride % 8 for stride in bits.stride()[:-1])
    ):
        return bits.sum(-1, dtype=torch.int64)
    words = bits.view(torch.int64)
    whole = words.shape[-1] // 255 * 255
    lanes = torch.cat(
        [words[..., :whole].unflatten(-1, (-1, 255)).sum(-1), words[..., whole:].sum(-1, keepdim=True)], dim=-1
    )
    return lanes.view(torch.uint8).sum(-1, dtype=torch.int64)


# Each 0/1 byte of a word times this lands at a distinct bit; the top byte collects byte i at bit i, with no carry.
_GATHER_BYTES = 0x0102040810204080
_ODD_BITS, _BIT_PAIRS, _NIBBLES, _BYTE_ONES = (
    0x5555555555555555,
    0x3333333333333333,
    0x0F0F0F0F0F0F0F0F,
    0x0101010101010101,
)


def _by_numpy(tensor: Tensor) -> bool:
    """Whether to compare, pack and count with NumPy: a third to a tenth of torch's time on CPU.

    Plain CPU tensors only, outside compiled code (where torch's operations fuse).
    """
    return type(tensor) is Tensor and tensor.device.type == "cpu" and not torch.compiler.is_compiling()


_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)  # bfloat16 has no NumPy dtype


def greater_than_zero(values: Tensor) -> Tensor:
    """``values > 0`` as a boolean tensor: the bit of an activation's pre-activation (by NumPy where it can).

    Args:
        values: Floating-point tensor.

    Returns:
        Boolean tensor of the same shape.
    """
    if _by_numpy(values) and values.dtype in _NUMPY_FLOATS:
        return torch.from_numpy(np.greater(values.detach().numpy(), 0))
    return values > 0


def pack_words(bits: Tensor) -> Tensor:
    """Pack boolean patterns 64 units to an ``int64`` word, for counting with :func:`popcount`.

    On CPU by NumPy's ``packbits``; elsewhere the bools are read as int64 words of eight 0/1 bytes, and one
    multiplication gathers each word's eight bytes into one byte: a handful of passes over an eighth of the data,
    instead of one per unit.

    Args:
        bits: Boolean tensor ``[..., M]``.

    Returns:
        ``int64`` tensor ``[..., ceil(M / 64)]``; the last word is padded with zeros. Unit ``j`` is bit ``j % 64``
        of word ``j // 64`` on a little-endian machine (and at a fixed position on any machine).
    """
    if _by_numpy(bits):
        packed = torch.from_numpy(np.packbits(bits.numpy(), axis=-1, bitorder="little"))
    else:
        packed = _gather_bytes(bits)
    if packed.shape[-1] % 8:
        packed = torch.nn.functional.pad(packed, (0, -packed.shape[-1] % 8))
    return packed.view(torch.int64)


def _gather_bytes(bits: Tensor) -> Tensor:
    """Eight units to a byte, ``[..., M]`` to ``uint8 [..., ceil(M / 8)]``, unit ``j`` at bit ``j % 8``."""
    if bits.shape[-1] % 8:
        bits = torch.nn.functional.pad(bits, (0, -bits.shape[-1] % 8))
    bits = bits.contiguous()
    if bits.storage_offset() % 8:
        bits = bits.clone()
    gathered = bits.view(torch.int64) * _GATHER_BYTES
    return gathered.bitwise_right_shift_(56).to(torch.uint8)  # the cast keeps the low byte


def popcount(words: Tensor) -> Tensor:
    """Number of set bits of each ``int64`` word, ``[...]`` to ``int64 [...]``.

    On CPU by NumPy's ``bitwise_count``; elsewhere in a few integer operations (SWAR).

    Raises:
        TypeError: If ``words`` is not ``int64`` (the words of :func:`pack_words`).
    """
    if words.dtype != torch.int64:
        raise TypeError(f"`words` must be int64 words (pack_words), got {words.dtype}.")
    if _by_numpy(words):
        # Unsigned: NumPy counts the bits of a signed integer's absolute value.
        return torch.from_numpy(np.bitwise_count(words.numpy().view(np.uint64))).to(torch.int64)
    return _popcount_swar(words)


def _popcount_swar(words: Tensor) -> Tensor:
    # In place where possible: each temporary is as large as the words.
    shifted = words >> 1
    shifted &= _ODD_BITS  # the masks drop the sign bits that >> shifts in
    counts = words - shifted  # 2-bit counts
    shifted = counts >> 2
    shifted &= _BIT_PAIRS
    counts &= _BIT_PAIRS
    counts += shifted  # 4-bit counts
    counts += counts >> 4
    counts &= _NIBBLES  # 8-bit counts
    counts *= _BYTE_ONES  # the top byte sums all eight bytes
    return counts.bitwise_right_shift_(56)


def segment_sums(values: Tensor, widths: Sequence[int], *, total: bool = False) -> Tensor:
    """Sums of consecutive segments of the last dimension: one count per layer of a concatenated pattern.

    One matrix product with a 0/1 matrix, in float64 (exact for sums below 2**53); on Apple's MPS, which has no
    float64, in float32 (exact for sums below 2**24).

    Args:
        values: Integer tensor ``[..., W]`` (e.g. :func:`popcount` of packed words).
        widths: Length of each segment, summing to ``W``.
        total: Also the sum of all of them, as a last column.

    Returns:
        ``int64`` tensor ``[..., len(widths)]``, or ``[..., len(widths) + 1]`` with ``total``.
    """
    matrix = _segment_matrix(tuple(widths), total, values.device)
    return (values.to(matrix.dtype) @ matrix).to(torch.int64)


@functools.lru_cache(maxsize=16)
def _segment_matrix(widths: tuple[int, ...], total: bool, device: torch.device) -> Tensor:
    """The 0/1 matrix of :func:`segment_sums` (built once per layout: a measurement sums every chunk with it)."""
    segment = torch.repeat_interleave(torch.tensor(widths, device=device))
    columns = [torch.nn.functional.one_hot(segment, len(widths))]
    if total:
        columns.append(torch.ones_like(segment).unsqueeze(1))
    return torch.cat(columns, dim=1).to(torch.float32 if device.type == "mps" else torch.float64)


def step_distances(patterns: Tensor, start: Tensor, previous: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Hamming distances of each pattern to the path's start and to the pattern before it.

    This is the one place the measure compares units; streaming callers feed a path in chunks.

    Args:
        patterns: Boolean patterns ``[..., K, M]`` of K consecutive points.
        start: Boolean start pattern ``[..., M]`` of the path.
        previous: Boolean pattern ``[..., M]`` of the point before the chunk, or ``None`` when the chunk opens
            the path (its first point then has no predecessor and adds 0 to the length).

    Returns:
        ``(from_start, from_previous)``, both ``int64`` ``[..., K]``.
    """
    from_start = count_ones(patterns ^ start.unsqueeze(-2))
    before = patterns[..., :1, :] if previous is None else previous.unsqueeze(-2)
    from_previous = torch.cat(
        [count_ones(patterns[..., :1, :] ^ before), count_ones(patterns[..., 1:, :] ^ patterns[..., :-1, :])], dim=-1
    )
    return from_start, from_previous


def folding_from_ranges(r1: Tensor, r2: Tensor) -> Tensor:
    """``chi = 1 - r1 / r2``, and ``0`` where ``r2 = 0`` (the path never leaves its starting class).

    Args:
        r1: Range of each path (largest Hamming distance from the start).
        r2: Length of each path (sum of Hamming distances between consecutive patterns).

    Returns:
        Folding in the default floating dtype (at least float32), same shape as the inputs.
    """
    # At least float32, also where a precision plugin made bfloat16 the default (chi = 7/9 would read 0.7773).
    dtype = torch.promote_types(torch.get_default_dtype(), torch.float32)
    r1, r2 = r1.to(dtype), r2.to(dtype)
    return torch.where(r2 > 0, 1 - r1 / r2.clamp_min(1), torch.zeros_like(r2))


def prefix_folding(
    from_start: Tensor, from_previous: Tensor, r1: Tensor | None = None, r2: Tensor | None = None
) -> Tensor:
    """Folding ``chi_j`` of every prefix of a walk, from the distances of its points (specification, section 4).

    ``chi_j = 1 - r1(j) / r2(j)`` with the prefix's range ``r1(j) = max_{i <= j} d_H(pi_0, pi_i)`` and length
    ``r2(j) = sum_{i < j} d_H(pi_i, pi_{i+1})``. Streaming callers feed a walk in chunks of consecutive points and
    pass the range and length of the walk before the chunk.

    Args:
        from_start: Distances to the walk's start ``[..., K]`` of K consecutive points (:func:`step_distances`).
        from_previous: Distances to the point before each, same shape (0 for the walk's first point).
        r1: Range of the walk before the chunk, ``[...]``; ``None`` when the chunk opens the walk.
        r2: Length of the walk before the chunk, ``[...]``; ``None`` when the chunk opens the walk.

    Returns:
        ``chi_j`` of the prefixes that end at each of the K points, ``[..., K]``.
    """
    prefix_r1, prefix_r2 = from_start.cummax(-1).values, from_previous.cumsum(-1)
    if r1 is not None:
        prefix_r1 = torch.maximum(prefix_r1, r1.unsqueeze(-1))
    if r2 is not None:
        prefix_r2 = prefix_r2 + r2.unsqueeze(-1)
    return folding_from_ranges(prefix_r1, prefix_r2)


def fold_ranges(patterns: Tensor) -> tuple[Tensor, Tensor]:
    """Range ``r1`` and length ``r2`` of each path.

    Args:
        patterns: Boolean or 0/1 tensor ``[..., N, M]``: N patterns along each path, M units each.

    Returns:
        ``(r1, r2)``, integer tensors of shape ``[...]``.

    Raises:
        TypeError: If ``patterns`` is not a tensor.
        ValueError: If it has fewer than 2 dimensions, no point, or values other than 0 and 1.

    Examples:
        The walk 100, 101, 111, 110 is at Hamming distances 0, 1, 2, 1 from its start, one bit a step:

        >>> fold_ranges(torch.tensor([[1, 0, 0], [1, 0, 1], [1, 1, 1], [1, 1, 0]]))
        (tensor(2), tensor(3))
    """
    patterns = _as_patterns(patterns)
    from_start, from_previous = step_distances(patterns, patterns[..., 0, :])
    return from_start.amax(-1), from_previous.sum(-1)


def fold_measure(patterns: Tensor) -> Tensor:
    """Folding ``chi`` of each path of activation patterns (specification, section 2).

    Args:
        patterns: Boolean or 0/1 tensor ``[..., N, M]``: N patterns along each path, M units each.

    Returns:
        ``chi`` in ``[0, 1)``, shape ``[...]``.

    Examples:
        The walk 0000, 1100, 0011 is at distances 0, 2, 2 from its start and 2 + 4 bits long: ``chi = 1 - 2/6``.
        Batched, with a walk that never turns back (``chi = 0``):

        >>> fold_measure(torch.tensor([[0, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1]]))
        tensor(0.6667)
        >>> fold_measure(torch.tensor([[[0, 0], [1, 1], [1, 0]], [[0, 0], [1, 0], [1, 1]]]))
        tensor([0.3333, 0.0000])
    """
    return folding_from_ranges(*fold_ranges(patterns))


def max_fold_measure(patterns: Tensor) -> Tensor:
    """Maximal folding ``chi_max`` of each path over its prefixes (specification, section 4).

    ``chi_max = max_j chi(pi_0 .. pi_j)``: how far the walk had folded at its most folded point, ``>= chi`` (the
    whole walk is its last prefix). The papers' global figure is "the aggregated median of maxima of non-zero space
    folding", a statistic of this value over paths.

    Args:
        patterns: Boolean or 0/1 tensor ``[..., N, M]``: N patterns along each path, M units each.

    Returns:
        ``chi_max`` in ``[0, 1)``, shape ``[...]``.

    Raises:
        TypeError: If ``patterns`` is not a tensor.
        ValueError: If it has fewer than 2 dimensions, no point, or values other than 0 and 1.

    Examples:
        The walk 00, 10, 00, 01, 11 has prefix foldings 0, 1/2, 2/3, 1/2: it ends at ``chi = 1/2`` but folded to
        2/3 on its way.

        >>> walk = torch.tensor([[0, 0], [1, 0], [0, 0], [0, 1], [1, 1]])
        >>> fold_measure(walk), max_fold_measure(walk)
        (tensor(0.5000), tensor(0.6667))
    """
    patterns = _as_patterns(patterns)
    return prefix_folding(*step_distances(patterns, patterns[..., 0, :])).amax(-1)


def symmetric_fold_measure(patterns: Tensor) -> Tensor:
    """Symmetrised folding of a pair, ``(chi(x1 -> x2) + chi(x2 -> x1)) / 2``.

    Args:
        patterns: Boolean or 0/1 tensor ``[..., N, M]`` along the path from ``x1`` to ``x2``.

    Returns:
        The symmetrised folding, shape ``[...]``.

    Examples:
        00, 11, 10 has ``r1 = 2``, ``r2 = 3`` (``chi = 1/3``); backwards, 10, 11, 00 has ``r1 = 1``, ``r2 = 3``
        (``chi = 2/3``):

        >>> symmetric_fold_measure(torch.tensor([[0, 0], [1, 1], [1, 0]]))
        tensor(0.5000)
    """
    patterns = _as_patterns(patterns)
    return (fold_measure(patterns) + fold_measure(patterns.flip(-2))) / 2


def interaction_profile(patterns: Tensor) -> Tensor:
    """Interaction ``I(k) = chi(pi_0..pi_last) - chi(pi_0..pi_k) - chi(pi_k..pi_last)`` at every point k.

    Positive where the whole path folds more than its two halves together. Computed for all k at once: prefix
    ranges are running maxima and sums; suffix ranges come from the pairwise Hamming distance matrix, so the
    memory is ``O(N^2)`` per path on top of the patterns.

    Args:
        patterns: Boolean or 0/1 tensor ``[..., N, M]``.

    Returns:
        ``I`` of shape ``[..., N]`` (zero at both ends by construction).

    Examples:
        The walk 100, 101, 111, 110 folds (``chi = 1/3``) but neither 100, 101 nor 101, 111, 110 does, and neither
        100, 101, 111 nor 111, 110:

        >>> interaction_profile(torch.tensor([[1, 0, 0], [1, 0, 1], [1, 1, 1], [1, 1, 0]]))
        tensor([0.0000, 0.3333, 0.3333, 0.0000])
    """
    patterns = _as_patterns(patterns)
    from_start, from_previous = step_distances(patterns, patterns[..., 0, :])
    prefix_r1 = from_start.cummax(-1).values
    total_r2 = from_previous.sum(-1, keepdim=True)
    # Pairwise Hamming distances |a| + |b| - 2 a.b, exact in float64 for any realistic unit count.
    bits = patterns.to(torch.float64)
    ones = bits.sum(-1)
    pairwise = ones.unsqueeze(-1) + ones.unsqueeze(-2) - 2 * bits @ bits.transpose(-1, -2)
    n = patterns.shape[-2]
    later = torch.ones(n, n, dtype=torch.bool, device=patterns.device).triu()
    suffix_r1 = pairwise.masked_fill(~later, 0).amax(-1).round().to(from_start.dtype)
    whole = folding_from_ranges(prefix_r1[..., -1:], total_r2)
    suffix_r2 = total_r2 - from_previous.cumsum(-1)
    return whole - prefix_folding(from_start, from_previous) - folding_from_ranges(suffix_r1, suffix_r2)
