"""Every example runs in a reduced size, so that none can rot."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

EXAMPLES = Path(__file__).parent.parent / "examples"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_measure_trained_mlp(capsys) -> None:
    results = load("measure_trained_mlp").main(["--epochs", "3", "--pairs", "16", "--steps", "8"])
    assert 0.5 < results["accuracy"] <= 1.0
    assert 0.0 <= results["folding"] < 1.0
    assert "| whole network |" in capsys.readouterr().out
