"""The result of measuring folding along a batch of paths."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from torch import Tensor

__all__ = ["FoldingResult"]


@dataclass(frozen=True)
class FoldingResult:
    """Folding of P paths, for the whole network and per activation layer.

    Attributes:
        chi: Folding of each path over all selected layers' bits, ``[P]``.
        r1: Range of each path (largest Hamming distance from its start), ``[P]``.
        r2: Length of each path (sum of Hamming distances between consecutive points), ``[P]``.
        layer_chi: Folding of each path on each layer's bits alone, ``[P, L]``.
        layer_r1: Range per layer, ``[P, L]``.
        layer_r2: Length per layer, ``[P, L]``.
        layer_names: The L layer names, in forward order.
        steps: Number of segments each path was cut into (``steps + 1`` points); ``None`` for an exact traversal.
        chi_max: Maximal folding of each path over its prefixes, ``max_j chi(pi_0 .. pi_j)`` (``>= chi``), ``[P]``:
            the value behind the papers' "median of maxima of non-zero space folding".
        layer_chi_max: The same on each layer's bits alone, ``[P, L]``.
        distances: Hamming distance from the start at every point, ``[P, steps + 1]``, when requested.
        walked: Length walked from the start to every point (the running ``r2``), ``[P, steps + 1]``, with
            ``distances``.
        regions: Number of activation regions each path crosses, ``[P]`` (exact traversal only).
    """

    chi: Tensor
    r1: Tensor
    r2: Tensor
    layer_chi: Tensor
    layer_r1: Tensor
    layer_r2: Tensor
    layer_names: list[str]
    steps: int | None
    chi_max: Tensor
    layer_chi_max: Tensor
    distances: Tensor | None = None
    walked: Tensor | None = None
    regions: Tensor | None = None

    def __len__(self) -> int:
        return len(self.chi)

    def select(self, index: Tensor | slice) -> FoldingResult:
        """The result of the paths at ``index`` (an index tensor, a boolean mask or a slice)."""
        per_path = (
            "chi",
            "r1",
            "r2",
            "layer_chi",
            "layer_r1",
            "layer_r2",
            "chi_max",
            "layer_chi_max",
            "distances",
            "walked",
            "regions",
        )
        selected: dict[str, Tensor | None] = {name: getattr(self, name) for name in per_path}
        changes: dict[str, Any] = {name: None if value is None else value[index] for name, value in selected.items()}
        return replace(self, **changes)
