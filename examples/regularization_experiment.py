"""Does the folding regulariser change generalisation? Digits MLPs trained with and without it, several seeds.

Run: python examples/regularization_experiment.py [--weights 0 0.3 1] [--seeds 3] [--epochs 20] [--out DIR]

Every run measures the exact folding of the same 90 validation class pairs at the start and after every epoch with
SpaceFoldingCallback; runs with a weight > 0 add ``-weight * soft folding`` of 16 pairs of each training batch to
the loss at every step, with the weight decaying linearly to zero at half of training (the papers suggest pushing
folding mostly early). Writes a markdown table, a CSV of the curves and a PNG, and prints the table.
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
from lightning.pytorch.loggers import Logger
from matplotlib.figure import Figure

sys.path.insert(0, str(Path(__file__).parent))
from digits import DigitsDataModule, MLPClassifier

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


def train_once(weight: float, seed: int, epochs: int, quick: bool) -> dict[str, Any]:
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
    model = MLPClassifier(depth=3, width=32, lr=1e-2)
    begin = time.perf_counter()
    trainer.fit(model, datamodule=DigitsDataModule(seed=seed))
    seconds = time.perf_counter() - begin
    return {
        "weight": weight,
        "seed": seed,
        "seconds": seconds,
        "val_acc": logger.history["val_acc"][-1][1],
        "best_val_acc": max(value for _, value in logger.history["val_acc"]),
        "folding": logger.history["spacefold/folding"],
        "folded_fraction": logger.history["spacefold/folded_fraction"][-1][1],
    }


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for weight in sorted({run["weight"] for run in runs}):
        group = [run for run in runs if run["weight"] == weight]

        def spread(values: list[float]) -> str:
            deviation = statistics.stdev(values) if len(values) > 1 else 0.0
            return f"{statistics.mean(values):.4f} ± {deviation:.4f}"

        rows.append(
            {
                "weight": weight,
                "seeds": len(group),
                "final val acc": spread([run["val_acc"] for run in group]),
                "best val acc": spread([run["best_val_acc"] for run in group]),
                "peak folding": spread([max(v for _, v in run["folding"]) for run in group]),
                "final folding": spread([run["folding"][-1][1] for run in group]),
                "final folded fraction": spread([run["folded_fraction"] for run in group]),
                "fit time (s)": spread([run["seconds"] for run in group]),
            }
        )
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(row[key]) for key in header) + " |" for row in rows]
    return "\n".join(lines)


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    figure = Figure(figsize=(6.5, 4), layout="constrained")
    axes = figure.add_subplot()
    weights = sorted({run["weight"] for run in runs})
    colours = {weight: f"C{index}" for index, weight in enumerate(weights)}
    for run in runs:
        steps, values = zip(*run["folding"], strict=True)
        label = f"weight {run['weight']}" if run["seed"] == min(r["seed"] for r in runs) else None
        axes.plot(steps, values, color=colours[run["weight"]], alpha=0.8, label=label)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("exact mean folding (90 class pairs)")
    axes.set_title("Digits MLP 64-32x3-10: folding over training")
    axes.legend()
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.3, 1.0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("docs/regularization"))
    parser.add_argument("--quick", action="store_true", help="2 weights, 1 seed, 1 epoch (a smoke run)")
    args = parser.parse_args(argv)
    weights, seeds, epochs = ([0.0, 1.0], 1, 1) if args.quick else (args.weights, args.seeds, args.epochs)

    runs = [train_once(weight, seed, epochs, args.quick) for weight in weights for seed in range(seeds)]
    rows = summarise(runs)
    plain = statistics.mean(run["seconds"] for run in runs if run["weight"] == 0) if 0 in weights else None
    args.out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows)
    if plain:
        regularised = [run["seconds"] for run in runs if run["weight"] > 0]
        table += f"\n\nFit time with the regulariser / without: {statistics.mean(regularised) / plain:.2f}x"
    (args.out / "results.md").write_text(table + "\n")
    with open(args.out / "curves.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["weight", "seed", "step", "folding"])
        for run in runs:
            writer.writerows([run["weight"], run["seed"], step, value] for step, value in run["folding"])
    plot(runs, args.out / "folding_over_training.png")
    print(table)
    return rows


if __name__ == "__main__":
    main()
