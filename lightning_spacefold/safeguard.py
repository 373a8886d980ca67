"""Measuring without ending the training run: out-of-memory back-off, and failures that all processes agree on.

A measurement that fails must cost the user one missing point of a curve, not the run. Out-of-memory errors are
retried with fewer points per forward pass first. Under several processes, every process takes part in one small
collective after its share of the work, so that all of them either go on to the metric's synchronisation or skip
it together: a process that failed never leaves the others waiting in a collective it skipped.
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import Callable
from typing import TypeVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

__all__ = ["FailureReporter", "agree_on_failures", "halved", "is_out_of_memory", "with_memory_backoff"]

T = TypeVar("T")

_OUT_OF_MEMORY_MESSAGES = ("out of memory", "can't allocate memory", "not enough memory")


def is_out_of_memory(error: BaseException) -> bool:
    """Whether an exception is an out-of-memory error of an accelerator or of the CPU allocator."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and any(text in str(error) for text in _OUT_OF_MEMORY_MESSAGES)


def with_memory_backoff(measure: Callable[[int], T], batch_size: int, smallest: int) -> tuple[T, int]:
    """Run ``measure(batch_size)``, halving ``batch_size`` after each out-of-memory error down to ``smallest``.

    Args:
        measure: Runs the measurement with the given number of points per forward pass.
        batch_size: Points per forward pass to try first.
        smallest: The fewest points per forward pass to try; the error is raised when they fail too.

    Returns:
        ``(result, batch_size)``: the result and the number of points per forward pass that worked.

    Raises:
        Exception: Whatever ``measure`` raises other than an out-of-memory error, and that error at ``smallest``.
    """
    while True:
        try:
            return measure(batch_size), batch_size
        except Exception as error:
            if not is_out_of_memory(error) or batch_size <= smallest:
                raise
        # Outside the handler, so that the traceback and the tensors its frames hold are gone before the retry.
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        batch_size = halved(batch_size, smallest)


def halved(batch_size: int, smallest: int) -> int:
    """The next points per forward pass to try after an out-of-memory error: half, but not below ``smallest``."""
    return max(smallest, batch_size // 2)


def agree_on_failures(trainer: pl.Trainer, failed: bool, batch_size: int) -> tuple[Tensor, int]:
    """One collective: which processes failed, and the smallest batch size any of them uses from now on.

    Every process must call it, in the same order relative to its other collectives.

    Args:
        trainer: The trainer (its strategy reduces across processes; a single process returns its own values).
        failed: Whether this process's share of the measurement failed.
        batch_size: The points per forward pass this process would use next.

    Returns:
        ``(failed_ranks, batch_size)``: a boolean ``[world_size]`` tensor, and the smallest batch size.
    """
    flags = torch.zeros(trainer.world_size + 1, dtype=torch.float64, device=trainer.strategy.root_device)
    flags[trainer.global_rank] = float(failed)
    flags[-1] = -batch_size
    flags = trainer.strategy.reduce(flags, reduce_op="max")
    return flags[:-1].cpu() > 0, int(-flags[-1].item())


class FailureReporter:
    """Warns once per distinct failure (exception type and message), on the process that saw it."""

    def __init__(self) -> None:
        self.seen: set[tuple[str, str]] = set()

    def warn(self, trainer: pl.Trainer, failed_ranks: Tensor, error: BaseException | None, what: str) -> None:
        """Report a failed measurement that is skipped.

        The lowest failing process warns with its exception; process 0 says so when another process failed.

        Args:
            trainer: The trainer (for the ranks).
            failed_ranks: Which processes failed, from :func:`agree_on_failures`.
            error: This process's exception, or ``None`` if its share succeeded.
            what: What was skipped, e.g. ``"the measurement at step 40"``.
        """
        first_failed = int(failed_ranks.nonzero()[0])
        if error is not None and trainer.global_rank == first_failed:
            key = (type(error).__name__, str(error))
            if key in self.seen:
                return
            self.seen.add(key)
            message = (
                f"SpaceFoldingCallback: {what} failed and is skipped (nothing is logged for it; training goes on). "
                f"{key[0]}: {key[1]}"
            )
            if trainer.world_size == 1:
                rank_zero_warn(message)
            else:
                warnings.warn(f"[rank {trainer.global_rank}] {message}", stacklevel=2)
        elif first_failed != 0 and trainer.global_rank == 0:
            key = ("rank", str(first_failed))
            if key not in self.seen:
                self.seen.add(key)
                rank_zero_warn(
                    f"SpaceFoldingCallback: {what} failed on process {first_failed} and is skipped on every process "
                    "(its warning names the error); training goes on."
                )
