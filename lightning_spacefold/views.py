"""TensorBoard views of a measurement: the histogram of per-path chi, the figures and a custom-scalars layout.

The callback decides when; this module writes to the TensorBoard loggers among a trainer's loggers and draws
with :mod:`lightning_spacefold.figures`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from matplotlib.figure import Figure
from torch import Tensor

from lightning_spacefold.figures import class_pair_figure, distance_figure, layer_figure
from lightning_spacefold.measure import fold_measure, step_distances

__all__ = ["PREFIX", "add_custom_scalars", "build_figures", "has_tensorboard", "log_views"]

PREFIX = "spacefold"


def has_tensorboard(loggers: Sequence[Logger]) -> bool:
    """Whether any of the loggers writes TensorBoard event files."""
    return any(isinstance(logger, TensorBoardLogger) for logger in loggers)


def build_figures(values: dict[str, Tensor], example_patterns: Tensor) -> dict[str, Figure]:
    """The figures of one measurement.

    Args:
        values: The output of :meth:`~lightning_spacefold.SpaceFolding.compute`.
        example_patterns: ``[K, N, M]`` activation patterns along the paths of the ``example_paths`` figure.

    Returns:
        ``example_paths``, ``layers`` and, when ``values`` has class pairs, ``class_pairs``.
    """
    from_start, from_previous = step_distances(example_patterns, example_patterns[:, 0])
    layer_names = [name.removeprefix("layer/") for name in values if name.startswith("layer/")]
    figures = {
        "example_paths": distance_figure(from_start, from_previous.cumsum(-1), fold_measure(example_patterns)),
        "layers": layer_figure(layer_names, torch.stack([values[f"layer/{name}"] for name in layer_names])),
    }
    if "class_pair_folding" in values:
        figures["class_pairs"] = class_pair_figure(values["class_pair_folding"])
    return figures


def log_views(
    loggers: Sequence[Logger], step: int, all_chi: Tensor | None, figures: dict[str, Figure] | None = None
) -> None:
    """Write the histogram of ``all_chi`` (when given) and the figures to every TensorBoard logger.

    Args:
        loggers: The trainer's loggers; the others are left alone.
        step: The global step of the measurement.
        all_chi: ``[P]`` chi of every path of the measurement, or ``None`` for no histogram.
        figures: Figures by name (logged as ``spacefold/<name>``).
    """
    figures = figures or {}
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            if all_chi is not None:
                logger.experiment.add_histogram(f"{PREFIX}/chi", all_chi.float().cpu(), step)
            for name, figure in figures.items():
                logger.experiment.add_figure(f"{PREFIX}/{name}", figure, step, close=False)


def add_custom_scalars(loggers: Sequence[Logger], layer_names: Sequence[str]) -> None:
    """Give every TensorBoard logger a layout with the global and the per-layer curves side by side."""
    layout = {
        PREFIX: {
            "global": [
                "Multiline",
                [f"{PREFIX}/folding", f"{PREFIX}/folding_median_nonzero", f"{PREFIX}/folded_fraction"],
            ],
            "layers": ["Multiline", [f"{PREFIX}/layer/{name}" for name in layer_names]],
        }
    }
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_custom_scalars(layout)
