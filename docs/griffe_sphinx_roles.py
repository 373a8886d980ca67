r"""Griffe extension for the documentation site: renders the Sphinx roles of the docstrings.

The docstrings are Google style with Sphinx cross-reference roles (``:func:`~lightning_spacefold.path_folding```,
``:math:`\chi```, ...), which Markdown would show literally. This extension rewrites them before mkdocstrings
renders the docstrings: a reference to an object of this package becomes an optional mkdocs-autorefs link (a link
when the object is on the site, plain code otherwise), any other reference and ``:math:`` become code.
"""

from __future__ import annotations

import ast
import html
import re
from pathlib import Path
from typing import Any

import griffe

PACKAGE = "lightning_spacefold"
ROLE = re.compile(r":(?P<role>[a-z]+):`(?P<short>~?)(?P<target>[^`]+)`")


def _public_names() -> set[str]:
    """The names in the package's ``__all__``, read without importing it."""
    tree = ast.parse((Path(__file__).parents[1] / PACKAGE / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return set(ast.literal_eval(node.value))
    return set()


PUBLIC = _public_names()


def _identifier(target: str, role: str, obj: griffe.Object) -> str | None:
    """The full path of a role's target inside the package, or ``None`` for anything outside it."""
    head = target.split(".")[0]
    if head == PACKAGE:
        return target
    if head in PUBLIC:
        return f"{PACKAGE}.{target}"
    if "." in target and head.islower():
        return None  # another package: numpy.median, torch.Generator, ...
    owner = obj if obj.is_class else obj.parent
    if role in ("attr", "meth") and owner is not None and owner.is_class:
        return f"{owner.path}.{target}"
    return f"{obj.module.path}.{target}"


def _render(match: re.Match[str], obj: griffe.Object) -> str:
    role, target = match["role"], match["target"]
    if role == "math":
        return f"<code>{html.escape(target)}</code>"
    title = target.rsplit(".", 1)[-1] if match["short"] else target
    if role in ("func", "meth"):
        title += "()"
    code = f"<code>{html.escape(title)}</code>"
    identifier = _identifier(target, role, obj)
    if identifier is None:
        return code
    return f'<autoref identifier="{html.escape(identifier)}" optional>{code}</autoref>'


class SphinxRoles(griffe.Extension):
    """Rewrites the Sphinx roles of every docstring of the package."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        """Rewrite the docstring of one object as it is loaded."""
        if obj.docstring is not None:
            obj.docstring.value = ROLE.sub(lambda match: _render(match, obj), obj.docstring.value)
