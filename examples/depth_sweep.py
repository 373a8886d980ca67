"""Does folding grow with depth? ReLU MLPs of several depths on digits, MNIST-1D or MNIST (specification, section 4).

Two series: a fixed budget of 60 hidden units (2x30, 3x20, 4x15, 5x12, 6x10) and a fixed width of 32 (depths 1 to 6),
several seeds each. Per network: the exact folding (``path_folding(..., exact=True)``) of segments between validation
inputs balanced over all ordered class pairs (the same pairs for every network): the mean chi, the median of the
non-zero chi (our Phi_N), the mean and the median of the non-zero chi_max (each path's maximal folding over its
prefixes, the statistic closest to the papers' MNIST figures: ``examples/papers_mnist.py``), the share of folded
paths, the mean number of linear regions per path and the validation accuracy. Writes ``depth_sweep.csv`` (one row
per network), ``depth_sweep.md`` (mean and spread over seeds) and ``depth_sweep.png`` into ``--out`` (default
``docs/depth_sweep/<dataset>``).

Run: python examples/depth_sweep.py [--dataset digits|mnist1d|mnist] [--seeds 5] [--epochs 100] [--pairs 500] [--quick]
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).parent))
from digits import DATASET_NAMES, add_dataset_argument, load_split, mean_std, train_mlp

from lightning_spacefold import SpaceFolding, path_folding
from lightning_spacefold.sampling import class_pairs

# (series, depth, width): 60 hidden units spread over 2..6 layers, then width 32 at depths 1..6.
BUDGET = "60 hidden units"
FIXED_WIDTH = "width 32"
CONFIGS = [(BUDGET, depth, 60 // depth) for depth in range(2, 7)] + [(FIXED_WIDTH, depth, 32) for depth in range(1, 7)]
QUICK_CONFIGS = [(FIXED_WIDTH, 1, 32), (BUDGET, 3, 20)]


@dataclass(frozen=True)
class Run:
    """One trained network and its folding on the validation pairs."""

    series: str
    depth: int
    width: int
    seed: int
    chi_mean: float
    chi_median_nonzero: float
    max_mean: float
    max_median_nonzero: float
    folded_share: float
    regions_mean: float
    train_accuracy: float
    val_accuracy: float
    seconds: float


def measure(
    model: nn.Module, starts: Tensor, ends: Tensor, steps: int | None
) -> tuple[float, float, float, float, float, float]:
    """Mean chi, median non-zero chi (Phi_N), mean chi_max, median non-zero chi_max, folded share and mean regions
    per path (NaN if sampled)."""
    sampling = {"exact": True} if steps is None else {"steps": steps}
    result = path_folding(model, starts, ends, **sampling)
    metric = SpaceFolding()
    metric.update_from_result(result)
    values = metric.compute()
    regions = float("nan") if result.regions is None else result.regions.float().mean().item()
    names = ("folding", "folding_median_nonzero", "folding_max", "folding_max_median_nonzero", "folded_fraction")
    return (*(values[name].item() for name in names), regions)


def summary(runs: list[Run]) -> list[dict[str, object]]:
    """Mean and standard deviation over seeds of every configuration, in the order of first appearance."""
    groups: dict[tuple[str, int, int], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.series, run.depth, run.width), []).append(run)
    rows = []
    for (series, depth, width), group in groups.items():
        row: dict[str, object] = {"series": series, "depth": depth, "width": width, "seeds": len(group)}
        for field in (
            "chi_mean",
            "chi_median_nonzero",
            "max_mean",
            "max_median_nonzero",
            "folded_share",
            "regions_mean",
            "train_accuracy",
            "val_accuracy",
        ):
            row[field], row[f"{field}_std"] = mean_std([getattr(run, field) for run in group])
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, object]], header: str) -> str:
    lines = [
        header,
        "",
        "| series | depth x width | mean chi | median non-zero chi (Phi_N) | mean chi_max | median non-zero chi_max "
        "| folded paths | regions / path | train accuracy | val. accuracy |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:

        def cell(field: str, decimals: int, row: dict[str, object] = row) -> str:
            return f"{row[field]:.{decimals}f} ± {row[f'{field}_std']:.{decimals}f}"

        lines.append(
            f"| {row['series']} | {row['depth']} x {row['width']} | {cell('chi_mean', 4)} "
            f"| {cell('chi_median_nonzero', 4)} | {cell('max_mean', 4)} | {cell('max_median_nonzero', 4)} "
            f"| {cell('folded_share', 3)} | {cell('regions_mean', 1)} "
            f"| {cell('train_accuracy', 3)} | {cell('val_accuracy', 3)} |"
        )
    return "\n".join(lines) + "\n"


def figure(rows: list[dict[str, object]], title: str) -> Figure:
    """Folding (left axis, error bars: std over seeds) and validation accuracy (right axis) against depth."""
    series = list(dict.fromkeys(str(row["series"]) for row in rows))
    fig = Figure(figsize=(5 * len(series), 3.8), layout="constrained")
    for index, name in enumerate(series):
        part = [row for row in rows if row["series"] == name]
        depths = [row["depth"] for row in part]
        axes = fig.add_subplot(1, len(series), index + 1)
        axes.errorbar(
            depths, [row["chi_mean"] for row in part], yerr=[row["chi_mean_std"] for row in part],
            marker="o", capsize=3, color="tab:blue", label="mean chi",
        )  # fmt: skip
        axes.set_xlabel("depth (hidden layers)")
        axes.set_ylabel("mean chi (exact)", color="tab:blue")
        axes.set_xticks(depths, [f"{row['depth']}x{row['width']}" for row in part])
        axes.set_title(name)
        accuracy = axes.twinx()
        accuracy.errorbar(
            depths, [row["val_accuracy"] for row in part], yerr=[row["val_accuracy_std"] for row in part],
            marker="s", capsize=3, color="tab:orange", linestyle="--",
        )  # fmt: skip
        accuracy.set_ylabel("validation accuracy", color="tab:orange")
    fig.suptitle(title, fontsize="medium")
    return fig


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_argument(parser)
    parser.add_argument("--seeds", type=int, default=5, help="networks per configuration")
    parser.add_argument("--epochs", type=int, default=100, help="enough for every network to fit the training set")
    parser.add_argument("--pairs", type=int, default=500, help="validation pairs over the 10 x 10 class pairs")
    parser.add_argument("--steps", type=int, default=None, help="sample this many steps instead of exact traversal")
    parser.add_argument("--out", type=Path, help="output folder (default: docs/depth_sweep/<dataset>)")
    parser.add_argument("--quick", action="store_true", help="2 configurations, 1 seed, 2 epochs, 40 pairs")
    args = parser.parse_args(argv)
    configs = QUICK_CONFIGS if args.quick else CONFIGS
    seeds, epochs, num_pairs = (1, 2, 40) if args.quick else (args.seeds, args.epochs, args.pairs)

    out = args.out or Path("docs/depth_sweep") / args.dataset
    name = DATASET_NAMES[args.dataset]
    x_train, y_train, x_val, y_val = load_split(args.dataset)
    train_val = ((x_train, y_train), (x_val, y_val))
    pairs = class_pairs(x_val, y_val, num_pairs, generator=0)
    runs = []
    for series, depth, width in configs:
        for seed in range(seeds):
            begin = time.perf_counter()
            model = train_mlp(x_train, y_train, depth, width, epochs, seed)
            with torch.no_grad():
                fit, accuracy = ((model(x).argmax(-1) == y).float().mean().item() for x, y in train_val)
            folding = measure(model, pairs.starts, pairs.ends, args.steps)
            runs.append(Run(series, depth, width, seed, *folding, fit, accuracy, time.perf_counter() - begin))
            print(f"{series}: {depth}x{width} seed {seed}: chi {folding[0]:.4f}, val. accuracy {accuracy:.3f}")

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "depth_sweep.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(asdict(runs[0])))
        writer.writeheader()
        writer.writerows(asdict(run) for run in runs)
    rows = summary(runs)
    sampling = "exact traversal" if args.steps is None else f"{args.steps} steps"
    header = (
        f"{name}, {len(pairs)} validation pairs over all ordered class pairs, {sampling}, {epochs} epochs, "
        f"{seeds} seed(s) per configuration (± = std over seeds)."
    )
    table = markdown(rows, header)
    (out / "depth_sweep.md").write_text(table)
    fig = figure(rows, f"{name}: mean chi ({sampling}) and validation accuracy, mean ± std over {seeds} seed(s)")
    fig.savefig(out / "depth_sweep.png", dpi=120)
    print(table)
    return {"rows": rows, "runs": [asdict(run) for run in runs]}


if __name__ == "__main__":
    # The models are tiny: one thread is as fast, and spares the 100x slowdown of OpenMP threads spinning against
    # other processes on a busy machine.
    torch.set_num_threads(1)
    main()
