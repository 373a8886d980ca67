"""Overhead of SpaceFoldingCallback at its default schedule on the digits example.

Run: python benchmarks/bench_callback_overhead.py [--epochs 20] [--repeats 3]

Prints the time spent measuring as a share of the fit's time (timed around each measurement), the ratio of the
fit's time with the callback to the fit's time without it, and the same ratio with the regulariser switched on at
its defaults (16 pairs x 16 steps at every step); same seed, same process, best of the repeats.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl

sys.path.insert(0, str(Path(__file__).parent.parent / "examples"))
from digits import DigitsDataModule, MLPClassifier

from lightning_spacefold import SpaceFoldingCallback

warnings.filterwarnings("ignore")
logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)


def fit(epochs: int, callback: SpaceFoldingCallback | None) -> float:
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[] if callback is None else [callback],
    )
    begin = time.perf_counter()
    trainer.fit(MLPClassifier(), datamodule=DigitsDataModule())
    return time.perf_counter() - begin


class TimedCallback(SpaceFoldingCallback):
    """The callback with a stopwatch around each measurement."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.seconds, self.count = 0.0, 0

    def _measure(self, *args: object) -> None:
        begin = time.perf_counter()
        super()._measure(*args)
        self.seconds += time.perf_counter() - begin
        self.count += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    fit(1, None)  # warm-up: imports, first allocations
    plain, measured, regularized, shares = [], [], [], []
    for _ in range(args.repeats):
        plain.append(fit(args.epochs, None))
        callback = TimedCallback()
        measured.append(fit(args.epochs, callback))
        shares.append(callback.seconds / measured[-1])
        regularized.append(fit(args.epochs, TimedCallback(regularize=True)))
    print(
        f"digits MLP 64-32x3-10, {args.epochs} epochs (22 steps each), default schedule: {callback.count} "
        f"measurements of {callback.num_pairs} pairs x {callback.steps} steps"
    )
    print(f"measurement time / fit time: {min(shares):.1%} (best of {args.repeats}; target <= 5%)")
    print(f"fit with callback / fit without: {min(measured) / min(plain):.3f}x")
    print(f"fit with callback and regulariser / fit without callback: {min(regularized) / min(plain):.3f}x")


if __name__ == "__main__":
    main()
