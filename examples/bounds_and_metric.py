"""The pathwise bounds of chi, the gap between a path and its reversal, and whether the symmetrised measure is a
pseudo-metric, on trained ReLU MLPs of growing width (specification, section 2).

For every path with length ``L = r2 > 0`` and ``D`` the Hamming distance between its end patterns, the
specification's bounds are ``1/2 (1 - D/L) <= chi <= 1 - D/L`` and ``|chi(path) - chi(reversed path)| <= D/L``.
The papers add that the gap between a path and its reversal shrinks as networks grow. Per network (three hidden
layers of 8 to 128 units, several seeds): the patterns at ``--steps`` steps along segments between validation inputs
balanced over all ordered class pairs, read forwards and backwards (the same points), how many paths break a bound
(none should), how tight the bounds are, and the mean gap ``|chi - chi_rev|`` against the mean ``D/L``.

The symmetrised measure ``d(x1, x2) = (chi(x1 -> x2) + chi(x2 -> x1)) / 2`` is symmetric and zero on the diagonal;
it is a pseudo-metric only if it also satisfies the triangle inequality ``d(a, c) <= d(a, b) + d(b, c)``. Per
network, it is computed exactly (``path_folding(..., exact=True)``, both directions) for every pair of
``--points`` validation inputs (as many per class), and every triple is checked.

Writes ``bounds.csv`` (one row per network) and ``bounds.md`` (mean ± std over seeds per width) into ``--out``
(default ``docs/bounds_and_metric/<dataset>``).

Run: python examples/bounds_and_metric.py [--dataset digits|mnist1d|mnist] [--seeds 5] [--epochs 50] [--pairs 500]
[--points 30] [--steps 64] [--quick]
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).parent))
from digits import (
    DATASET_NAMES,
    add_dataset_argument,
    grouped,
    load_split,
    spread_of,
    table_start,
    train_mlp,
    write_results,
)

from lightning_spacefold import fold_ranges, path_folding, path_patterns
from lightning_spacefold.measure import count_ones, folding_from_ranges
from lightning_spacefold.sampling import class_pairs

WIDTHS = (8, 16, 32, 64, 128)
DEPTH = 3
# chi is a float32 ratio of integers: a bound that holds exactly may read off by rounding.
TOLERANCE = 1e-6


COLUMNS = (
    "network",
    "val. accuracy",
    "mean chi",
    "paths breaking a bound",
    "chi between its bounds (0 = upper, 1 = lower)",
    "mean abs(chi - chi_rev)",
    "share of asymmetric paths",
    "mean D/L",
    "gap / (D/L)",
    "triangle violations (share of triples)",
    "among triples with d(a, c) > 0",
    "largest excess",
)


@dataclass(frozen=True)
class Network:
    """Bounds, reversal gap and triangle inequality for one trained network."""

    width: int
    seed: int
    val_accuracy: float
    chi_mean: float
    moving_paths: int
    lower_bound_broken: int
    upper_bound_broken: int
    gap_bound_broken: int
    upper_slack: float
    gap_mean: float
    asymmetric_share: float
    d_over_l_mean: float
    gap_over_bound: float
    triples: int
    triangle_violations: int
    triangle_share: float
    triangle_share_nonzero: float
    triangle_excess_max: float
    seconds: float


def bounds(patterns: Tensor) -> dict[str, float]:
    """Check the bounds on every path of ``patterns`` ``[P, N, M]`` with ``L > 0``, read forwards and backwards."""
    r1, length = fold_ranges(patterns)
    reverse_r1, _ = fold_ranges(patterns.flip(-2))
    distance = count_ones(patterns[:, 0] ^ patterns[:, -1])
    moving = length > 0
    r1, reverse_r1, length, distance = r1[moving], reverse_r1[moving], length[moving], distance[moving]
    chi, reverse = folding_from_ranges(r1, length), folding_from_ranges(reverse_r1, length)
    ratio = distance.double() / length.double()
    gap = (chi - reverse).abs().double()
    upper, lower = 1 - ratio, (1 - ratio) / 2
    folded = ratio < 1  # paths that can fold at all; elsewhere every bound is 0 = 0
    return {
        "moving_paths": int(moving.sum()),
        "lower_bound_broken": int((chi < lower - TOLERANCE).sum()),
        "upper_bound_broken": int((chi > upper + TOLERANCE).sum()),
        "gap_bound_broken": int((gap > ratio + TOLERANCE).sum()),
        # Where chi sits between its bounds, on paths where they differ: 0 at the bound, 1 at the other one.
        "upper_slack": ((upper - chi) / (upper - lower))[folded].mean().item() if bool(folded.any()) else float("nan"),
        "gap_mean": gap.mean().item(),
        "asymmetric_share": (gap > TOLERANCE).double().mean().item(),
        "d_over_l_mean": ratio.mean().item(),
        "gap_over_bound": (gap[distance > 0] / ratio[distance > 0]).mean().item(),
    }


def triangle(model: nn.Module, points: Tensor) -> dict[str, float]:
    """Exact symmetrised folding between every pair of ``points``, and its triangle inequality over every triple."""
    count = len(points)
    first, second = torch.triu_indices(count, count, offset=1)
    forward = path_folding(model, points[first], points[second], exact=True).chi
    backward = path_folding(model, points[second], points[first], exact=True).chi
    distance = torch.zeros(count, count, dtype=torch.float64)
    distance[first, second] = distance[second, first] = ((forward + backward) / 2).double()
    # excess[a, b, c] = d(a, c) - d(a, b) - d(b, c), over a < c and b distinct from both.
    excess = distance.unsqueeze(1) - distance.unsqueeze(2) - distance.unsqueeze(0)
    a, b, c = torch.meshgrid(*(torch.arange(count),) * 3, indexing="ij")
    valid = (a < c) & (b != a) & (b != c)
    broken = excess[valid] > TOLERANCE
    nonzero = distance.unsqueeze(1).expand_as(excess)[valid] > 0
    return {
        "triples": int(valid.sum()),
        "triangle_violations": int(broken.sum()),
        "triangle_share": broken.double().mean().item(),
        "triangle_share_nonzero": broken[nonzero].double().mean().item() if bool(nonzero.any()) else 0.0,
        "triangle_excess_max": max(excess[valid].max().item(), 0.0),
    }


def balanced_points(inputs: Tensor, labels: Tensor, count: int) -> Tensor:
    """``count`` inputs, the first ``count // classes`` of every class."""
    classes = labels.unique()
    per_class = max(1, count // len(classes))
    return torch.cat([inputs[labels == label][:per_class] for label in classes])


def markdown(networks: list[Network], header: str) -> str:
    lines = table_start(header, COLUMNS)
    for width, group in grouped(networks, lambda network: network.width).items():
        cell = functools.partial(spread_of, group)
        broken = sum(n.lower_bound_broken + n.upper_bound_broken + n.gap_bound_broken for n in group)
        moving = sum(n.moving_paths for n in group)
        lines.append(
            f"| {DEPTH} x {width} | {cell('val_accuracy', 3)} | {cell('chi_mean')} | {broken} of {moving} "
            f"| {cell('upper_slack', 3)} | {cell('gap_mean')} | {cell('asymmetric_share', 3)} "
            f"| {cell('d_over_l_mean', 3)} | {cell('gap_over_bound', 3)} | {cell('triangle_share')} "
            f"| {cell('triangle_share_nonzero')} | {cell('triangle_excess_max')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[Network]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_argument(parser)
    parser.add_argument("--widths", type=int, nargs="+", default=list(WIDTHS), help="units per hidden layer")
    parser.add_argument("--seeds", type=int, default=5, help="networks per width")
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--pairs", type=int, default=500, help="validation pairs for the bounds")
    parser.add_argument("--points", type=int, default=30, help="validation inputs for the triangle inequality")
    parser.add_argument("--steps", type=int, default=64, help="steps along each path for the bounds")
    parser.add_argument("--out", type=Path, help="output folder (default: docs/bounds_and_metric/<dataset>)")
    parser.add_argument("--quick", action="store_true", help="widths 8 and 32, 1 seed, 2 epochs, 60 pairs, 10 points")
    args = parser.parse_args(argv)
    widths, seeds, epochs, num_pairs, num_points = args.widths, args.seeds, args.epochs, args.pairs, args.points
    if args.quick:
        widths, seeds, epochs, num_pairs, num_points = [8, 32], 1, 2, 60, 10
    out = args.out or Path("docs/bounds_and_metric") / args.dataset

    x_train, y_train, x_val, y_val = load_split(args.dataset)
    pairs = class_pairs(x_val, y_val, num_pairs, generator=0)
    points = balanced_points(x_val, y_val, num_points)
    networks = []
    for width in widths:
        for seed in range(seeds):
            begin = time.perf_counter()
            model = train_mlp(x_train, y_train, DEPTH, width, epochs, seed)
            with torch.no_grad():
                accuracy = (model(x_val).argmax(-1) == y_val).float().mean().item()
            patterns = path_patterns(model, pairs.starts, pairs.ends, steps=args.steps)
            chi = folding_from_ranges(*fold_ranges(patterns)).mean().item()
            found = {**bounds(patterns), **triangle(model, points)}
            networks.append(Network(width, seed, accuracy, chi, **found, seconds=time.perf_counter() - begin))
            print(
                f"{DEPTH}x{width} seed {seed}: chi {chi:.4f}, gap {found['gap_mean']:.4f}, "
                f"triangle violations {found['triangle_violations']} of {found['triples']}"
            )

    header = (
        f"{DATASET_NAMES[args.dataset]}, ReLU MLPs with {DEPTH} hidden layers, {epochs} epochs, {seeds} seed(s) per "
        f"width (± = std over seeds). Bounds: {len(pairs)} validation pairs over all ordered class pairs, "
        f"{args.steps} steps, each path read forwards and backwards; D = Hamming distance between the end patterns, "
        f"L = walked length (paths with L > 0). Triangle inequality: exact symmetrised folding between all pairs of "
        f"{len(points)} validation inputs, every triple (a, b, c) with a < c checked."
    )
    write_results(out, "bounds", markdown(networks, header), networks)
    return networks


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
