"""Overhead of SpaceFoldingCallback on the digits example: whole fits with a TensorBoard logger, as a user runs them.

Run: python benchmarks/bench_callback_overhead.py [--epochs 20] [--repeats 5]

Every repeat fits the same model (same seed, same process) without the callback, with an empty callback, and with
SpaceFoldingCallback at its defaults, with figures off, with figures and histogram off, and with the regulariser on;
all with a TensorBoard logger, in an order that rotates from repeat to repeat. Prints, per configuration, fit time /
fit time without the callback of the same repeat (min, median and max over the repeats; and the median fit time over
the median without) and the share of the fit spent in the measurements themselves (timed around each one). The
figures are drawn by a child process that may finish after the fit: its CPU time, and the time until it has written
the last figure, are printed too. Fits of this size vary by +-25% on a shared machine: use 20 or more repeats to
resolve a few percent.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
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

EMPTY = "an empty Callback (Lightning's cost of calling any callback's hooks)"
CONFIGURATIONS: dict[str, dict[str, object]] = {
    EMPTY: {},
    "defaults": {},
    "log_figures=False": {"log_figures": False},
    "log_figures=False, log_histogram=False": {"log_figures": False, "log_histogram": False},
    "regularize=True": {"regularize": True},
}


@dataclass
class FitTimes:
    """One fit: its seconds, the seconds until its figure process had written the last figure, and that process's
    CPU seconds (0 without one)."""

    wall: float
    until_figures: float = 0.0
    figures_cpu: float = 0.0


def fit(epochs: int, callback: TimedCallback | EmptyCallback | None) -> FitTimes:
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
        children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        begin = time.perf_counter()
        trainer.fit(MLPClassifier(), datamodule=DigitsDataModule())
        times = FitTimes(time.perf_counter() - begin)
        if callback is not None:
            callback.wait_for_figures()  # the figure process finishes after the fit; not in the fit's time
            times.until_figures = time.perf_counter() - begin
            children = resource.getrusage(resource.RUSAGE_CHILDREN)  # the figure process, reaped by the wait
            times.figures_cpu = sum(
                getattr(children, field) - getattr(children_before, field) for field in ("ru_utime", "ru_stime")
            )
        return times


class EmptyCallback(pl.Callback):
    """A callback whose hooks do nothing, with TimedCallback's stopwatch."""

    seconds = 0.0

    def wait_for_figures(self) -> None:
        pass


class TimedCallback(SpaceFoldingCallback):
    """The callback with a stopwatch around each measurement (with its logging and figures)."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.seconds, self.count = 0.0, 0

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
    parser.add_argument(
        "--configurations",
        nargs="+",
        choices=list(CONFIGURATIONS),
        default=list(CONFIGURATIONS),
        metavar="NAME",
        help="the configurations to run (default: all)",
    )
    args = parse_with_threads(parser)
    fit(1, TimedCallback())  # warm-up: imports (TensorBoard, matplotlib), first allocations
    plain_fits: list[FitTimes] = []
    fits: dict[str, list[FitTimes]] = {name: [] for name in args.configurations}
    shares: dict[str, list[float]] = {name: [] for name in args.configurations}
    with_figures: list[float] = []
    schedule = ""
    runs = [None, *args.configurations]  # None: without the callback
    for repeat in range(args.repeats):
        until_figures = 0.0
        for name in runs[repeat % len(runs) :] + runs[: repeat % len(runs)]:  # each in every place of the order
            if name is None:
                plain_fits.append(fit(args.epochs, None))
                continue
            callback = EmptyCallback() if name == EMPTY else TimedCallback(**CONFIGURATIONS[name])
            times = fit(args.epochs, callback)
            fits[name].append(times)
            shares[name].append(callback.seconds / times.wall)
            if name == "defaults":
                until_figures = times.until_figures
                schedule = f"; default schedule: {callback.count} measurements of 64 pairs x 64 steps"
        if until_figures:
            with_figures.append(until_figures / plain_fits[-1].wall)
    print(
        f"digits MLP 64-32x3-10, {args.epochs} epochs (22 steps each), TensorBoard logger, {args.repeats} repeats, "
        f"{torch.get_num_threads()} torch threads on {os.cpu_count()} cores{schedule}"
    )
    median_plain = statistics.median(plain.wall for plain in plain_fits)
    for name in args.configurations:
        wall = [times.wall / plain.wall for times, plain in zip(fits[name], plain_fits, strict=True)]
        median_wall = statistics.median(times.wall for times in fits[name]) / median_plain
        figures_cpu = [times.figures_cpu / plain.wall for times, plain in zip(fits[name], plain_fits, strict=True)]
        print(
            f"{name}: fit time / without the callback {spread(wall, '.3f')} (median / median {median_wall:.3f}); "
            f"measurements' share of the fit {spread(shares[name], '.1%')}; "
            f"CPU time of the figure process / fit time without {spread(figures_cpu, '.3f')}"
        )
    if with_figures:
        print(f"defaults, until the figure process has written the last figure: {spread(with_figures, '.3f')}")


if __name__ == "__main__":
    main()
