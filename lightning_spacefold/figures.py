"""Matplotlib figures of folding measurements. Pure plotting: no torch, no Lightning, no logger.

Each function returns a new ``matplotlib.figure.Figure`` (built with the object-oriented API, so it works without a
display and never touches pyplot's global state); the caller closes it. Inputs are NumPy arrays or anything
``numpy.asarray`` takes (CPU tensors included). Without torch this module also loads in the process that draws the
callback's figures (:mod:`lightning_spacefold.figure_process`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from numpy.typing import ArrayLike

__all__ = ["class_pair_figure", "distance_figure", "layer_figure", "measurement_figures"]


def distance_figure(from_start: ArrayLike, walked: ArrayLike, chi: ArrayLike) -> Figure:
    """The walks of a few paths on the Hamming cube: how far each gets from its start, and how far it has walked.

    The highest point of a solid line is the path's range ``r1``, the end of its dashed line the length ``r2``,
    and ``chi = 1 - r1 / r2``: a path folds when its walk is longer than the farthest distance it reaches.

    Args:
        from_start: ``[P, N]`` Hamming distance from each path's start at each of its N points.
        walked: ``[P, N]`` length walked so far (cumulative Hamming distance between consecutive points).
        chi: ``[P]`` folding of each path, shown in the legend.

    Returns:
        The figure.
    """
    from_start, walked, chi = np.asarray(from_start), np.asarray(walked), np.asarray(chi)
    figure = Figure(figsize=(6.5, 4), layout="constrained")
    axes = figure.add_subplot()
    t = np.linspace(0, 1, from_start.shape[-1])
    for index, (distance, length, value) in enumerate(zip(from_start, walked, chi, strict=True)):
        colour = f"C{index}"
        axes.plot(t, distance, drawstyle="steps-post", color=colour, label=f"path {index}: chi = {value:.3f}")
        axes.plot(t, length, drawstyle="steps-post", color=colour, linestyle="--", alpha=0.6)
    axes.set_xlabel("t along the segment")
    axes.set_ylabel("Hamming distance")
    axes.set_title("solid: distance from the start (max = r1); dashed: length walked (end = r2)", fontsize="small")
    axes.legend(fontsize="small")
    return figure


def class_pair_figure(matrix: ArrayLike, class_names: Sequence[str] | None = None) -> Figure:
    """Mean folding per (start class, end class) as a heatmap; NaN (no path) is left blank.

    Args:
        matrix: ``[C, C]`` mean chi of the paths from class ``a`` (row) to class ``b`` (column).
        class_names: Tick labels; the class indices by default.

    Returns:
        The figure.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    figure = Figure(figsize=(5, 4.2), layout="constrained")
    axes = figure.add_subplot()
    image = axes.imshow(matrix, cmap="viridis", vmin=0)
    ticks = range(len(matrix))
    labels = list(class_names) if class_names is not None else [str(index) for index in ticks]
    axes.set_xticks(ticks, labels)
    axes.set_yticks(ticks, labels)
    axes.set_xlabel("end class")
    axes.set_ylabel("start class")
    figure.colorbar(image, ax=axes, label="mean chi")
    return figure


def layer_figure(names: Sequence[str], values: ArrayLike) -> Figure:
    """Mean folding of each layer, in forward order, as a bar chart.

    Args:
        names: Layer names.
        values: ``[L]`` mean chi per layer.

    Returns:
        The figure.
    """
    figure = Figure(figsize=(max(4.0, 0.5 * len(names) + 2), 3.5), layout="constrained")
    axes = figure.add_subplot()
    axes.bar(range(len(names)), np.asarray(values, dtype=np.float64))
    axes.set_xticks(range(len(names)), names, rotation=45, ha="right")
    axes.set_ylabel("mean chi")
    axes.set_xlabel("layer (forward order)")
    return figure


def measurement_figures(views: Mapping[str, Any]) -> dict[str, Figure]:
    """The callback's figures of one measurement, from the arrays that ``views.figure_views`` collects.

    Args:
        views: ``from_start``, ``walked`` and ``chi`` of the example paths, ``layer_names`` and ``layer_values``, and
            ``class_pairs`` (a ``[C, C]`` matrix, or ``None`` without class pairs).

    Returns:
        ``example_paths``, ``layers`` and, with class pairs, ``class_pairs``.
    """
    figures = {
        "example_paths": distance_figure(views["from_start"], views["walked"], views["chi"]),
        "layers": layer_figure(views["layer_names"], views["layer_values"]),
    }
    if views["class_pairs"] is not None:
        figures["class_pairs"] = class_pair_figure(views["class_pairs"])
    return figures
