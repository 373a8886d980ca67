"""The figures drawn beside training: in a child process, or in this one where no child can run."""

from __future__ import annotations

import copy
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_spacefold import figure_process
from lightning_spacefold.figure_process import FigureProcess

VIEWS = {
    "from_start": np.array([[0, 1, 2, 1]]),
    "walked": np.array([[0, 1, 2, 3]]),
    "chi": np.array([1 / 3]),
    "layer_names": ["net.1", "net.3"],
    "layer_values": np.array([0.0, 0.5]),
    "class_pairs": np.array([[0.0, 0.2], [0.4, np.nan]]),
}


def images(log_dir: Path) -> dict[str, list[int]]:
    accumulator = EventAccumulator(str(log_dir / "figures"), size_guidance={"images": 0})
    accumulator.Reload()
    return {tag: [event.step for event in accumulator.Images(tag)] for tag in accumulator.Tags()["images"]}


def test_a_child_process_writes_each_measurements_figures(tmp_path: Path) -> None:
    figures = FigureProcess()
    figures.submit([str(tmp_path)], 3, "spacefold", VIEWS)
    figures.submit([str(tmp_path)], 5, "spacefold", {**VIEWS, "class_pairs": None})
    child = figures._child
    figures.wait()
    assert child is not None and child.returncode == 0
    assert images(tmp_path) == {
        "spacefold/example_paths": [3, 5],
        "spacefold/layers": [3, 5],
        "spacefold/class_pairs": [3],
    }


def test_where_no_child_can_start_the_figures_are_drawn_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(figure_process.sys, "executable", str(tmp_path / "no-python"))
    figures = FigureProcess()
    with pytest.warns(UserWarning, match="drawing them in the training process"):
        figures.submit([str(tmp_path)], 1, "spacefold", VIEWS)
    figures.submit([str(tmp_path)], 2, "spacefold", VIEWS)  # warned once
    figures.wait()
    assert images(tmp_path)["spacefold/layers"] == [1, 2]


def test_after_the_child_dies_the_figures_are_drawn_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dying = tmp_path / "dying"
    dying.write_text("#!/bin/sh\nsleep 0.5\nexit 1\n")  # takes the first message into its pipe, then dies
    dying.chmod(0o755)
    monkeypatch.setattr(figure_process.sys, "executable", str(dying))
    figures = FigureProcess()
    figures.submit([str(tmp_path)], 1, "spacefold", VIEWS)  # taken by a child that exits at once: lost
    assert figures._child is not None
    figures._child.wait()
    with pytest.warns(UserWarning, match="could not run"):
        figures.submit([str(tmp_path)], 2, "spacefold", VIEWS)
    figures.wait()
    assert images(tmp_path)["spacefold/example_paths"] == [2]


def test_copies_start_their_own_child(tmp_path: Path) -> None:
    figures = FigureProcess()
    figures.submit([str(tmp_path)], 1, "spacefold", VIEWS)
    for duplicate in (copy.deepcopy(figures), pickle.loads(pickle.dumps(figures))):
        assert duplicate._child is None and not duplicate._finishing
    figures.wait()


def after_the_child(expression: str) -> str:
    """What ``expression`` prints in a Python process that has run the child's script to its end (no input)."""
    code = (
        "import os, runpy, sys; sys.stdin = open('/dev/null'); "
        f"runpy.run_path({figure_process.__file__!r}, run_name='__main__'); print({expression})"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def test_the_child_loads_neither_torch_nor_lightning() -> None:
    assert after_the_child("sorted(name for name in ('torch', 'lightning') if name in sys.modules)") == "[]"


def test_the_child_runs_only_when_a_core_is_idle() -> None:
    assert after_the_child("os.sched_getscheduler(0) == os.SCHED_IDLE") == "True"


def test_the_figures_are_written_after_the_training_process_exits(tmp_path: Path) -> None:
    code = (
        "import numpy as np; from lightning_spacefold.figure_process import FigureProcess; "
        f"views = {{'from_start': np.zeros((1, 3)), 'walked': np.zeros((1, 3)), 'chi': np.zeros(1), "
        "'layer_names': ['a'], 'layer_values': np.zeros(1), 'class_pairs': None}; "
        f"figures = FigureProcess(); figures.submit([{str(tmp_path)!r}], 1, 'spacefold', views); "
        f"figures.submit([{str(tmp_path)!r}], 2, 'spacefold', views)"  # and exits without waiting
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    for _ in range(600):  # the orphaned child finishes on its own
        if (tmp_path / "figures").exists() and images(tmp_path).get("spacefold/layers") == [1, 2]:
            break
        time.sleep(0.1)
    assert images(tmp_path) == {"spacefold/example_paths": [1, 2], "spacefold/layers": [1, 2]}
