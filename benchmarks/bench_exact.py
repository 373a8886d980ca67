"""Cost and payoff of exact folding, as ratios measured in one process.

Run: python benchmarks/bench_exact.py [--quick] [--threads N]

- time of exact folding / time of path_folding(steps=1024) on the same pairs (target <= 2x);
- regions per path (mean and max): exact folding costs about one forward pass with tangents per region;
- the step count dense sampling needs to reproduce the exact values: the smallest of 64, 128, ..., 2**17 steps
  whose chi equals the exact chi on every path (stopping at the first that does).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import torch
from torch import nn

from lightning_spacefold import FoldingResult, find_layers, path_folding
from lightning_spacefold.exact import exact_folding
from lightning_spacefold.folding import default_batch_size


def mlp() -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    width = 784
    for _ in range(4):
        layers += [nn.Linear(width, 256), nn.ReLU()]
        width = 256
    return nn.Sequential(*layers, nn.Linear(256, 10))


def best_times(functions: list[Callable[[], object]], repeats: int) -> list[float]:
    """Best wall-clock time of each function, run in turns so that a busy machine slows all of them alike."""
    for function in functions:
        function()  # warm-up
    best = [math.inf] * len(functions)
    for _ in range(repeats):
        for index, function in enumerate(functions):
            begin = time.perf_counter()
            function()
            best[index] = min(best[index], time.perf_counter() - begin)
    return best


def exact(model: nn.Module, starts: torch.Tensor, ends: torch.Tensor) -> FoldingResult:
    """Exact folding with the arguments path_folding would pass (all layers, default batch size)."""
    layers = find_layers(model, starts[:1])
    batch_size = default_batch_size(layers, starts)
    return exact_folding(model, starts, ends, layers, list(range(len(layers))), batch_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer pairs and repeats, steps up to 2**14")
    parser.add_argument(
        "--threads", type=int, help="torch threads (default: torch's choice); 1 is steadier on a busy machine"
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    pairs, repeats, most_steps = (16, 2, 2**14) if args.quick else (64, 5, 2**17)
    model = mlp()
    starts, ends = torch.rand(pairs, 1, 28, 28), torch.rand(pairs, 1, 28, 28)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, MLP 784-256x4-10, {pairs} random pairs")

    exact_time, dense_time = best_times(
        [lambda: exact(model, starts, ends), lambda: path_folding(model, starts, ends, steps=1024)], repeats
    )
    result = exact(model, starts, ends)
    regions = result.regions.double()
    print(f"exact / path_folding(steps=1024) time = {exact_time / dense_time:.2f}x (target <= 2x)")
    print(f"  exact {exact_time:.2f} s, steps=1024 {dense_time:.2f} s")
    print(f"regions per path: mean {regions.mean():.1f}, max {int(regions.max())}")
    print(f"exact chi: mean {result.chi.mean():.4f}, max {result.chi.max():.4f}")

    steps = 64
    while steps <= most_steps:
        dense = path_folding(model, starts, ends, steps=steps)
        matching = int((dense.chi == result.chi).sum())
        print(f"  steps={steps}: chi equals the exact chi on {matching}/{pairs} paths, mean chi {dense.chi.mean():.4f}")
        if matching == pairs:
            print(f"dense sampling reaches the exact chi on all paths at steps={steps}")
            break
        steps *= 2
    else:
        print(f"dense sampling does not reach the exact chi on all paths within steps={most_steps}")


if __name__ == "__main__":
    main()
