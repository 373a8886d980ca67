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
from matplotlib.axes import Axes
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from numpy.typing import ArrayLike

__all__ = ["class_pair_figure", "distance_figure", "layer_figure", "measurement_figures", "region_figure"]


def distance_figure(
    from_start: ArrayLike, walked: ArrayLike, chi: ArrayLike, indices: Sequence[int] | None = None
) -> Figure:
    """The walks of a few paths on the Hamming cube: how far each gets from its start, and how far it has walked.

    The highest point of a solid line is the path's range ``r1``, the end of its dashed line the length ``r2``,
    and ``chi = 1 - r1 / r2``: a path folds when its walk is longer than the farthest distance it reaches.

    Args:
        from_start: ``[P, N]`` Hamming distance from each path's start at each of its N points.
        walked: ``[P, N]`` length walked so far (cumulative Hamming distance between consecutive points).
        chi: ``[P]`` folding of each path, shown in the legend.
        indices: The number of each path in the legend; ``0 .. P - 1`` by default.

    Returns:
        The figure.
    """
    from_start, walked, chi = np.asarray(from_start), np.asarray(walked), np.asarray(chi)
    indices = range(len(from_start)) if indices is None else indices
    figure = Figure(figsize=(6.5, 4), layout="constrained")
    axes = figure.add_subplot()
    t = np.linspace(0, 1, from_start.shape[-1])
    for position, (index, distance, length, value) in enumerate(zip(indices, from_start, walked, chi, strict=True)):
        colour = f"C{position}"
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


def region_figure(
    ids: ArrayLike,
    colours: ArrayLike,
    extent: tuple[float, float, float, float],
    arrows: ArrayLike | None = None,
    labels: Sequence[str] = (),
    title: str | None = None,
    axes: Axes | None = None,
) -> Figure:
    """A plane coloured by activation pattern, with paths drawn as arrows labelled at their starts.

    Args:
        ids: ``[H, W]`` pattern number (``0 .. K - 1``) of each grid point, the first row at the top.
        colours: ``[K, 3]`` RGB colour of each pattern number, in ``[0, 1]``.
        extent: ``(left, right, bottom, top)`` plane coordinates of the grid's edges.
        arrows: ``[A, 2, 2]`` plane coordinates of each arrow's start and end; none by default.
        labels: The text written at each arrow's start (its chi), one per arrow.
        title: The axes' title.
        axes: Draw into these axes (of a figure with other panels); a new figure by default.

    Returns:
        The figure (the one that holds ``axes`` when given).
    """
    ids = np.asarray(ids)
    if axes is None:
        axes = Figure(figsize=(5, 5), layout="constrained").add_subplot()
    colour_map = ListedColormap(np.asarray(colours)[: int(ids.max()) + 1])
    axes.imshow(ids, cmap=colour_map, extent=extent, interpolation="nearest")
    for (start, end), label in zip(np.zeros((0, 2, 2)) if arrows is None else np.asarray(arrows), labels, strict=True):
        axes.annotate(
            "", xy=tuple(end), xytext=tuple(start), arrowprops={"arrowstyle": "->", "color": "black", "lw": 1.5}
        )
        axes.text(start[0], start[1], label, fontsize=8, ha="center", va="bottom", backgroundcolor="white")
    if title is not None:
        axes.set_title(title, fontsize=10)
    figure = axes.figure
    return figure if isinstance(figure, Figure) else figure.figure  # the root of a subfigure


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
