"""The package as published: one version, type information, licence."""

from __future__ import annotations

from importlib.metadata import metadata, version
from pathlib import Path

import lightning_spacefold

ROOT = Path(__file__).resolve().parents[1]


def test_installed_version_is_the_package_version() -> None:
    assert version("lightning-spacefold") == lightning_spacefold.__version__


def test_package_is_typed() -> None:
    assert (Path(lightning_spacefold.__file__).parent / "py.typed").is_file()


def test_license() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "Copyright 2026 The lightning-spacefold authors" in text
    assert metadata("lightning-spacefold")["License-Expression"] == "Apache-2.0"
