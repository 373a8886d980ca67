"""What the benchmark scripts share: the benchmark networks and an interleaved timer."""

from __future__ import annotations

import time
from collections.abc import Callable

from torch import nn


def mlp() -> nn.Module:
    """MLP 784-256x4-10 on 1x28x28 inputs."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = 784
    for _ in range(4):
        layers += [nn.Linear(width, 256), nn.ReLU()]
        width = 256
    return nn.Sequential(*layers, nn.Linear(256, 10))


def cnn() -> nn.Module:
    """A small CNN on 1x28x28 inputs: two conv + max-pool blocks and two linear layers."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def repeat_times(functions: list[Callable[[], object]], repeats: int, warm_up: bool = True) -> list[list[float]]:
    """Wall-clock times of each function in every repeat, ``[repeat][function]``, run in turns so that a busy machine
    slows all of them alike; ratios taken within one repeat compare like with like."""
    if warm_up:
        for function in functions:
            function()
    times = []
    for _ in range(repeats):
        row = []
        for function in functions:
            begin = time.perf_counter()
            function()
            row.append(time.perf_counter() - begin)
        times.append(row)
    return times


def best_times(functions: list[Callable[[], object]], repeats: int) -> list[float]:
    """Best wall-clock time of each function, run in turns so that a busy machine slows all of them alike."""
    return [min(column) for column in zip(*repeat_times(functions, repeats), strict=True)]
