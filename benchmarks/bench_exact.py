"""Cost and payoff of exact folding, as ratios measured in one process.

Run: python benchmarks/bench_exact.py [--quick] [--threads N]

- time of exact folding / time of path_folding(steps=1024) on the same pairs (target <= 2x);
- regions per path (mean and max): exact folding costs about one forward pass with tangents per region;
- the step count dense sampling needs to reproduce the exact values: the smallest of 64, 128, ..., 2**17 steps
  whose chi equals the exact chi on every path (stopping at the first that does);
- on the max-pool CNN of ``bench_path_folding.py`` (4 whole paths): exact time / dense sampling at as many steps as
  regions per path (its floor: one point per region crossed), min/median/max over repeats run in turns.
"""

from __future__ import annotations

import argparse

import torch
from common import best_times, cnn, exact_over_floor, mlp, parse_with_threads, spread

from lightning_spacefold import path_folding


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer pairs and repeats, steps up to 2**14")
    args = parse_with_threads(parser)
    torch.manual_seed(0)
    pairs, repeats, most_steps = (16, 2, 2**14) if args.quick else (64, 5, 2**17)
    model = mlp()
    starts, ends = torch.rand(pairs, 1, 28, 28), torch.rand(pairs, 1, 28, 28)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, MLP 784-256x4-10, {pairs} random pairs")

    exact_time, dense_time = best_times(
        [lambda: path_folding(model, starts, ends, exact=True), lambda: path_folding(model, starts, ends, steps=1024)],
        repeats,
    )
    result = path_folding(model, starts, ends, exact=True)
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

    cnn_over_floor(paths=2 if args.quick else 4, repeats=repeats)


def cnn_over_floor(paths: int, repeats: int) -> None:
    torch.manual_seed(0)
    model = cnn().eval()
    starts, ends = torch.rand(paths, 1, 28, 28), torch.rand(paths, 1, 28, 28)
    regions = path_folding(model, starts, ends, exact=True).regions.tolist()
    floor_steps, ratios, _ = exact_over_floor(model, starts, ends, regions, repeats)
    print(
        f"CNN 1x28x28, {paths} whole paths ({regions} regions): exact / path_folding(steps={floor_steps}) = "
        f"{spread(ratios)} over {repeats} repeats (target <= 3x)"
    )


if __name__ == "__main__":
    main()
