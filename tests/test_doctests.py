"""The examples in the docstrings run and print what they show."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import re
from collections.abc import Callable
from pathlib import Path

import pytest

import lightning_spacefold
from lightning_spacefold import (
    SpaceFolding,
    find_layers,
    fold_measure,
    fold_ranges,
    folding_penalty,
    interaction_profile,
    path_folding,
    path_patterns,
    register_activation,
    regularization_weight,
    soft_folding,
    symmetric_fold_measure,
)
from lightning_spacefold.sampling import all_pairs, centroid_pairs, class_pairs, kmeans, random_pairs

DOCS = Path(__file__).resolve().parents[1] / "docs"
MODULES = sorted(name for _, name, _ in pkgutil.walk_packages(lightning_spacefold.__path__, "lightning_spacefold."))


def run_examples(tests: list[doctest.DocTest]) -> None:
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report: list[str] = []
    for test in tests:
        runner.run(test, out=report.append)
    assert runner.failures == 0, "".join(report)


@pytest.mark.parametrize("name", ["lightning_spacefold", *MODULES])
def test_docstring_examples(name: str) -> None:
    run_examples(doctest.DocTestFinder().find(importlib.import_module(name)))


@pytest.mark.parametrize(
    "page", sorted(path.relative_to(DOCS).as_posix() for path in DOCS.rglob("*.md") if ">>> " in path.read_text())
)
def test_documentation_examples(page: str) -> None:
    text = re.sub(r"^```.*$", "", (DOCS / page).read_text(), flags=re.MULTILINE)  # a fence ends an example's output
    run_examples([doctest.DocTestParser().get_doctest(text, {}, page, str(DOCS / page), 0)])


@pytest.mark.parametrize(
    "documented",
    [
        path_folding,
        path_patterns,
        SpaceFolding,
        soft_folding,
        folding_penalty,
        regularization_weight,
        fold_measure,
        fold_ranges,
        interaction_profile,
        symmetric_fold_measure,
        find_layers,
        register_activation,
        random_pairs,
        class_pairs,
        centroid_pairs,
        all_pairs,
        kmeans,
    ],
)
def test_public_functions_have_examples(documented: Callable[..., object]) -> None:
    assert "Examples:\n" in (documented.__doc__ or "") and ">>> " in (documented.__doc__ or "")
