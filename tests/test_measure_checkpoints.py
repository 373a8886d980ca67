"""examples/measure_checkpoints.py reads checkpoints as untrusted input: no code a file carries runs."""

from __future__ import annotations

import pathlib
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from tests.test_examples import load, train_checkpoints


class RunsCode:
    """Unpickling this object writes a marker file: what a malicious checkpoint could do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.write_text, (self.marker, "code from the checkpoint ran")


@pytest.fixture
def checkpoints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder with a real Lightning checkpoint (step 2) of the examples' MLP on digits."""
    monkeypatch.chdir(tmp_path)
    train_checkpoints(max_steps=2)
    return tmp_path / "ckpt"


ARGUMENTS = ["--out", "measured", "--num-pairs", "4", "--steps", "4", "--pairing", "random", "--probe-size", "32"]


def test_a_file_that_would_run_code_is_refused_before_anything_runs(checkpoints: Path, capsys) -> None:
    marker = checkpoints.parent / "marker"
    real = torch.load(next(checkpoints.glob("*.ckpt")), weights_only=True)
    torch.save({**real, "global_step": 4, "payload": RunsCode(marker)}, checkpoints / "evil.ckpt")
    with pytest.raises(SystemExit):
        load("measure_checkpoints").main([str(checkpoints), *ARGUMENTS])
    error = capsys.readouterr().err
    assert "evil.ckpt" in error and "--trust-checkpoints" in error and "could run code" in error
    assert not marker.exists()
    assert not (checkpoints.parent / "measured").exists()  # not even the real checkpoint was measured
    torch.load(checkpoints / "evil.ckpt", weights_only=False)  # the file does run code when read in full
    assert marker.read_text() == "code from the checkpoint ran"


def test_real_checkpoints_are_read_and_others_only_when_trusted(checkpoints: Path, capsys) -> None:
    script = load("measure_checkpoints")
    assert [row["step"] for row in script.main([str(checkpoints), *ARGUMENTS])] == [2]
    # A checkpoint with an object outside torch's allow-list (a Fraction among its hyper-parameters).
    path = next(checkpoints.glob("*.ckpt"))
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["hyper_parameters"]["note"] = Fraction(1, 3)
    torch.save(checkpoint, path)
    with pytest.raises(SystemExit):
        script.main([str(checkpoints), *ARGUMENTS])
    assert f"{path} holds objects other than tensors" in capsys.readouterr().err
    rows = script.main([str(checkpoints), *ARGUMENTS, "--trust-checkpoints"])
    assert [row["step"] for row in rows] == [2] and 0.0 <= rows[0]["spacefold/folding"] < 1.0
