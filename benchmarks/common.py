"""What the benchmark scripts share: the benchmark networks and an interleaved timer."""

from __future__ import annotations

import argparse
import math
import random
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_spacefold import path_folding
from lightning_spacefold.folding import segment_points

FORWARD_BATCHES = (64, 256)  # plain forward in batches of these sizes, besides all points in one batch


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


def repeat_times(
    functions: list[Callable[[], object]], repeats: int, warm_up: bool = True, fixed_order: bool = False
) -> list[list[float]]:
    """Wall-clock times of each function in every repeat, ``[repeat][function]``, run in turns so that a busy machine
    slows all of them alike; ratios taken within one repeat compare like with like.

    By default every function is timed alike: each repeat runs them in another order (seeded), and each timed call
    right after an untimed call of the same function. A call runs slower right after other work than right after
    itself (5-11% for the benchmark MLP, as much after a sleep as after other work), so in a fixed order the functions
    that follow their own kind would be favoured. ``fixed_order`` times each function once per repeat, in the given
    order.
    """
    if warm_up:
        for function in functions:
            function()
    order = list(range(len(functions)))
    generator = random.Random(0)
    times = []
    for _ in range(repeats):
        if not fixed_order:
            generator.shuffle(order)
        row = [0.0] * len(functions)
        for index in order:
            if not fixed_order:
                functions[index]()
            begin = time.perf_counter()
            functions[index]()
            row[index] = time.perf_counter() - begin
        times.append(row)
    return times


def best_times(functions: list[Callable[[], object]], repeats: int) -> list[float]:
    """Best wall-clock time of each function, run in turns so that a busy machine slows all of them alike."""
    return [min(column) for column in zip(*repeat_times(functions, repeats), strict=True)]


def minor_faults(function: Callable[[], object], calls: int = 5) -> int:
    """Median minor page faults of one call of ``function`` (``getrusage``): pages the process takes anew."""
    faults = []
    for _ in range(calls):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        function()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return int(statistics.median(faults))


def fold_over_forward(
    model: nn.Module,
    starts: Tensor,
    ends: Tensor,
    steps: int,
    repeats: int,
    forward: Callable[[Tensor], Any] | None = None,
    wrap: Callable[[Callable[[], object]], Callable[[], object]] = lambda function: function,
) -> tuple[list[float], float, dict[str, float]]:
    """``path_folding`` time over the fastest plain forward of the same points, once per repeat.

    The plain forward (``model(points)`` under ``torch.no_grad()``, eval mode) runs all points in one batch and in
    batches of :data:`FORWARD_BATCHES` smaller than that; each repeat's ratio uses its fastest.

    Args:
        model: The network, in eval mode.
        starts: Path starts.
        ends: Path ends.
        steps: Segments per path.
        repeats: Interleaved repeats (after a warm-up).
        forward: As in ``path_folding``.
        wrap: Applied to every timed function (e.g. to synchronise a GPU).

    Returns:
        The ratio of each repeat, path_folding's best time, and the best time of each plain forward by its label.
    """
    points = segment_points(starts, ends, torch.arange(steps + 1, dtype=torch.float64, device=starts.device) / steps)
    plains = plain_forwards(model if forward is None else forward, points)
    functions = [lambda: path_folding(model, starts, ends, steps=steps, forward=forward), *plains.values()]
    times = repeat_times([wrap(function) for function in functions], repeats)
    best = [min(column) for column in zip(*times, strict=True)]
    return [fold / min(plain_times) for fold, *plain_times in times], best[0], dict(zip(plains, best[1:], strict=True))


def plain_forwards(run: Callable[[Tensor], Any], points: Tensor) -> dict[str, Callable[[], None]]:
    """Plain forwards of ``points`` without gradients: in one batch and in batches of :data:`FORWARD_BATCHES`.

    Returns:
        The functions by label (``one batch``, ``batches of 64``, ...).
    """

    def plain(batch_size: int) -> Callable[[], None]:
        def call() -> None:
            with torch.no_grad():
                for begin in range(0, len(points), batch_size):
                    run(points[begin : begin + batch_size])

        return call

    sizes = [len(points), *(size for size in FORWARD_BATCHES if size < len(points))]
    return {"one batch" if size == len(points) else f"batches of {size}": plain(size) for size in sizes}


def spread(values: list[float], digits: int = 2, unit: str = "x") -> str:
    """``min-median-max`` of a list of values (by default ratios)."""
    return f"{min(values):.{digits}f}-{statistics.median(values):.{digits}f}-{max(values):.{digits}f}{unit}"


def exact_over_floor(
    model: nn.Module,
    starts: Tensor,
    ends: Tensor,
    regions: list[int],
    repeats: int,
    forward: Callable[[Tensor], Any] | None = None,
) -> tuple[int, list[float], list[float]]:
    """Exact traversal time over its floor, once per repeat (run in turns; call ``exact=True`` once first).

    The floor is dense sampling at as many steps as the traversal found regions per path, on average: one point per
    region crossed.

    Returns:
        The floor's step count, the ratio of each repeat and the best times ``[exact, floor]``.
    """
    floor_steps = max(1, math.ceil(sum(regions) / len(regions)))

    def floor() -> None:
        path_folding(model, starts, ends, steps=floor_steps, forward=forward)

    floor()  # warm-up; the caller's first exact call was the traversal's
    times = repeat_times(
        [lambda: path_folding(model, starts, ends, exact=True, forward=forward), floor],
        repeats,
        warm_up=False,
        fixed_order=True,  # calls of many seconds: a few percent of order effects do not matter here
    )
    return floor_steps, [exact / dense for exact, dense in times], [min(column) for column in zip(*times, strict=True)]


def parse_with_threads(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse the command line with a ``--threads N`` option (torch threads), applied before returning."""
    parser.add_argument(
        "--threads", type=int, help="torch threads (default: torch's choice); 1 is steadier on a busy machine"
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return args
