"""TensorBoard views of a measurement: the histogram of per-path chi, the figures and a custom-scalars layout.

The callback decides when; this module writes to the TensorBoard loggers among a trainer's loggers and collects
what the figures show, which :mod:`lightning_spacefold.figure_process` draws.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from torch import Tensor

from lightning_spacefold.measure import fold_measure, step_distances

__all__ = ["PREFIX", "add_custom_scalars", "figure_views", "has_tensorboard", "log_histogram", "tensorboard_dirs"]

PREFIX = "spacefold"


def _tensorboard_loggers(loggers: Sequence[Logger]) -> list[TensorBoardLogger]:
    return [logger for logger in loggers if isinstance(logger, TensorBoardLogger)]


def has_tensorboard(loggers: Sequence[Logger]) -> bool:
    """Whether any of the loggers writes TensorBoard event files."""
    return bool(_tensorboard_loggers(loggers))


def figure_views(values: dict[str, Tensor], example_patterns: Tensor) -> dict[str, Any]:
    """What the figures of one measurement show, as NumPy arrays (for :mod:`lightning_spacefold.figure_process`).

    Args:
        values: The output of :meth:`~lightning_spacefold.SpaceFolding.compute`.
        example_patterns: ``[K, N, M]`` activation patterns along the paths of the ``example_paths`` figure.

    Returns:
        The input of :func:`~lightning_spacefold.figures.measurement_figures`.
    """
    from_start, from_previous = step_distances(example_patterns, example_patterns[:, 0])
    layer_names = [name.removeprefix("layer/") for name in values if name.startswith("layer/")]
    class_pairs = values.get("class_pair_folding")
    return {
        "from_start": from_start.cpu().numpy(),
        "walked": from_previous.cumsum(-1).cpu().numpy(),
        "chi": fold_measure(example_patterns).cpu().numpy(),
        "layer_names": layer_names,
        "layer_values": torch.stack([values[f"layer/{name}"] for name in layer_names]).float().cpu().numpy(),
        "class_pairs": None if class_pairs is None else class_pairs.float().cpu().numpy(),
    }


def tensorboard_dirs(loggers: Sequence[Logger]) -> list[str]:
    """The directories of the TensorBoard loggers among ``loggers``."""
    return [logger.log_dir for logger in _tensorboard_loggers(loggers)]


def log_histogram(loggers: Sequence[Logger], step: int, all_chi: Tensor) -> None:
    """Write the histogram of ``all_chi`` (``[P]``, every path of a measurement) to every TensorBoard logger."""
    for logger in _tensorboard_loggers(loggers):
        logger.experiment.add_histogram(f"{PREFIX}/chi", all_chi.float().cpu(), step)


def add_custom_scalars(loggers: Sequence[Logger], layer_names: Sequence[str]) -> None:
    """Give every TensorBoard logger a layout with the global and the per-layer curves side by side."""
    layout = {
        PREFIX: {
            "global": [
                "Multiline",
                [f"{PREFIX}/folding", f"{PREFIX}/folding_median_nonzero", f"{PREFIX}/folded_fraction"],
            ],
            "maximum over prefixes": [
                "Multiline",
                [f"{PREFIX}/folding_max", f"{PREFIX}/folding_max_median_nonzero"],
            ],
            "layers": ["Multiline", [f"{PREFIX}/layer/{name}" for name in layer_names]],
        }
    }
    for logger in _tensorboard_loggers(loggers):
        logger.experiment.add_custom_scalars(layout)
