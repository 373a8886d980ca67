"""Drawing the callback's figures in a child process, so that training does not wait for matplotlib.

Three figures take about 0.2 s to draw on a CPU: as long as a few hundred training steps of a small model. The
callback hands each measurement's arrays (a few kilobytes) to a child Python process and goes on; the child draws
them with :mod:`lightning_spacefold.figures` and writes them as images to TensorBoard event files in the
``figures`` folder of each logger's directory. That folder is a run of its own in TensorBoard: a run's event files
are read one after the other, so a second writer in the logger's own folder could hide what the logger writes
after it. The child runs this file as a script, which loads neither torch nor Lightning. Where no child can run
(it cannot be started, or it has died) the figures are drawn in the calling process instead, with one warning.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import pickle
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = ["FOLDER", "FigureProcess", "FigureWriter"]

FOLDER = "figures"
"""The folder, inside each TensorBoard logger's directory, of the figures' event files."""


class FigureWriter:
    """Draws the figures of measurements and writes them to ``<log_dir>/figures`` event files, in this process.

    Args:
        draw: Maps a measurement's arrays to figures by name (:func:`lightning_spacefold.figures.measurement_figures`).
    """

    def __init__(self, draw: Callable[[Mapping[str, Any]], Mapping[str, Any]]) -> None:
        self.draw = draw
        self.writers: dict[str, Any] = {}

    def write(self, log_dirs: Sequence[str], step: int, prefix: str, views: Mapping[str, Any]) -> None:
        """Draw one measurement's figures and write them as images tagged ``<prefix>/<name>`` at ``step``."""
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        images = [
            Summary.Value(tag=f"{prefix}/{name}", image=_png_image(figure)) for name, figure in self.draw(views).items()
        ]
        for log_dir in log_dirs:
            if log_dir not in self.writers:
                self.writers[log_dir] = EventFileWriter(str(Path(log_dir) / FOLDER))
            writer = self.writers[log_dir]
            writer.add_event(Event(wall_time=time.time(), step=step, summary=Summary(value=images)))
            writer.flush()

    def close(self) -> None:
        """Close the event files."""
        for writer in self.writers.values():
            writer.close()
        self.writers.clear()


def _png_image(figure: Any) -> Any:
    """A figure as a TensorBoard image summary (PNG, RGBA)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.image import imsave
    from tensorboard.compat.proto.summary_pb2 import Summary

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    pixels = np.asarray(canvas.buffer_rgba())
    buffer = io.BytesIO()
    imsave(buffer, pixels, format="png")
    height, width, channels = pixels.shape
    return Summary.Image(height=height, width=width, colorspace=channels, encoded_image_string=buffer.getvalue())


class FigureProcess:
    """Hands measurements' figures to a child process that draws and writes them (see the module docstring).

    The child starts with the first measurement. Copies of this object (a callback sent to other processes, or
    deep-copied) start their own.
    """

    def __init__(self) -> None:
        self._child: subprocess.Popen[bytes] | None = None
        self._finishing: list[subprocess.Popen[bytes]] = []
        self._here: FigureWriter | None = None  # where no child can run

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]

    def submit(self, log_dirs: Sequence[str], step: int, prefix: str, views: Mapping[str, Any]) -> None:
        """Have the figures of one measurement drawn and written (see :meth:`FigureWriter.write`)."""
        message = (list(log_dirs), step, prefix, dict(views))
        if self._here is None:
            if self._send(message):
                return
            from lightning_spacefold.figures import measurement_figures

            warnings.warn(
                "SpaceFoldingCallback: the process that draws the figures could not run (its error is printed "
                "above); drawing them in the training process from now on, which slows training.",
                stacklevel=2,
            )
            self._here = FigureWriter(measurement_figures)
        self._here.write(*message)

    def _send(self, message: tuple[Any, ...]) -> bool:
        if self._child is not None and self._child.poll() is not None:
            return False  # it died
        try:
            if self._child is None:
                self._child = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE)
            assert self._child.stdin is not None
            pickle.dump(message, self._child.stdin)
            self._child.stdin.flush()
        except OSError:
            return False
        return True

    def close(self) -> None:
        """No more figures for now: the child draws what it has and exits; nothing waits for it."""
        self._finishing = [child for child in self._finishing if child.poll() is None]  # reap the finished ones
        if self._child is not None:
            with contextlib.suppress(OSError):
                self._child.stdin.close()  # type: ignore[union-attr]
            self._finishing.append(self._child)
            self._child = None
        if self._here is not None:
            self._here.close()

    def wait(self) -> None:
        """Return when every figure handed over so far is written."""
        self.close()
        while self._finishing:
            self._finishing.pop().wait()


def _load_figures() -> ModuleType:
    """:mod:`lightning_spacefold.figures` loaded from its file, without the package (and so without torch)."""
    spec = importlib.util.spec_from_file_location("_spacefold_figures", Path(__file__).with_name("figures.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _lowest_priority() -> None:
    """Let this process run only on a core that training leaves idle."""
    try:  # Linux: a SCHED_IDLE process yields at once to any other, also on the training's own cores
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        if hasattr(os, "nice"):
            os.nice(19)


def main() -> None:
    """The child: read ``(log_dirs, step, prefix, views)`` messages from standard input until it closes."""
    _lowest_priority()
    writer = FigureWriter(_load_figures().measurement_figures)
    try:
        while True:
            try:
                message = pickle.load(sys.stdin.buffer)
            except EOFError:
                break
            writer.write(*message)
    finally:
        writer.close()


if __name__ == "__main__":
    main()
