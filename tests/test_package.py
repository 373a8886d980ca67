"""The package as published: one version, type information, licence."""

from __future__ import annotations

import re
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


def test_documentation_has_every_public_name() -> None:
    documented = set(re.findall(r"^::: lightning_spacefold\.(\w+)$", (ROOT / "docs" / "api.md").read_text(), re.M))
    assert set(lightning_spacefold.__all__) <= documented


def test_getting_started_has_the_readme_commands() -> None:
    readme_commands = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert readme_commands is not None
    assert readme_commands.group(1) in (ROOT / "docs" / "getting-started.md").read_text()
