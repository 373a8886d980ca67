"""A differentiable surrogate of space folding, to add folding to a training loss (specification, section 5).

The folding ``chi`` of a path (section 2) is piecewise constant in the weights: its gradient is zero almost
everywhere. :func:`soft_folding` replaces each ingredient by a smooth one, for paths sampled at ``steps + 1``
points ``x_0 .. x_N`` as :func:`~lightning_spacefold.path_folding` samples them:

- Soft bits ``s = sigmoid(z / (tau * sigma))`` for every pre-activation ``z``. ``sigma`` is the standard deviation
  of the layer's pre-activations over the path's points and the layer's units, detached: ``tau`` is a fraction of
  the layer's spread, so one temperature suits every layer and every width, and one path's value does not depend
  on the other paths of the batch.
- Distance ``d(s, s') = sum_u |s_u - s'_u|``: the expected Hamming distance of the two bit vectors under the
  maximal coupling of each unit's two Bernoulli bits. The independent coupling of the specification,
  ``s (1 - s') + s' (1 - s)``, is ``2 s (1 - s) > 0`` between a point and itself, so a unit sitting near zero
  would add about ``1/2`` to every step of the walk. Its self-corrected form ``(s - s')^2`` is zero for equal
  points but breaks the triangle inequality: a bit that rises over ``k`` steps adds ``1`` to the range and only
  ``1 / k`` to the length, so a flat path would get ``chi < 0``. The absolute difference is the Hamming distance
  on binary patterns, zero for equal points and a metric.
- Range ``r1``: a smooth maximum of the distances from the start ``D_i = d(s_0, s_i)``: the end's distance plus
  the Boltzmann operator (softmax-weighted mean, sharpness ``beta = smooth_max`` per bit) of the excesses
  ``e_i = max(D_i - D_N, 0)``. It lies between ``D_N`` and ``max_i D_i`` and is the maximum itself when the walk
  is farthest from its start at its end. Log-sum-exp or a p-norm over all points would overshoot the maximum
  (``chi < 0``) or fall short of it on every path whose distance keeps growing (a spurious ``chi > 0`` on flat
  paths, which blurred the ranking of paths in ``examples/soft_folding_quality.py``).
- Length ``r2 = sum_i d(s_i, s_{i+1})`` and ``chi_soft = (r2 - r1) / (r2 + eps) = 1 - (r1 + eps) / (r2 + eps)``.
  The form ``1 - r1 / (r2 + eps)`` would give ``1`` to a path that never leaves its region (``r1 = r2 = 0``);
  this one gives ``0`` there, like the hard measure.

Hence ``0 <= chi_soft < 1`` (by the triangle inequality ``max_i D_i <= r2``), and ``chi_soft = 0`` whenever every
soft bit moves monotonically along the path (then ``r1 = D_N = r2``): at every temperature for a path inside one
region of a piecewise-linear network, whose pre-activations are affine along it. As ``temperature -> 0``,
``smooth_max -> inf`` and ``eps -> 0``, ``chi_soft`` tends to the ``chi`` of
:func:`~lightning_spacefold.path_folding` with the same ``steps``.

Hovering units. A unit gains a reward only by moving: a unit sitting at zero adds nothing (the distance is the
maximal-coupling one, see above), and a unit that swings between ``-delta`` and ``delta`` adds about
``delta / (2 tau sigma)`` per swing, a full flip only when it crosses zero with a margin of several
``tau * sigma``. ``sigma`` spans the whole layer, not one unit, and is detached, so a unit cannot inflate its own
shallow crossings by shrinking its spread: the surrogate rewards folds with a margin, whereas the hard ``chi``
counts any crossing.

Limits. At moderate ``tau`` the surrogate discounts shallow crossings and counts near misses (a unit that turns
back just before zero): it is a training signal that ranks paths, not an estimate of ``chi``. Units that stay many
``tau * sigma`` from zero along a path get no gradient. Regions narrower than one step are skipped, as by the hard
measure with the same ``steps``. All paths go through one forward (and backward) pass over ``P * (steps + 1)``
points held in memory (no streaming, unlike :func:`~lightning_spacefold.path_folding`). Only activations whose bit
is ``z > 0`` are supported (every built-in one; not a custom ``bits`` rule).

Modes. The surrogate runs in the model's current mode, with autograd as the caller has it (a training step
computes it in train mode), except that normalisation layers with running statistics (BatchNorm, InstanceNorm
with ``track_running_stats``) run in eval mode during its forward: their running statistics stay unchanged, the
surrogate follows the same network that :func:`~lightning_spacefold.path_folding` measures, and a path's points,
being interpolations of two inputs, would make poor batch statistics. Other modules keep their mode: a dropout
layer in train mode draws a different mask for every point, which makes patterns noisy along the path.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

from lightning_spacefold.capture import (
    ActivationRule,
    LayerInfo,
    capture_activations,
    check_batch_first,
    has_functional_layers,
)
from lightning_spacefold.folding import (
    Forward,
    check_path_arguments,
    inputs_key,
    select_layers,
    with_known_layers,
)
from lightning_spacefold.line import LineShortcut

__all__ = ["SCHEDULES", "folding_penalty", "regularization_weight", "soft_folding"]

SCHEDULES = ("constant", "linear", "cosine")

# The bits of every built-in activation: z > 0. The sigmoid surrogate assumes this threshold.
_THRESHOLD_AT_ZERO = ActivationRule().bits


def soft_folding(
    model: nn.Module,
    starts: Tensor,
    ends: Tensor,
    *,
    steps: int = 16,
    temperature: float = 0.1,
    layers: Sequence[str] | None = None,
    smooth_max: float = 8.0,
    eps: float = 1e-2,
    forward: Forward | None = None,
) -> Tensor:
    """Differentiable surrogate of the folding of each segment from ``starts[p]`` to ``ends[p]``.

    All ``P * (steps + 1)`` points go through the model in one forward pass; the result carries gradients to the
    model's parameters (and to ``starts`` and ``ends`` where they require them) when autograd is enabled. See the
    module docstring for the construction, its limits and how modes and BatchNorm are handled.

    Args:
        model: The network; it must take a batch ``[B, *input_shape]``.
        starts: Start of each path, ``[P, *input_shape]``, floating point.
        ends: End of each path, same shape, dtype and device as ``starts``.
        steps: Number of segments per path; ``steps + 1`` points are evaluated.
        temperature: Width of the soft bits' sigmoid as a fraction of each layer's pre-activation spread along
            the path; smaller is closer to the hard bits, with gradients for fewer units.
        layers: Names of the layers to use (see :func:`~lightning_spacefold.find_layers`); ``None`` for all.
        smooth_max: Sharpness, per bit, of the smooth maximum that gives the range (see the module docstring);
            larger is closer to the hard maximum.
        eps: Added to the range and the length (in bits) before dividing: paths shorter than about ``eps`` bits
            count as not folding.
        forward: The function that maps a batch of points to outputs (see
            :func:`~lightning_spacefold.path_folding`); ``model`` by default. Gradients reach the parameters it uses.

    Returns:
        ``chi_soft`` in ``[0, 1)``, shape ``[P]``, float32 (float64 for float64 inputs); NaN for a path along which
        a selected layer's pre-activation or the model's output is NaN or infinite (a diverged network).

    Raises:
        TypeError: If the model or the inputs have the wrong type, or a hyperparameter is not a real number.
        ValueError: For inputs of different shapes, empty or non-finite inputs, ``steps < 1``, a hyperparameter
            that is not positive and finite, a model with no supported activation, an unknown layer name, a
            selected layer with a custom ``bits`` rule or a pre-activation that is not batch-first.

    Examples:
        The network of :func:`~lightning_spacefold.path_folding`'s example: the path from 0.25 to 1.75 has
        ``chi = 1/3``; the one from 0.25 to 0.4 stays in one region. At a low temperature the surrogate is close to
        ``chi`` (``(r2 - r1) / (r2 + eps)`` with ``r2 = 3``, ``r1`` a little below 2, ``eps = 0.01``); a path inside
        one region gets 0 at every temperature.

        >>> import torch
        >>> from torch import nn
        >>> from lightning_spacefold import soft_folding
        >>> model = nn.Sequential(nn.Linear(1, 2), nn.ReLU(), nn.Linear(2, 1), nn.ReLU())
        >>> # a = relu(x), b = relu(x - 1), then c = relu(a - 2 b - 0.5): on when 0.5 < x < 1.5
        >>> nn.utils.vector_to_parameters(torch.tensor([1.0, 1.0, 0.0, -1.0, 1.0, -2.0, -0.5]), model.parameters())
        >>> starts, ends = torch.tensor([[0.25], [0.25]]), torch.tensor([[1.75], [0.4]])
        >>> chi_soft = soft_folding(model, starts, ends, steps=3, temperature=0.01)
        >>> [round(value, 2) for value in chi_soft.tolist()]
        [0.33, 0.0]
        >>> chi_soft.requires_grad
        True
    """
    check_path_arguments(model, starts, ends, steps, None, forward)
    for name, value in (("temperature", temperature), ("smooth_max", smooth_max), ("eps", eps)):
        _check_positive(name, value)
    arguments = (model, starts, ends, steps, temperature, layers, smooth_max, eps, forward)
    measure = functools.partial(_soft_folding, *arguments)
    return with_known_layers(measure, model, starts, ends, forward)


def _soft_folding(
    model: nn.Module,
    starts: Tensor,
    ends: Tensor,
    steps: int,
    temperature: float,
    layers: Sequence[str] | None,
    smooth_max: float,
    eps: float,
    forward: Forward | None,
    found: list[LayerInfo],
) -> Tensor:
    selected = select_layers([layer.name for layer in found], layers)

    num_paths, num_points = len(starts), steps + 1
    dtype = torch.promote_types(starts.dtype, torch.float32)

    def soft_bits(position: int, pre_activation: Tensor, rule: ActivationRule) -> Tensor:
        # Computed at the call: an in-place activation overwrites its input right after.
        name = found[selected[position]].name
        if rule.bits is not _THRESHOLD_AT_ZERO:
            raise ValueError(
                f"Layer {name!r} uses a custom `bits` rule; soft_folding supports activations whose bit is z > 0. "
                "Leave the layer out with `layers`."
            )
        check_batch_first(name, pre_activation, num_paths * num_points)
        z = pre_activation.to(dtype).reshape(num_paths, num_points, -1)
        finite.append(torch.isfinite(z.detach().sum((1, 2))))
        scale = temperature * z.detach().std(dim=(1, 2), keepdim=True)
        # A layer constant along a path has scale 0: any finite divisor gives equal soft bits, hence distance 0.
        return torch.sigmoid(z / scale.clamp_min(torch.finfo(dtype).tiny))

    t = torch.arange(num_points, dtype=torch.float64, device=starts.device) / steps
    finite: list[Tensor] = []  # per layer, [P]: whether the path's pre-activations are finite
    with (
        _frozen_running_statistics(model),
        LineShortcut(model, inputs_key(starts, forward), num_paths * num_points * starts[0].numel()) as line,
        capture_activations(
            model, line.unwatched(soft_bits), frozenset(selected), has_functional_layers(found), expected=found
        ) as capture,
    ):
        output = line.run(model if forward is None else forward, starts, ends, t)
        capture.check_pass()
    if isinstance(output, Tensor) and output.is_floating_point() and output.shape[:1] == (num_paths * num_points,):
        finite.append(torch.isfinite(output.detach().reshape(num_paths, -1).sum(-1)))
    bits = torch.cat(capture.values, dim=-1)  # [P, steps + 1, units]

    r1 = _smooth_range((bits - bits[:, :1]).abs().sum(-1), smooth_max)
    r2 = (bits[:, 1:] - bits[:, :-1]).abs().sum((1, 2))
    # r1 <= r2 holds exactly; the clamp removes float rounding below zero (seen down to -1.5e-7).
    chi = ((r2 - r1) / (r2 + eps)).clamp_min(0)
    # A path through non-finite values has no folding (sigmoid would turn an infinity into a plain bit): NaN, the
    # loss's usual signal of a diverged network.
    return chi.where(torch.stack(finite).all(0), torch.nan)


def folding_penalty(model: nn.Module, starts: Tensor, ends: Tensor, weight: float, **kwargs: Any) -> Tensor:
    """Loss term ``-weight * mean(soft_folding(...))`` to add to a task loss: minimising it raises folding.

    Args:
        model: The network.
        starts: Start of each path, ``[P, *input_shape]``.
        ends: End of each path, same shape as ``starts``.
        weight: The regularisation weight ``lambda`` (see :func:`regularization_weight` for schedules); a negative
            weight penalises folding instead.
        **kwargs: Keyword arguments of :func:`soft_folding` (``steps``, ``temperature``, ``layers``, ...).

    Returns:
        A differentiable scalar.

    Raises:
        TypeError: If ``weight`` is not a real number, or as :func:`soft_folding`.
        ValueError: If ``weight`` is not finite, or as :func:`soft_folding`.

    Examples:
        With :func:`soft_folding`'s example network and its folding path (soft folding about 0.33):

        >>> import torch
        >>> from torch import nn
        >>> from lightning_spacefold import folding_penalty
        >>> model = nn.Sequential(nn.Linear(1, 2), nn.ReLU(), nn.Linear(2, 1), nn.ReLU())
        >>> # a = relu(x), b = relu(x - 1), then c = relu(a - 2 b - 0.5): on when 0.5 < x < 1.5
        >>> nn.utils.vector_to_parameters(torch.tensor([1.0, 1.0, 0.0, -1.0, 1.0, -2.0, -0.5]), model.parameters())
        >>> starts, ends = torch.tensor([[0.25]]), torch.tensor([[1.75]])
        >>> penalty = folding_penalty(model, starts, ends, 0.5, steps=3, temperature=0.01)
        >>> round(penalty.item(), 2)  # -0.5 * 0.33
        -0.17
        >>> penalty.backward()  # task_loss + penalty: the gradient raises folding
    """
    _check_real("weight", weight)
    return -weight * soft_folding(model, starts, ends, **kwargs).mean()


def regularization_weight(
    step: int, total_steps: int | float, weight: float, schedule: str = "constant", until: float = 1.0
) -> float:
    """The regularisation weight at a training step, for a schedule that applies folding mostly early.

    With ``end = until * total_steps``:

    - ``"constant"``: ``weight`` for ``step < end`` and ``0`` from there on; with ``until = 1`` it is ``weight`` at
      every step, also past ``total_steps`` (an estimate of the run's length that falls short changes nothing).
    - ``"linear"``: ``weight * (1 - step / end)``, ``0`` from ``end`` on.
    - ``"cosine"``: ``weight * (1 + cos(pi * step / end)) / 2``, ``0`` from ``end`` on.

    Args:
        step: The current step, from 0.
        total_steps: The number of steps of the run, or ``math.inf`` when unknown (only for ``"constant"`` with
            ``until = 1``).
        weight: The weight at step 0.
        schedule: One of ``"constant"``, ``"linear"``, ``"cosine"``.
        until: Fraction of the run, in ``(0, 1]``, after which the weight is 0.

    Returns:
        The weight at ``step``.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: For ``step < 0``, ``total_steps < 1``, a non-finite weight, an unknown schedule or ``until``
            outside ``(0, 1]``.

    Examples:
        A weight of 0.3 decaying to 0 at half of a 100-step run: at step 25 the linear and the cosine schedule are
        both half-way (``0.3 * (1 - 25/50)`` and ``0.3 * (1 + cos(pi / 2)) / 2``).

        >>> from lightning_spacefold import regularization_weight
        >>> regularization_weight(25, 100, 0.3, "linear", until=0.5)
        0.15
        >>> round(regularization_weight(25, 100, 0.3, "cosine", until=0.5), 10)
        0.15
        >>> regularization_weight(49, 100, 0.3, "constant", until=0.5), regularization_weight(50, 100, 0.3, until=0.5)
        (0.3, 0.0)
    """
    unknown_length = total_steps == math.inf
    for name, value, least in (("step", step, 0), ("total_steps", total_steps, 1)):
        if name == "total_steps" and unknown_length:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"`{name}` must be an integer, got {value!r}.")
        if value < least:
            raise ValueError(f"`{name}` must be >= {least}, got {value}.")
    _check_real("weight", weight)
    if schedule not in SCHEDULES:
        raise ValueError(f"Unknown schedule {schedule!r}; the schedules are {', '.join(map(repr, SCHEDULES))}.")
    _check_real("until", until)
    if not 0 < until <= 1:
        raise ValueError(f"`until` must be a fraction of the run in (0, 1], got {until!r}.")
    if unknown_length and (schedule != "constant" or until < 1):
        raise ValueError(
            f"schedule={schedule!r} with until={until} needs the run's length, but total_steps is unknown (inf); "
            "set a finite number of steps or epochs, or use schedule='constant' with until=1."
        )

    progress = step / (until * total_steps)
    if schedule == "constant":
        return float(weight) if until == 1 or progress < 1 else 0.0
    if progress >= 1:
        return 0.0
    if schedule == "linear":
        return float(weight) * (1 - progress)
    return float(weight) * (1 + math.cos(math.pi * progress)) / 2


def _smooth_range(from_start: Tensor, sharpness: float) -> Tensor:
    """Smooth maximum of the distances from the start ``[P, N]`` over each path (see the module docstring).

    The end's distance plus the Boltzmann operator (softmax-weighted mean) of the excesses over it, which lies
    between 0 and their maximum.
    """
    end = from_start[:, -1]
    excess = (from_start - end.unsqueeze(1)).clamp_min(0)
    return end + (torch.softmax(sharpness * excess, dim=-1) * excess).sum(-1)


@contextmanager
def _frozen_running_statistics(model: nn.Module) -> Iterator[None]:
    """Run normalisation layers that keep running statistics in eval mode; restore their flags afterwards."""
    flags = {module: module.training for module in model.modules() if isinstance(module, _NormBase)}
    try:
        for module in flags:
            module.eval()
        yield
    finally:
        for module, training in flags.items():
            module.train(training)


def _check_real(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a real number, got {value!r}.")
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be finite, got {value!r}.")


def _check_positive(name: str, value: object) -> None:
    _check_real(name, value)
    if value <= 0:  # type: ignore[operator]
        raise ValueError(f"`{name}` must be > 0, got {value!r}.")
