"""Measure how neural networks fold their input space while they train."""

from lightning_spacefold.callback import SpaceFoldingCallback
from lightning_spacefold.capture import ActivationRule, LayerInfo, find_layers, register_activation, register_swiglu
from lightning_spacefold.finite import NonFiniteError
from lightning_spacefold.folding import path_folding, path_patterns
from lightning_spacefold.measure import (
    fold_measure,
    fold_ranges,
    interaction_profile,
    max_fold_measure,
    symmetric_fold_measure,
)
from lightning_spacefold.metric import SpaceFolding
from lightning_spacefold.regularization import folding_penalty, regularization_weight, soft_folding
from lightning_spacefold.result import FoldingResult

__all__ = [
    "ActivationRule",
    "FoldingResult",
    "LayerInfo",
    "NonFiniteError",
    "SpaceFolding",
    "SpaceFoldingCallback",
    "find_layers",
    "fold_measure",
    "fold_ranges",
    "folding_penalty",
    "interaction_profile",
    "max_fold_measure",
    "path_folding",
    "path_patterns",
    "register_activation",
    "register_swiglu",
    "regularization_weight",
    "soft_folding",
    "symmetric_fold_measure",
]
__version__ = "0.1.0"
