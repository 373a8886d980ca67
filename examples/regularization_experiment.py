"""Does the folding regulariser change generalisation? MLPs on digits, MNIST-1D or MNIST, with and without it.

Run: python examples/regularization_experiment.py [--dataset digits|mnist1d|mnist] [--weights 0 0.3 1] [--seeds 5]
[--epochs 20] [--out DIR]

Every run measures the exact folding of the same 90 validation class pairs at the start and after every epoch with
SpaceFoldingCallback; runs with a weight > 0 add ``-weight * soft folding`` of 16 pairs of each training batch to
the loss at every step, with the weight decaying linearly to zero at half of training (the papers suggest pushing
folding mostly early). The table also says how steadily folding rises over training: Spearman's rank correlation
between the epoch and the mean chi, the median non-zero chi (Phi_N) and the median and the mean of the non-zero
chi_max (each path's maximal folding over its prefixes; the papers' global figures match one of these:
``examples/papers_mnist.py``) over the measurements after each epoch. Writes a markdown table, a CSV of the curves
and a PNG into ``--out`` (default ``docs/regularization/<dataset>``), and prints the table.
"""

from __future__ import annotations

import argparse
import csv
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import Logger
from matplotlib.figure import Figure
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).parent))
from digits import DATASET_NAMES, INPUT_DIMS, DigitsDataModule, MLPClassifier, add_dataset_argument, plus_minus

from lightning_spacefold import SpaceFoldingCallback

warnings.filterwarnings("ignore", ".*does not have many workers.*")
logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)


class MemoryLogger(Logger):
    """Keeps every logged value in memory: ``history[name]`` is a list of ``(step, value)``."""

    def __init__(self) -> None:
        super().__init__()
        self.history: dict[str, list[tuple[int, float]]] = {}

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for key, value in metrics.items():
            self.history.setdefault(key, []).append((step or 0, float(value)))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass


def train_once(dataset: str, weight: float, seed: int, epochs: int, quick: bool) -> dict[str, Any]:
    pl.seed_everything(seed, verbose=False)
    callback = SpaceFoldingCallback(
        every_n_train_steps=None,
        every_n_epochs=1,
        num_pairs=30 if quick else 90,
        exact=True,
        pairing="class",
        include_same_class=False,
        log_figures=False,
        log_histogram=False,
        seed=seed,
        regularize=weight > 0,
        reg_weight=weight,
        reg_schedule="linear",
        reg_until=0.5,
        reg_num_pairs=16,
    )
    logger = MemoryLogger()
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=logger,
        log_every_n_steps=5,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
    )
    model = MLPClassifier(input_dim=INPUT_DIMS[dataset], depth=3, width=32, lr=1e-2)
    begin = time.perf_counter()
    trainer.fit(model, datamodule=DigitsDataModule(dataset=dataset, seed=seed))
    seconds = time.perf_counter() - begin
    history = logger.history
    return {
        "weight": weight,
        "seed": seed,
        "seconds": seconds,
        "val_acc": logger.history["val_acc"][-1][1],
        "best_val_acc": max(value for _, value in logger.history["val_acc"]),
        "folding": logger.history["spacefold/folding"],
        "median_nonzero": logger.history["spacefold/folding_median_nonzero"],
        "max_median_nonzero": logger.history["spacefold/folding_max_median_nonzero"],
        "max_mean_nonzero": mean_nonzero(history["spacefold/folding_max"], history["spacefold/folded_fraction"]),
        "folded_fraction": logger.history["spacefold/folded_fraction"][-1][1],
    }


