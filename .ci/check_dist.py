"""Check the built distributions (``archives DIST``) or the package installed from the wheel (``installed``).

``archives``: the wheel and the sdist carry the version of ``lightning_spacefold/__init__.py``, ``py.typed`` and
the LICENSE. ``installed`` (run with ``python -I`` in an environment with the wheel installed, from anywhere):
the imported package comes from site-packages, has that version, in its metadata too, and ships ``py.typed``.
"""

from __future__ import annotations

import ast
import sys
import tarfile
import zipfile
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "lightning_spacefold" / "__init__.py"


def source_version() -> str:
    """The literal ``__version__`` of the source tree, read without importing it."""
    for node in ast.parse(SOURCE.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__version__" for t in node.targets):
            return ast.literal_eval(node.value)
    raise SystemExit(f"no __version__ in {SOURCE}")


def check_archives(dist: Path, version: str) -> None:
    """The wheel and the sdist of ``version`` hold py.typed and the LICENSE."""
    wheel = dist / f"lightning_spacefold-{version}-py3-none-any.whl"
    sdist = dist / f"lightning_spacefold-{version}.tar.gz"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    for name in ("lightning_spacefold/py.typed", f"lightning_spacefold-{version}.dist-info/licenses/LICENSE"):
        assert name in names, f"{wheel.name} lacks {name}"
    with tarfile.open(sdist) as archive:
        names = set(archive.getnames())
    for name in ("LICENSE", "lightning_spacefold/py.typed", "PKG-INFO"):
        assert f"lightning_spacefold-{version}/{name}" in names, f"{sdist.name} lacks {name}"
    print(f"{wheel.name} and {sdist.name}: py.typed and LICENSE present")


def check_installed(version: str) -> None:
    """The importable package is the installed wheel of ``version``, typed."""
    from importlib.metadata import version as installed_version

    import lightning_spacefold

    package = Path(lightning_spacefold.__file__).parent
    assert "site-packages" in package.parts, f"imported from {package}, not from the installed wheel"
    assert lightning_spacefold.__version__ == installed_version("lightning-spacefold") == version, (
        lightning_spacefold.__version__,
        installed_version("lightning-spacefold"),
        version,
    )
    assert (package / "py.typed").is_file(), f"{package} lacks py.typed"
    print(f"installed wheel: lightning_spacefold {version} from {package}, with py.typed")


if __name__ == "__main__":
    if sys.argv[1:2] == ["archives"] and len(sys.argv) == 3:
        check_archives(Path(sys.argv[2]), source_version())
    elif sys.argv[1:] == ["installed"]:
        check_installed(source_version())
    else:
        raise SystemExit("usage: check_dist.py archives DIST | installed")
