"""Do k-means centroid pairs reproduce the folding over all pairs of a test set? (specification, section 4)

Trains a ReLU MLP with two hidden layers of 32 units on scikit-learn's digits, MNIST-1D or MNIST (model and data come
from the examples' shared ``digits.py``), then measures on the test set the folding over every ordered pair of
distinct test points, against the papers' efficient strategy (k-means centroids of each class, every ordered pair of
distinct centroids) over several seeds, and against as many random test pairs as there are centroid pairs. Prints a
Markdown table per network; "spread" is the standard deviation of the mean over seeds, "time" the seconds per run
(pair selection included).

With several ``--centroids`` values and ``--model-seeds N`` it trains N networks and, with ``--out``, writes
``centroids.csv`` (one row per network and strategy) and ``centroids.md``: per strategy the mean over networks
± the standard deviation over networks, the gap to the same network's all-pairs mean, and in how many networks that
gap lies within the strategy's own spread over k-means seeds. Values of k above the smallest class are left out. The
same comparison follows for the median and the mean of the non-zero chi_max (each path's maximal folding over its
prefixes), the candidates for the papers' own statistic (``examples/papers_mnist.py``).

Run: python examples/centroid_vs_all_pairs.py [--dataset digits|mnist1d|mnist] [--steps 64] [--seeds 5] [--centroids 5]
[--model-seeds 1] [--out DIR] [--quick]
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).parent))
from digits import DATASET_NAMES, add_dataset_argument, load_split, plus_minus, table_start, train_mlp

from lightning_spacefold.metric import SpaceFolding
from lightning_spacefold.sampling import PairBatch, all_pairs, centroid_pairs, random_pairs

# Paths per metric update: bounds the memory of the interpolated points, not the result.
PATHS_PER_UPDATE = 16384


@dataclass(frozen=True)
class Row:
    """One sampling strategy: statistics over its runs (one per seed)."""

    strategy: str
    centroids: int | None
    folding: list[float]
    median_nonzero: list[float]
    folded_fraction: list[float]
    max_median_nonzero: list[float]
    max_mean_nonzero: list[float]
    paths: int
    seconds: float

    @property
    def spread(self) -> float:
        """Standard deviation of the mean folding over seeds; 0 for a single run."""
        return self.spread_of("folding")

    def spread_of(self, field: str) -> float:
        """Standard deviation over seeds of one statistic (a list field); 0 for a single run."""
        values = getattr(self, field)
        return statistics.stdev(values) if len(values) > 1 else 0.0


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


def run(
    strategy: str,
    model: nn.Module,
    steps: int,
    seeds: Sequence[int],
    pick: Callable[[int], PairBatch],
    centroids: int | None = None,
) -> Row:
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
        centroids=centroids,
        folding=[values["folding"].item() for values in runs],
        median_nonzero=[values["folding_median_nonzero"].item() for values in runs],
        folded_fraction=[values["folded_fraction"].item() for values in runs],
        max_median_nonzero=[values["folding_max_median_nonzero"].item() for values in runs],
        # chi_max > 0 exactly where chi > 0: the mean of the non-zero chi_max is the mean over the folded share.
        max_mean_nonzero=[(values["folding_max"] / values["folded_fraction"]).nan_to_num().item() for values in runs],
        paths=paths,
        seconds=seconds,
    )


def compare(
    args: argparse.Namespace, model_seed: int, centroid_counts: Sequence[int], seeds: int, epochs: int
) -> list[Row]:
    """Train one network and compare all pairs, centroid pairs for every k and as many random pairs, on its test set."""
    x_train, y_train, x_test, y_test = load_split(args.dataset, seed=0)
    model = train_mlp(x_train, y_train, depth=2, width=32, epochs=epochs, seed=model_seed)
    with torch.no_grad():
        accuracy = (model(x_test).argmax(-1) == y_test).float().mean().item()
    if args.quick:
        keep = balanced_subset(y_test, 6)
        x_test, y_test = x_test[keep], y_test[keep]

    everything = all_pairs(x_test, labels=y_test)
    rows = [run("all pairs", model, args.steps, [0], lambda _: everything)]
    smallest = int(torch.bincount(y_test).min())
    centroid_counts = [k for k in dict.fromkeys(centroid_counts) if k <= smallest]
    for k in centroid_counts:
        centroid = run(
            f"centroid pairs (k={k})",
            model,
            args.steps,
            range(seeds),
            lambda seed, k=k: centroid_pairs(x_test, y_test, k, generator=seed),
            centroids=k,
        )
        rows.append(centroid)
        rows.append(
            run(
                "random pairs (as many)" if len(centroid_counts) == 1 else f"random pairs (as many as k={k})",
                model,
                args.steps,
                range(seeds),
                lambda seed, paths=centroid.paths: random_pairs(x_test, paths, labels=y_test, generator=seed),
                centroids=k,
            )
        )

    print(
        f"{DATASET_NAMES[args.dataset]} MLP {x_test[0].numel()}-32x2-10 (seed {model_seed}): test accuracy "
        f"{accuracy:.3f}; {len(x_test)} test points, steps={args.steps}, {seeds} seeds"
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


# The statistics compared with the all-pairs value: mean chi first (with more columns), then the chi_max candidates.
COMPARED = {
    "folding": "mean chi",
    "max_median_nonzero": "median non-zero chi_max",
    "max_mean_nonzero": "mean non-zero chi_max",
}


def summary(networks: list[list[Row]], header: str, field: str = "folding") -> str:
    """Per strategy, over networks: the statistic ``field``, its gap to the network's all-pairs value, and how often
    that gap is within the strategy's spread over k-means seeds (mean chi also gets Phi_N and the folded share)."""
    within = "networks with abs(gap) <= spread over k-means seeds"
    extra = ["median non-zero chi", "folded fraction"] if field == "folding" else []
    lines = table_start(header, ["pairs", "paths", COMPARED[field], "gap to all pairs", within, *extra])
    for position, row in enumerate(networks[0]):
        same = [rows[position] for rows in networks]
        means = [statistics.fmean(getattr(r, field)) for r in same]
        references = [statistics.fmean(getattr(rows[0], field)) for rows in networks]
        gaps = [mean - reference for mean, reference in zip(means, references, strict=True)]
        within = sum(abs(gap) <= r.spread_of(field) for gap, r in zip(gaps, same, strict=True))
        cells = [
            row.strategy,
            str(row.paths),
            plus_minus(means),
            plus_minus(gaps) if position else "",
            f"{within} of {len(networks)}" if position else "",
        ]
        if extra:
            cells += [
                plus_minus([statistics.fmean(r.median_nonzero) for r in same]),
                plus_minus([statistics.fmean(r.folded_fraction) for r in same], 3),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> list[Row]:
    """Run the comparison and print its table.

    Args:
        argv: Command-line arguments; ``None`` reads ``sys.argv``.

    Returns:
        One row per sampling strategy (all pairs, then centroid and random pairs for each k) and network.
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_argument(parser)
    parser.add_argument("--steps", type=int, default=64, help="segments per path")
    parser.add_argument("--seeds", type=int, default=5, help="seeds for the centroid and random pairs")
    parser.add_argument("--centroids", type=int, nargs="+", default=[5], help="k-means centroids per class")
    parser.add_argument("--model-seeds", type=int, default=1, help="networks trained (seeds 0, 1, ...)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--out", type=Path, help="write centroids.csv and centroids.md (over networks) here")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a smoke test of a few seconds")
    args = parser.parse_args(argv)
    epochs, seeds, centroid_counts = args.epochs, args.seeds, args.centroids
    if args.quick:
        epochs, seeds, centroid_counts = 2, min(seeds, 2), [min(k, 2) for k in centroid_counts]

    networks = [compare(args, model_seed, centroid_counts, seeds, epochs) for model_seed in range(args.model_seeds)]
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        with open(args.out / "centroids.csv", "w", newline="") as file:
            writer = csv.writer(file)
            maxima = ["max_median_nonzero", "max_median_nonzero_spread", "max_mean_nonzero", "max_mean_nonzero_spread"]
            columns = ["model_seed", "strategy", "centroids", "paths", "chi_mean", "chi_spread", *maxima, "seconds"]
            writer.writerow(columns)
            for model_seed, rows in enumerate(networks):
                writer.writerows(
                    [
                        *(model_seed, r.strategy, r.centroids, r.paths, statistics.fmean(r.folding), r.spread),
                        *(statistics.fmean(r.max_median_nonzero), r.spread_of("max_median_nonzero")),
                        *(statistics.fmean(r.max_mean_nonzero), r.spread_of("max_mean_nonzero"), r.seconds),
                    ]
                    for r in rows
                )
        header = (
            f"{DATASET_NAMES[args.dataset]}, MLP with 2 hidden layers of 32 units, {epochs} epochs, "
            f"{len(networks)} network seed(s); all ordered pairs of distinct test points, {seeds} k-means / random "
            f"seeds per network, {args.steps} steps per path (± = std over networks; spread = std over k-means "
            f"seeds of one network)."
        )
        others = [field for field in COMPARED if field != "folding"]
        tables = [summary(networks, header)]
        tables += [summary(networks, f"The same comparison for the {COMPARED[field]}:", field) for field in others]
        text = "\n".join(tables)
        (args.out / "centroids.md").write_text(text)
        print(text)
    return [row for rows in networks for row in rows]


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
