"""Figures of results for notebooks: of a FoldingResult, of per-path chi by class, of a model's regions on a plane.

Each function returns a new ``matplotlib.figure.Figure`` (drawn by :mod:`lightning_spacefold.figures`, the code that
draws the callback's figures; no pyplot state is touched): save it with ``figure.savefig("walks.png")``, or in
Jupyter, after ``%matplotlib inline``, leave it as a cell's value. The guide "Figures of results" shows each one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from torch import Tensor, nn

from lightning_spacefold import figures
from lightning_spacefold.checks import is_int
from lightning_spacefold.folding import Forward, path_folding, path_patterns
from lightning_spacefold.result import FoldingResult

__all__ = ["class_pairs", "layers", "regions", "walks"]

DRAWN_PATHS = 5
"""How many paths :func:`walks` draws by default (the first ones)."""


def walks(result: FoldingResult, paths: Sequence[int] | None = None) -> Figure:
    """The walk of each path on the Hamming cube: its distance from the start, and the length walked so far.

    A solid line's highest point is the path's range ``r1``, the end of its dashed line its length ``r2``, and
    ``chi = 1 - r1 / r2``: a path folds where the dashed line climbs while the solid one does not.

    Args:
        result: A result of :func:`~lightning_spacefold.path_folding` with ``return_distances=True``.
        paths: Indices of the paths to draw; the first five by default.

    Returns:
        The figure.

    Raises:
        TypeError: If ``result`` is not a ``FoldingResult``.
        ValueError: If the result has no distances, or ``paths`` is empty or out of range.

    Examples:
        The network of :func:`~lightning_spacefold.path_folding`'s example: the patterns of its four points are at
        distances 0, 1, 2, 1 from the start, after 0, 1, 2, 3 bit flips.

        >>> import torch
        >>> from torch import nn
        >>> from lightning_spacefold import path_folding, plots
        >>> model = nn.Sequential(nn.Linear(1, 2), nn.ReLU(), nn.Linear(2, 1), nn.ReLU())
        >>> nn.utils.vector_to_parameters(torch.tensor([1.0, 1.0, 0.0, -1.0, 1.0, -2.0, -0.5]), model.parameters())
        >>> result = path_folding(model, torch.tensor([[0.25]]), torch.tensor([[1.75]]), steps=3, return_distances=True)
        >>> figure = plots.walks(result)
        >>> solid, dashed = figure.axes[0].lines
        >>> solid.get_ydata().tolist(), dashed.get_ydata().tolist()
        ([0, 1, 2, 1], [0, 1, 2, 3])
    """
    _check_result(result)
    if result.distances is None or result.walked is None:
        raise ValueError(
            "This result has no distances along its paths; measure it with "
            "path_folding(..., return_distances=True) (sampled, not exact=True) to draw its walks."
        )
    chosen = list(range(min(len(result), DRAWN_PATHS))) if paths is None else list(paths)
    if not chosen or not all(is_int(index, 0) and index < len(result) for index in chosen):
        raise ValueError(f"`paths` must be a non-empty sequence of path indices in [0, {len(result)}), got {paths!r}.")
    index = torch.tensor(chosen)
    return figures.distance_figure(
        result.distances[index].cpu().numpy(),
        result.walked[index].cpu().numpy(),
        result.chi[index].float().cpu().numpy(),
        chosen,
    )


def layers(result: FoldingResult) -> Figure:
    """The mean folding of each layer over the result's paths, as a bar chart in forward order.

    Args:
        result: A result of :func:`~lightning_spacefold.path_folding`.

    Returns:
        The figure; bar ``l`` is ``result.layer_chi[:, l].mean()``.

    Raises:
        TypeError: If ``result`` is not a ``FoldingResult``.
        ValueError: If the result has no paths.
    """
    _check_result(result)
    if len(result) == 0:
        raise ValueError("The result has no paths; measure at least one path to draw its layers.")
    return figures.layer_figure(result.layer_names, result.layer_chi.double().mean(0).cpu().numpy())


def class_pairs(
    chi: Tensor | FoldingResult, labels_a: Tensor, labels_b: Tensor, num_classes: int | None = None
) -> Figure:
    """The mean chi of the paths from each class to each class, as a heatmap; blank where no path runs.

    Args:
        chi: ``[P]`` folding of each path, or a ``FoldingResult`` (its ``chi``).
        labels_a: ``[P]`` class of each path's start (integers in ``[0, num_classes)``), the heatmap's rows.
        labels_b: ``[P]`` class of each path's end, its columns.
        num_classes: The number of classes; the largest label plus one by default.

    Returns:
        The figure; cell ``(a, b)`` is the mean chi of the paths from class ``a`` to class ``b``, NaN (blank) where
        there is none.

    Raises:
        TypeError: If the arguments are not tensors of the right kind.
        ValueError: If their lengths differ, there are no paths, or a label lies outside ``[0, num_classes)``.

    Examples:
        >>> import torch
        >>> from lightning_spacefold import plots
        >>> chi = torch.tensor([0.25, 0.5, 0.75])  # paths from class 0 to 1, 0 to 1 and 1 to 0
        >>> figure = plots.class_pairs(chi, torch.tensor([0, 0, 1]), torch.tensor([1, 1, 0]))
        >>> figure.axes[0].images[0].get_array().filled(float("nan")).tolist()
        [[nan, 0.375], [0.75, nan]]
    """
    chi = chi.chi if isinstance(chi, FoldingResult) else chi
    if not isinstance(chi, Tensor) or not chi.is_floating_point():
        raise TypeError(f"`chi` must be a floating-point tensor [P] (or a FoldingResult), got {type(chi).__name__}.")
    if chi.ndim != 1 or len(chi) == 0:
        raise ValueError(f"`chi` must hold one value per path, shape [P] with P >= 1, got {tuple(chi.shape)}.")
    for name, labels in (("labels_a", labels_a), ("labels_b", labels_b)):
        if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.dtype == torch.bool:
            raise TypeError(f"`{name}` must be an integer tensor [P] (one class per path), got {labels!r}.")
        if labels.shape != chi.shape:
            raise ValueError(
                f"`{name}` must have one class per path, shape {tuple(chi.shape)}, got {tuple(labels.shape)}."
            )
    largest = int(torch.cat([labels_a, labels_b]).max())
    if num_classes is None:
        num_classes = largest + 1
    if not is_int(num_classes, 1):
        raise ValueError(f"`num_classes` must be None or an integer >= 1, got {num_classes!r}.")
    if int(torch.cat([labels_a, labels_b]).min()) < 0 or largest >= num_classes:
        raise ValueError(f"The labels must lie in [0, num_classes) = [0, {num_classes}); pass the right num_classes.")
    cells = (labels_a.cpu().long(), labels_b.cpu().long())
    sums = torch.zeros(num_classes, num_classes, dtype=torch.float64).index_put_(cells, chi.cpu().double(), True)
    counts = torch.zeros_like(sums).index_put_(cells, torch.ones_like(sums[0, 0]).expand(len(chi)), True)
    return figures.class_pair_figure((sums / counts).numpy())  # 0 / 0: NaN where no path runs


def regions(
    model: nn.Module,
    x0: Tensor,
    x1: Tensor,
    x2: Tensor,
    *,
    resolution: int = 200,
    span: tuple[float, float] = (-0.25, 1.25),
    paths: tuple[Tensor, Tensor] | None = None,
    layers: Sequence[str] | None = None,
    forward: Forward | None = None,
    steps: int = 256,
    title: str = "{patterns} activation patterns",
    axes: Axes | None = None,
) -> Figure:
    """The activation regions of the plane through three inputs, coloured by pattern, with paths and their chi.

    The plane's point at ``(a, b)`` is ``x0 + a (x1 - x0) + b (x2 - x0)``: ``x0`` lies at ``(0, 0)``, ``x1`` at
    ``(1, 0)`` and ``x2`` at ``(0, 1)`` (for inputs of two features, ``x0 = (0, 0)``, ``x1 = (1, 0)`` and
    ``x2 = (0, 1)`` make ``(a, b)`` the inputs' own coordinates). A grid of ``resolution`` x ``resolution`` points
    over ``span`` x ``span`` goes through the model in one forward pass (memory grows with ``resolution ** 2``);
    each distinct pattern gets its own colour. For a piecewise-linear network the patches are its linear regions
    cut by the plane; for smooth activations they are the papers' equivalence classes. Each path is drawn as an
    arrow, labelled with its chi on the same layers: exact (``chi=``) where the network is piecewise linear, else
    sampled at ``steps`` segments (``chi≈``).

    Args:
        model: The network; it takes a batch of inputs shaped like ``x0`` (or ``forward`` does).
        x0: The plane's origin, one input (without a batch dimension), floating point.
        x1: The input at ``(1, 0)``, shaped like ``x0``.
        x2: The input at ``(0, 1)``, shaped like ``x0``; ``x0``, ``x1`` and ``x2`` must not lie on one line.
        resolution: Grid points per side.
        span: The plane coordinates ``(lowest, highest)`` that the grid covers, along both axes.
        paths: ``(starts, ends)``, each ``[K, *input_shape]``, of the paths to draw; they must lie in the plane.
        layers: The layers whose patterns colour the plane and fold the paths (see
            :func:`~lightning_spacefold.path_folding`); ``None`` for all.
        forward: As in :func:`~lightning_spacefold.path_folding`.
        steps: Segments per path where chi is sampled (a network that is not piecewise linear).
        title: The title; ``{patterns}`` is replaced by the number of distinct patterns on the grid.
        axes: Draw into these axes (a panel of a larger figure); a new figure by default.

    Returns:
        The figure.

    Raises:
        TypeError: If the inputs are not floating-point tensors.
        ValueError: For inputs of different shapes, three points on one line, a ``resolution`` below 2, a path
            whose ends lie off the plane, or the errors of :func:`~lightning_spacefold.path_patterns`.

    Examples:
        Three ReLU units that cut the plane along the lines ``x = 0``, ``y = 0`` and ``x + y = 1`` in general
        position: 7 regions, all of them inside the square ``[-1, 2]^2``.

        >>> import torch
        >>> from torch import nn
        >>> from lightning_spacefold import plots
        >>> model = nn.Sequential(nn.Linear(2, 3), nn.ReLU())
        >>> nn.utils.vector_to_parameters(torch.tensor([1.0, 0, 0, 1, 1, 1, 0, 0, -1]), model.parameters())
        >>> x0, x1, x2 = torch.tensor([0.0, 0.0]), torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
        >>> figure = plots.regions(model, x0, x1, x2, resolution=60, span=(-1, 2))
        >>> figure.axes[0].get_title()
        '7 activation patterns'
    """
    basis, shape = _plane(x0, x1, x2)
    if not is_int(resolution, 2):
        raise ValueError(f"`resolution` must be an integer >= 2 (grid points per side), got {resolution!r}.")
    if not (isinstance(span, Sequence) and len(span) == 2 and float(span[0]) < float(span[1])):
        raise ValueError(f"`span` must be (lowest, highest) plane coordinates with lowest < highest, got {span!r}.")
    low, high = float(span[0]), float(span[1])
    flat_origin = x0.reshape(-1)
    # One path per grid row, from the row's left edge to its right edge: the grid in one forward pass.
    rows = torch.linspace(high, low, resolution, dtype=x0.dtype, device=x0.device)
    starts = flat_origin + low * basis[0] + rows[:, None] * basis[1]
    ends = flat_origin + high * basis[0] + rows[:, None] * basis[1]
    patterns = path_patterns(
        model,
        starts.view(-1, *shape),
        ends.view(-1, *shape),
        steps=resolution - 1,
        layers=layers,
        forward=forward,
    )
    _, ids = torch.unique(patterns.flatten(0, 1), dim=0, return_inverse=True)
    count = int(ids.max()) + 1
    # The same colours in every figure: pattern k (in the sorted order of the patterns) gets row k.
    colours = torch.rand(count, 3, generator=torch.Generator().manual_seed(0)) * 0.6 + 0.4
    arrows: Tensor | None = None
    labels: list[str] = []
    if paths is not None:
        arrows, labels = _drawn_paths(model, x0, basis, paths, layers, forward, steps)
    return figures.region_figure(
        ids.view(resolution, resolution).cpu().numpy(),
        colours.numpy(),
        (low, high, low, high),
        arrows,
        labels,
        title.format(patterns=count),
        axes,
    )


def _check_result(result: object) -> None:
    if not isinstance(result, FoldingResult):
        raise TypeError(f"Expected a FoldingResult (from path_folding), got {type(result).__name__}.")


def _plane(x0: Tensor, x1: Tensor, x2: Tensor) -> tuple[Tensor, torch.Size]:
    """The plane's two directions ``[2, D]`` (flattened ``x1 - x0`` and ``x2 - x0``) and the inputs' shape."""
    for name, point in (("x0", x0), ("x1", x1), ("x2", x2)):
        if not isinstance(point, Tensor) or not point.is_floating_point():
            raise TypeError(f"`{name}` must be a floating-point tensor (one input, no batch dimension), got {point!r}.")
    if not (x0.shape == x1.shape == x2.shape and x0.dtype == x1.dtype == x2.dtype and x0.device == x1.device):
        raise ValueError(
            "`x0`, `x1` and `x2` must be inputs of one shape, dtype and device, got "
            f"{[(tuple(x.shape), x.dtype, str(x.device)) for x in (x0, x1, x2)]}."
        )
    basis = torch.stack([x1 - x0, x2 - x0]).reshape(2, -1)
    if torch.linalg.matrix_rank(basis.double()) < 2:
        raise ValueError("`x0`, `x1` and `x2` lie on one line (or coincide); they span no plane. Pick other inputs.")
    return basis, x0.shape


def _drawn_paths(
    model: nn.Module,
    x0: Tensor,
    basis: Tensor,
    paths: tuple[Tensor, Tensor],
    layers: Sequence[str] | None,
    forward: Forward | None,
    steps: int,
) -> tuple[Tensor, list[str]]:
    """The paths' plane coordinates ``[K, 2, 2]`` and their chi labels, exact where the network allows it."""
    if not (isinstance(paths, tuple) and len(paths) == 2 and all(isinstance(end, Tensor) for end in paths)):
        raise TypeError(f"`paths` must be a pair of tensors (starts, ends), each [K, *input_shape], got {paths!r}.")
    starts, ends = paths
    if starts.shape[1:] != x0.shape or ends.shape != starts.shape:
        raise ValueError(
            f"`paths` must be (starts, ends) of shape [K, *{tuple(x0.shape)}], got {tuple(starts.shape)} and "
            f"{tuple(ends.shape)}."
        )
    # Least squares in float64: exact for a plane of axis-aligned directions, as in a 2-D input space.
    directions = basis.double().T
    points = torch.stack([starts, ends], dim=1).reshape(len(starts), 2, -1).double() - x0.reshape(-1).double()
    coordinates = torch.linalg.solve(directions.T @ directions, directions.T @ points.reshape(-1, basis.shape[1]).T).T
    off = (coordinates @ directions.T - points.reshape(-1, basis.shape[1])).norm(dim=1)
    scale = max(float(points.norm(dim=-1).max()), float(basis.double().norm(dim=1).max()))
    if bool((off > 1e-4 * scale).any()):
        first = int(torch.nonzero(off > 1e-4 * scale)[0])
        raise ValueError(
            f"Path {first // 2}'s {'end' if first % 2 else 'start'} lies off the plane through x0, x1 and x2 (at "
            f"distance {float(off[first]):.3g}); draw paths whose ends lie in the plane."
        )
    try:
        chi, sign = path_folding(model, starts, ends, layers=layers, exact=True, forward=forward).chi, "="
    except ValueError as error:
        if "piecewise" not in str(error):  # anything but a network that is not piecewise linear
            raise
        chi, sign = path_folding(model, starts, ends, steps=steps, layers=layers, forward=forward).chi, "≈"
    labels = [f"chi{sign}{value:.2f}" for value in chi.tolist()]
    return coordinates.view(len(starts), 2, 2).float().cpu(), labels
