"""Non-finite values are errors, never bits (specification, section 1).

A NaN pre-activation gives ``z > 0 == False``, so a diverged network would read as "flat" (``chi = 0``), a real
and meaningful value. Every measurement therefore checks what enters each activation layer and what the model
returns. The check must not slow the hot path: each tensor is reduced to its sum (one fast pass, no device sync),
which is finite exactly when every element is, up to an overflow of the sum itself (float32 or wider accumulation:
only values near the dtype's limit, which overflow in the next layer anyway). The sums are checked once, at the
end of a measurement.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["OUTPUT", "FiniteCheck", "NonFiniteError", "finite_sum", "output_sum"]

OUTPUT = "the model's output"
"""The name a :class:`FiniteCheck` gives the model's output in its error."""


class NonFiniteError(ValueError):
    """The network produced a NaN or infinite pre-activation or output, so it has no activation pattern there."""


def finite_sum(tensor: Tensor) -> Tensor:
    """Sum of a tensor in at least float32: NaN or infinite exactly when an element is (see the module docstring)."""
    return tensor.sum(dtype=torch.promote_types(tensor.dtype, torch.float32))


def output_sum(output: Any) -> Tensor | None:
    """:func:`finite_sum` over every floating-point tensor in a model's output (nested tuples, lists, dicts).

    Returns:
        A float scalar, or ``None`` when the output holds no floating-point tensor.
    """
    if isinstance(output, Tensor):
        return finite_sum(output) if output.is_floating_point() else None
    if isinstance(output, Mapping):
        output = list(output.values())
    if not isinstance(output, Sequence) or isinstance(output, (str, bytes)):
        return None
    sums = [value for value in map(output_sum, output) if value is not None]
    return torch.stack(sums).sum() if sums else None


class FiniteCheck:
    """Whether the pre-activations of each layer and the model's output stayed finite over many forward passes.

    Call :meth:`add` for each layer's pre-activation in forward order and :meth:`end_pass` with the output after
    each forward pass; :meth:`check` raises at the end. Nothing synchronises the device before :meth:`check`. One
    flag per name is updated in place after each pass: a small tensor kept per pass, allocated among the pass's large
    temporaries, fragments the CPU allocator's heap (the resident memory grew by gigabytes over many passes).

    Args:
        names: The layers' names, in the order :meth:`add` sees them in a forward pass.
    """

    def __init__(self, names: Sequence[str]) -> None:
        self.names = [*names, OUTPUT]
        self.current: list[Tensor] = []
        self.finite: Tensor | None = None  # per name, whether every pass so far was finite
        self.dtype: torch.dtype | None = None

    def add(self, pre_activation: Tensor) -> None:
        """Record one layer's pre-activation."""
        self.current.append(finite_sum(pre_activation))
        self.dtype = pre_activation.dtype

    def end_pass(self, output: Any) -> None:
        """Record the model's output and close the forward pass."""
        last = output_sum(output)
        self.current.append(self.current[-1].new_zeros(()) if last is None else last)
        finite = torch.isfinite(torch.stack(self.current))
        self.current = []
        if self.finite is None:
            self.finite = finite
        else:
            self.finite &= finite

    def check(self) -> None:
        """Raise a :class:`NonFiniteError` naming the first layer (or else the output) that was not finite.

        Raises:
            NonFiniteError: If a pre-activation or the output held NaN or infinity.
        """
        if self.finite is None:
            return
        bad = ~self.finite
        if not bool(bad.any()):
            return
        name = self.names[int(bad.nonzero()[0])]
        where = "returned" if name == OUTPUT else f"fed layer {name!r}"
        raise NonFiniteError(
            f"The network {where} NaN or infinite values, so it has no activation pattern there and folding cannot "
            f"be measured: the network has non-finite values. It has diverged (NaN or infinite weights; lower the "
            f"learning rate or clip gradients) or overflowed in {self.dtype} (measure it in a wider dtype)."
        )
