"""The Fabric example (``examples/fabric_loop.py``) in a reduced size: on 2 CPU processes, and on one."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_spacefold import SpaceFolding
from tests.test_callback import events
from tests.test_examples import EXAMPLES, load

PAIRS, STEPS, EVERY, EPOCHS = 64, 32, 5, 2
REDUCED = ["--epochs", str(EPOCHS), "--every", str(EVERY), "--pairs", str(PAIRS), "--steps", str(STEPS)]
LIMIT = 150  # seconds for the 2-process run; it takes about 25 on 2 CPU cores


def run_on_two_processes(out: Path) -> tuple[int | None, str]:
    """Run the example as a user would, ``--devices 2``: Fabric starts the second process by running the command
    again. Its exit code (``None`` past ``LIMIT``) and output; every process it started is gone afterwards."""
    log = out.parent / "output.log"
    with open(log, "w") as file:
        process = subprocess.Popen(
            [sys.executable, str(EXAMPLES / "fabric_loop.py"), *REDUCED, "--devices", "2", "--out", str(out)],
            stdout=file,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            start_new_session=True,  # its own process group, with the process Fabric starts
        )
    try:
        code: int | None = process.wait(timeout=LIMIT)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        with contextlib.suppress(ProcessLookupError):  # a process left waiting for the other, or a hung run
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    return code, log.read_text()[-8000:]


def test_two_processes_log_the_synced_folding_of_all_pairs(tmp_path: Path) -> None:
    example = load("fabric_loop")
    out = tmp_path / "runs"
    code, output = run_on_two_processes(out)
    assert code == 0, output

    x_train, _y_train, x_val, y_val = load("digits").load_split("digits", 0)
    last = EPOCHS * math.ceil(math.ceil(len(x_train) / 2) / 64)  # each process's batches of 64
    log = events(out / "digits" / "version_0")
    tags = [tag for tag in log.Tags()["scalars"] if tag.startswith("spacefold/")]
    assert {"spacefold/folding", "spacefold/folded_fraction", "spacefold/layer/1", "spacefold/layer/5"} <= set(tags)
    for tag in tags:
        assert [event.step for event in log.Scalars(tag)] == [*range(0, last, EVERY), last], tag
    assert [event.step for event in log.Scalars("train/loss")] == list(range(1, last + 1))
    assert [image.step for image in log.Images("spacefold/layers")] == [last]
    assert (out / "digits" / "version_0" / "layers.png").stat().st_size > 5_000

    # One process measuring all the pairs with the saved model gives the logged (synchronised) values.
    model = example.make_model()
    model.load_state_dict(torch.load(out / "final.ckpt")["model"])
    pairs = example.measurement_pairs(x_val, y_val, PAIRS, 0)
    metric = SpaceFolding(steps=STEPS, num_classes=example.NUM_CLASSES)
    metric.update(model, *pairs)
    expected = example.scalars(metric.compute())
    assert expected.keys() == set(tags)
    for tag, value in expected.items():
        assert log.Scalars(tag)[-1].value == pytest.approx(value, abs=1e-6), tag
    # Process 0's share alone gives other values: the test would see a metric that is not synchronised.
    metric.reset()
    metric.update(model, *(tensor[0::2] for tensor in pairs))
    assert example.scalars(metric.compute())["spacefold/folding"] != pytest.approx(expected["spacefold/folding"])


def test_one_process_returns_what_it_logs(tmp_path: Path) -> None:
    example = load("fabric_loop")
    values = example.main(["--epochs", "1", "--every", "10", "--pairs", "8", "--steps", "8", "--out", str(tmp_path)])
    log = events(tmp_path / "digits" / "version_0")
    assert [event.step for event in log.Scalars("spacefold/folding")] == [0, 10, 20, 22]  # 22 batches of 64
    for tag, value in values.items():
        assert log.Scalars(tag)[-1].value == pytest.approx(value), tag
    with pytest.raises(SystemExit):
        example.main(["--every", "0", "--out", str(tmp_path)])