def mean_nonzero(means: list[tuple[int, float]], fractions: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """The mean of the non-zero values from the mean over all paths and the share of paths that fold (chi_max > 0
    exactly where chi > 0); 0 where no path folds."""
    return [
        (step, mean / fraction if fraction else 0.0)
        for (step, mean), (_, fraction) in zip(means, fractions, strict=True)
    ]


def rise(curve: list[tuple[int, float]]) -> float:
    """Spearman's correlation between the measurement's position and its value, from the first epoch's end on."""
    values = [value for _, value in curve[1:]]
    if len(values) < 3 or len(set(values)) == 1:
        return float("nan")
    return float(spearmanr(range(len(values)), values).statistic)


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for weight in sorted({run["weight"] for run in runs}):
        group = [run for run in runs if run["weight"] == weight]
        rows.append(
            {
                "weight": weight,
                "seeds": len(group),
                "final val acc": plus_minus([run["val_acc"] for run in group]),
                "best val acc": plus_minus([run["best_val_acc"] for run in group]),
                "peak folding": plus_minus([max(v for _, v in run["folding"]) for run in group]),
                "final folding": plus_minus([run["folding"][-1][1] for run in group]),
                "final folded fraction": plus_minus([run["folded_fraction"] for run in group]),
                "final median non-zero chi": plus_minus([run["median_nonzero"][-1][1] for run in group]),
                "final median non-zero chi_max": plus_minus([run["max_median_nonzero"][-1][1] for run in group]),
                "final mean non-zero chi_max": plus_minus([run["max_mean_nonzero"][-1][1] for run in group]),
                "rise of folding (Spearman, epochs 1..)": plus_minus([rise(run["folding"]) for run in group], 2),
                "rise of median non-zero chi": plus_minus([rise(run["median_nonzero"]) for run in group], 2),
                "rise of median non-zero chi_max": plus_minus([rise(run["max_median_nonzero"]) for run in group], 2),
                "rise of mean non-zero chi_max": plus_minus([rise(run["max_mean_nonzero"]) for run in group], 2),
                "fit time (s)": plus_minus([run["seconds"] for run in group]),
            }
        )
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(row[key]) for key in header) + " |" for row in rows]
    return "\n".join(lines)


def plot(runs: list[dict[str, Any]], path: Path, title: str) -> None:
    figure = Figure(figsize=(11, 4), layout="constrained")
    weights = sorted({run["weight"] for run in runs})
    colours = {weight: f"C{index}" for index, weight in enumerate(weights)}
    for index, (key, label) in enumerate(
        [("folding", "exact mean chi (90 class pairs)"), ("median_nonzero", "median non-zero chi")]
    ):
        axes = figure.add_subplot(1, 2, index + 1)
        for run in runs:
            steps, values = zip(*run[key], strict=True)
            legend = f"weight {run['weight']}" if run["seed"] == min(r["seed"] for r in runs) else None
            axes.plot(steps, values, color=colours[run["weight"]], alpha=0.8, label=legend)
        axes.set_xlabel("optimizer step")
        axes.set_ylabel(label)
        axes.legend()
    figure.suptitle(title)
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_argument(parser)
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.3, 1.0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--out", type=Path, help="output folder (default: docs/regularization/<dataset>)")
    parser.add_argument("--quick", action="store_true", help="2 weights, 1 seed, 1 epoch (a smoke run)")
    args = parser.parse_args(argv)
    weights, seeds, epochs = ([0.0, 1.0], 1, 1) if args.quick else (args.weights, args.seeds, args.epochs)

    out = args.out or Path("docs/regularization") / args.dataset
    runs = [train_once(args.dataset, weight, seed, epochs, args.quick) for weight in weights for seed in range(seeds)]
    rows = summarise(runs)
    plain = statistics.mean(run["seconds"] for run in runs if run["weight"] == 0) if 0 in weights else None
    out.mkdir(parents=True, exist_ok=True)
    name = DATASET_NAMES[args.dataset]
    table = (
        f"{name}, MLP {INPUT_DIMS[args.dataset]}-32x3-10, {epochs} epochs, {seeds} seed(s) per weight (± = std over "
        f"seeds); exact folding of {30 if args.quick else 90} validation class pairs after every epoch.\n\n"
        + markdown(rows)
    )
    if plain:
        regularised = [run["seconds"] for run in runs if run["weight"] > 0]
        table += f"\n\nFit time with the regulariser / without: {statistics.mean(regularised) / plain:.2f}x"
    (out / "results.md").write_text(table + "\n")
    with open(out / "curves.csv", "w", newline="") as file:
        writer = csv.writer(file)
        curves = ("folding", "median_nonzero", "max_median_nonzero", "max_mean_nonzero")
        writer.writerow(["weight", "seed", "step", *curves])
        for run in runs:
            for points in zip(*(run[curve] for curve in curves), strict=True):
                writer.writerow([run["weight"], run["seed"], points[0][0], *(value for _, value in points)])
    plot(
        runs, out / "folding_over_training.png", f"{name} MLP {INPUT_DIMS[args.dataset]}-32x3-10: folding over training"
    )
    print(table)
    return rows


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
