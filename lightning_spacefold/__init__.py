"""Measure how neural networks fold their input space while they train."""

from lightning_spacefold.capture import ActivationRule, LayerInfo, find_layers, register_activation
from lightning_spacefold.folding import path_folding
from lightning_spacefold.measure import fold_measure, fold_ranges, interaction_profile, symmetric_fold_measure
from lightning_spacefold.result import FoldingResult

__all__ = [
    "ActivationRule",
    "FoldingResult",
    "LayerInfo",
    "find_layers",
    "fold_measure",
    "fold_ranges",
    "interaction_profile",
    "path_folding",
    "register_activation",
    "symmetric_fold_measure",
]
__version__ = "0.1.0"
