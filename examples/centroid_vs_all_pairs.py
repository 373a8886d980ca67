"""Do k-means centroid pairs reproduce the folding over all pairs of a test set? (specification, section 4)

Trains a 64-32-32-10 ReLU MLP on scikit-learn's digits (no download; model and data come from the examples'
shared ``digits.py``), then measures on the test set the folding over every ordered pair of distinct test points,
against the papers' efficient strategy (k-means centroids of each class, every ordered pair of distinct centroids)
over several seeds, and against as many random test pairs as there are centroid pairs. Prints a Markdown table;
"spread" is the standard deviation of the mean over seeds, "time" the seconds per run (pair selection included).

Run: python examples/centroid_vs_all_pairs.py [--steps 64] [--seeds 5] [--centroids 5] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).parent))
from digits import digits_split, train_mlp

from lightning_spacefold.metric import SpaceFolding
from lightning_spacefold.sampling import PairBatch, all_pairs, centroid_pairs, random_pairs

# Paths per metric update: bounds the memory of the interpolated points, not the result.
PATHS_PER_UPDATE = 16384


@dataclass(frozen=True)
class Row:
    """One sampling strategy: statistics over its runs (one per seed)."""

    strategy: str
    folding: list[float]
    median_nonzero: list[float]
    folded_fraction: list[float]
    paths: int
    seconds: float

    @property
    def spread(self) -> float:
        """Standard deviation of the mean folding over seeds; 0 for a single run."""
        return statistics.stdev(self.folding) if len(self.folding) > 1 else 0.0


def balanced_subset(labels: Tensor, per_class: int) -> Tensor:
    """Indices of the first ``per_class`` samples of every class."""
    return torch.cat([torch.nonzero(labels == label).flatten()[:per_class] for label in labels.unique()])


def measure(model: nn.Module, pairs: PairBatch, steps: int) -> dict[str, Tensor]:
    """Folding statistics of all pairs, accumulated by the metric in updates of bounded size."""
    metric = SpaceFolding(steps=steps)
    for first in range(0, len(pairs), PATHS_PER_UPDATE):
        part = slice(first, first + PATHS_PER_UPDATE)
        metric.update(model, pairs.starts[part], pairs.ends[part])
    return metric.compute()


def run(strategy: str, model: nn.Module, steps: int, seeds: Sequence[int], pick: Callable[[int], PairBatch]) -> Row:
    """Pick pairs (timed with the measurement) and measure them once per seed."""
    runs, paths = [], 0
    begin = time.perf_counter()
    for seed in seeds:
        pairs = pick(seed)
        runs.append(measure(model, pairs, steps))
        paths = len(pairs)
    seconds = (time.perf_counter() - begin) / len(seeds)
    return Row(
        strategy=strategy,
        folding=[values["folding"].item() for values in runs],
        median_nonzero=[values["folding_median_nonzero"].item() for values in runs],
        folded_fraction=[values["folded_fraction"].item() for values in runs],
        paths=paths,
        seconds=seconds,
    )


def main(argv: Sequence[str] | None = None) -> list[Row]:
    """Run the comparison and print its table.

    Args:
        argv: Command-line arguments; ``None`` reads ``sys.argv``.

    Returns:
        One row per sampling strategy: all pairs, centroid pairs, random pairs.
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=64, help="segments per path")
    parser.add_argument("--seeds", type=int, default=5, help="seeds for the centroid and random pairs")
    parser.add_argument("--centroids", type=int, default=5, help="k-means centroids per class")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a smoke test of a few seconds")
    args = parser.parse_args(argv)
    per_class, epochs, seeds, centroids = None, args.epochs, args.seeds, args.centroids
    if args.quick:
        per_class, epochs, seeds, centroids = 6, 2, min(seeds, 2), min(centroids, 2)

    x_train, y_train, x_test, y_test = digits_split(seed=0)
    model = train_mlp(x_train, y_train, depth=2, width=32, epochs=epochs, seed=0)
    with torch.no_grad():
        accuracy = (model(x_test).argmax(-1) == y_test).float().mean().item()
    if per_class is not None:
        keep = balanced_subset(y_test, per_class)
        x_test, y_test = x_test[keep], y_test[keep]

    everything = all_pairs(x_test, labels=y_test)
    rows = [run("all pairs", model, args.steps, [0], lambda _: everything)]
    rows.append(
        run(
            f"centroid pairs (k={centroids})",
            model,
            args.steps,
            range(seeds),
            lambda seed: centroid_pairs(x_test, y_test, centroids, generator=seed),
        )
    )
    rows.append(
        run(
            "random pairs (as many)",
            model,
            args.steps,
            range(seeds),
            lambda seed: random_pairs(x_test, rows[1].paths, labels=y_test, generator=seed),
        )
    )

    print(
        f"digits MLP 64-32-32-10: test accuracy {accuracy:.3f}; {len(x_test)} test points, steps={args.steps}, "
        f"{seeds} seeds"
    )
    print("| pairs | mean chi | spread (std over seeds) | median non-zero chi | folded fraction | paths | time (s) |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row.strategy} | {statistics.fmean(row.folding):.4f} | {row.spread:.4f} | "
            f"{statistics.fmean(row.median_nonzero):.4f} | {statistics.fmean(row.folded_fraction):.3f} | "
            f"{row.paths} | {row.seconds:.2f} |"
        )
    return rows


if __name__ == "__main__":
    main()
