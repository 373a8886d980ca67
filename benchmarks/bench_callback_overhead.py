"""Overhead of SpaceFoldingCallback on the digits example: whole fits with a TensorBoard logger, as a user runs them.

Run: python benchmarks/bench_callback_overhead.py [--epochs 20] [--repeats 5]

Every repeat fits the same model (same seed, same process) without the callback and with it at its defaults, with
figures off, with figures and histogram off, and with the regulariser on; all with a TensorBoard logger. Prints, per
configuration, fit time / fit time without the callback of the same repeat (min, median and max over the repeats),
and the share of the fit spent in the measurements themselves (timed around each one). The figures are drawn by a
child process that may finish after the fit: the time until it has written the last one is printed too.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

sys.path.insert(0, str(Path(__file__).parent.parent / "examples"))
from common import parse_with_threads
from digits import DigitsDataModule, MLPClassifier

from lightning_spacefold import SpaceFoldingCallback

warnings.filterwarnings("ignore")
logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)

CONFIGURATIONS = {
    "defaults": {},
    "log_figures=False": {"log_figures": False},
    "log_figures=False, log_histogram=False": {"log_figures": False, "log_histogram": False},
    "regularize=True": {"regularize": True},
}


def fit(epochs: int, callback: TimedCallback | None) -> float:
    pl.seed_everything(0, verbose=False)
    with tempfile.TemporaryDirectory() as directory:
        trainer = pl.Trainer(
            max_epochs=epochs,
            accelerator="cpu",
            logger=TensorBoardLogger(directory),
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[] if callback is None else [callback],
        )
        begin = time.perf_counter()
        trainer.fit(MLPClassifier(), datamodule=DigitsDataModule())
        seconds = time.perf_counter() - begin
        if callback is not None:
            callback.wait_for_figures()  # the figure process finishes after the fit; not in the fit's time
            callback.figures_seconds = time.perf_counter() - begin
        return seconds


class TimedCallback(SpaceFoldingCallback):
    """The callback with a stopwatch around each measurement (with its logging and figures)."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.seconds, self.count = 0.0, 0
        self.figures_seconds = 0.0  # from the start of the fit until the last figure was written

    def _measure(self, *args: object) -> None:
        begin = time.perf_counter()
        super()._measure(*args)
        self.seconds += time.perf_counter() - begin
        self.count += 1


def spread(values: list[float], form: str) -> str:
    return f"min {min(values):{form}}, median {statistics.median(values):{form}}, max {max(values):{form}}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    args = parse_with_threads(parser)
    fit(1, TimedCallback())  # warm-up: imports (TensorBoard, matplotlib), first allocations
    ratios: dict[str, list[float]] = {name: [] for name in CONFIGURATIONS}
    shares: dict[str, list[float]] = {name: [] for name in CONFIGURATIONS}
    with_figures: list[float] = []
    for _ in range(args.repeats):
        plain = fit(args.epochs, None)
        for name, kwargs in CONFIGURATIONS.items():
            callback = TimedCallback(**kwargs)
            seconds = fit(args.epochs, callback)
            ratios[name].append(seconds / plain)
            shares[name].append(callback.seconds / seconds)
            if name == "defaults":
                with_figures.append(callback.figures_seconds / plain)
    print(
        f"digits MLP 64-32x3-10, {args.epochs} epochs (22 steps each), TensorBoard logger, {args.repeats} repeats, "
        f"{torch.get_num_threads()} torch threads on {os.cpu_count()} cores; "
        f"default schedule: {callback.count} measurements of {callback.num_pairs} pairs x {callback.steps} steps"
    )
    for name in CONFIGURATIONS:
        print(
            f"{name}: fit time / without the callback {spread(ratios[name], '.3f')}; "
            f"measurements' share of the fit {spread(shares[name], '.1%')}"
        )
    print(f"defaults, until the figure process has written the last figure: {spread(with_figures, '.3f')}")


if __name__ == "__main__":
    main()
