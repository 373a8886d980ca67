"""Adding a term to the loss that a LightningModule's ``training_step`` returns.

The term then reaches the parameters through Lightning's normal backward, so mixed-precision scaling, gradient
accumulation (the returned loss is divided by the number of accumulated batches), clipping and DDP's gradient
synchronisation apply to it exactly as to the task loss. The wrapper is an instance attribute that shadows the
class's method and is removed again by :meth:`TrainingLossTerm.remove`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
from torch import Tensor

__all__ = ["TrainingLossTerm"]


class TrainingLossTerm:
    """Wrap ``module.training_step`` so that ``term(batch)`` is added to the loss it returns.

    ``term`` may return ``None`` to add nothing at this step. A step that returns ``None`` (skipped) stays skipped;
    a dict output gets the term added to its ``"loss"``.

    Args:
        module: The LightningModule; it must use automatic optimisation.
        term: Maps the training batch to a scalar tensor or ``None``.

    Raises:
        ValueError: If the module uses manual optimisation (it calls ``backward`` itself, so nothing returned from
            ``training_step`` reaches the gradients).
    """

    def __init__(self, module: pl.LightningModule, term: Callable[[Any], Tensor | None]) -> None:
        if not module.automatic_optimization:
            raise ValueError(
                f"{type(module).__name__} uses manual optimisation, so a term cannot be added to the loss that "
                "training_step returns. Add it in your own training_step instead, before manual_backward: "
                "`loss = loss + lightning_spacefold.folding_penalty(self, starts, ends, weight)`."
            )
        self.module = module
        self._shadowed = module.__dict__.get("training_step")
        self._active = True
        original = module.training_step

        @functools.wraps(original)
        def training_step(*args: Any, **kwargs: Any) -> Any:
            output = original(*args, **kwargs)
            if output is None or not self._active:
                return output
            extra = term(args[0] if args else kwargs["batch"])
            if extra is None:
                return output
            if isinstance(output, Tensor):
                return output + extra
            if isinstance(output, Mapping) and "loss" in output:
                return {**output, "loss": output["loss"] + extra}
            raise TypeError(
                f"training_step returned {type(output).__name__}; a loss term can only be added to a tensor or to "
                "the 'loss' of a dict."
            )

        training_step.loss_term = self  # type: ignore[attr-defined]
        self._wrapper = training_step
        module.training_step = training_step  # type: ignore[method-assign]

    def remove(self) -> None:
        """Stop adding the term and give the module its ``training_step`` back.

        When another wrapper was put on top of this one since, that wrapper stays and this one only stops adding
        its term (so the two can be removed in any order).
        """
        self._active = False
        if self.module.__dict__.get("training_step") is not self._wrapper:
            return
        restored = self._shadowed
        # Wrappers under this one that were removed already go too.
        while restored is not None and not getattr(getattr(restored, "loss_term", None), "_active", True):
            restored = restored.loss_term._shadowed
        if restored is None:
            del self.module.__dict__["training_step"]
        else:
            self.module.training_step = restored  # type: ignore[method-assign]
