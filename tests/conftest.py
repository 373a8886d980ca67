"""Shared test set-up."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def fresh_distributed_port(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every DDP test picks a free port of its own.

    Lightning's launcher writes ``MASTER_PORT`` into this process's environment, so without this the next DDP
    test would bind the same port while the last one's socket may still be closing (an occasional failure).
    """
    monkeypatch.delenv("MASTER_PORT", raising=False)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
