import math

import pytest

from lightning_spacefold.checks import is_int, is_real


@pytest.mark.parametrize(
    ("value", "minimum", "expected"),
    [(3, None, True), (3, 3, True), (2, 3, False), (True, None, False), (3.0, None, False), ("3", None, False)],
)
def test_is_int(value: object, minimum: int | None, expected: bool) -> None:
    assert is_int(value, minimum) is expected


@pytest.mark.parametrize(
    ("value", "minimum", "strict", "expected"),
    [
        (0.5, 0, True, True),
        (0, 0, True, False),
        (0, 0, False, True),
        (-1, 0, False, False),
        (math.inf, None, False, False),
        (math.nan, None, False, False),
        (False, None, False, False),
        ("1", None, False, False),
    ],
)
def test_is_real(value: object, minimum: float | None, strict: bool, expected: bool) -> None:
    assert is_real(value, minimum, strict=strict) is expected
