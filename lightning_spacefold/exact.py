"""Exact folding along a segment: the activation regions of a piecewise-linear network, without a step count.

:func:`exact_folding` computes the sequence of activation patterns that dense sampling of ``t`` in ``[0, 1]`` sees
in the limit of infinitely many steps: the pattern at ``t = 0`` exactly, then the pattern of the interior of every
piece between consecutive breakpoints, then the pattern at ``t = 1`` exactly; ``r1``, ``r2`` and ``chi`` follow
as in :func:`~lightning_spacefold.path_folding` (specification, sections 2 and 3).

Algorithm. Inside one linear region every pre-activation is affine in ``t``, so one forward pass in forward-mode
AD along ``x2 - x1`` (linear layers, convolutions and eval-mode BatchNorm compute their tangents directly, in one
call each) gives, at a point ``t``, each pre-activation ``z`` and its slope ``dz/dt``, hence the span
``[behind, ahead]`` of ``t`` around the point where nothing bends: the first crossing ahead and the last crossing
behind, over every unit and every kink of its activation (and ``0``, where the bit flips), and over every max-pool
window where another element would overtake the winner. For an interval ``[a, b]`` between two evaluated points:

- if ``ahead(a) >= behind(b)`` (up to :data:`TIME_TOLERANCE`), the region of ``a`` reaches the region of ``b``:
  the interval holds these two patterns and is done;
- otherwise some region lies strictly between them: the point slightly off the middle of
  ``(ahead(a), behind(b))`` is evaluated and both halves are examined again.

Every evaluation thus finds a new region: the cost is about one forward pass (with tangents) per region visited,
after a coarse grid of starting points. All pending intervals of all paths go through the model together, at most
``batch_size`` points per forward pass, the leftmost intervals of each path first. Crossing times are ``-1 / rate``
in float64 from each unit's ``rate = slope / pre-activation`` in the model's dtype (one rounding of that dtype from
the exact crossing of the affine model), and points are interpolated in float64 before they are cast to the
model's dtype. Activation layers and max pooling after the last selected layer are ignored: they cannot change
the result.

Memory. Each path is resolved from left to right: as soon as no interval before a point is pending, the point's
pattern is streamed into the running ranges and lengths (as in ``path_folding``) and dropped. What is kept per
unresolved point is its packed pattern of the selected layers (``pack_words``) and four numbers per layer, and only
the unresolved front of each path is kept: a few times ``batch_size`` points in practice, not the total number of
regions (an MLP with 64 paths of about 180 regions each kept at most 545 points with ``batch_size=64``).

Supported: ``Linear``, ``Conv1d/2d/3d``, ``BatchNorm`` (eval mode), average pooling, ``nn.MaxPool1d/2d/3d`` and
``F.max_pool1d/2d/3d`` (a change of a window's winner is a breakpoint, found by watching these calls), ``Flatten``,
``Dropout`` (eval mode), residual additions, concatenations and other linear operations, and activations with
``kinks``: ``ReLU``, ``ReLU6``, ``LeakyReLU``, ``PReLU``, ``RReLU`` (eval mode), ``Hardtanh``, ``Hardsigmoid`` and
registered ones. The bits of a layer must change only at a kink or at ``0`` (true of every built-in rule).

Limits and errors.

- A smooth activation (``rule.kinks is None``: GELU, Tanh, ...) at or before the last selected layer raises a
  ``ValueError`` naming it, selected or not: it bends every later pre-activation. Activations after the last
  selected layer do not matter.
- Any other operation that is not linear (``abs``, ``torch.max``, adaptive max pooling, ``LayerNorm``, ...) hides
  breakpoints from the traversal. Every finished interval is checked: the affine models of its two ends must agree
  where they meet (and agree entirely when both ends claim the same region), compared on a fixed random projection
  of each layer's pre-activations within :data:`CONSISTENCY_TOLERANCE` relative to its magnitude. A failed check
  raises a ``ValueError`` naming the first layer whose pre-activation is not piecewise linear along the segment;
  the offending operation lies before it. There is no adaptive refinement. The check sees the two ends of each
  interval only: several hidden kinks that cancel within one interval (a narrow bump built from ``abs``, say) can
  go unnoticed and give a wrong result, so build networks from the supported operations.
- It runs in the model's own dtype: :func:`~lightning_spacefold.path_folding` switches autocast off around it,
  because a network computed in reduced precision is not exactly piecewise linear.
- Regions narrower than :data:`TIME_TOLERANCE` along ``t`` are not resolved: crossings closer than that count as
  simultaneous (dense sampling would need more than ``1 / TIME_TOLERANCE`` steps to see them). An evaluated point
  that lands exactly on a breakpoint in the interior of the segment contributes its own (boundary) pattern; the
  off-centre split point makes this practically impossible.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from types import EllipsisType
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lightning_spacefold.capture import (
    ActivationRule,
    LayerInfo,
    capture_activations,
    check_batch_first,
    evaluation_mode,
    has_functional_layers,
)
from lightning_spacefold.finite import FiniteCheck
from lightning_spacefold.heap import keep_heap
from lightning_spacefold.line import AFFINE_MAPS, Segments, linear_part
from lightning_spacefold.measure import folding_from_ranges, pack_words, popcount, segment_sums
from lightning_spacefold.result import FoldingResult

__all__ = ["CONSISTENCY_TOLERANCE", "TIME_TOLERANCE", "exact_folding"]

TIME_TOLERANCE: dict[torch.dtype, float] = {
    torch.float64: 1e-9,
    torch.float32: 1e-5,
    torch.float16: 1e-2,
    torch.bfloat16: 1e-2,
}
"""Per model dtype: two crossings closer than this along ``t`` (in ``[0, 1]``) count as simultaneous."""

CONSISTENCY_TOLERANCE: dict[torch.dtype, float] = {
    torch.float64: 1e-7,
    torch.float32: 1e-3,
    torch.float16: 1e-1,
    torch.bfloat16: 1e-1,
}
"""Per model dtype: relative mismatch of two affine models of a layer above which the network is not piecewise
linear along the segment (relative to the size of the projected pre-activations and their changes)."""

# The new point of a pending interval sits at this fraction of the gap between the two known regions: off the
# middle (0.5 - (sqrt(5) - 2) / 10), so that networks built by hand with breakpoints at simple fractions of the
# segment are not evaluated exactly on a breakpoint.
_SPLIT = 0.5 - (math.sqrt(5) - 2) / 10
# Points per path in the first forward pass (both ends and an evenly spread interior), at most.
_INITIAL_POINTS = 32
_PROJECTION_SEED = 20250101


@dataclass
class _Points:
    """Evaluated points, sorted by path then ``t``.

    Attributes:
        path: Path index of each point, ``[N]``.
        t: Position on the segment, float64 ``[N]``.
        ahead: End of the point's region ahead (first crossing), float64 ``[N]``, at most 1.
        behind: Start of the point's region behind (last crossing), float64 ``[N]``, at least 0.
        pattern: Bits of the selected layers, each layer packed on its own, ``int64 [N, words]``.
        prints: Per layer up to the last selected one, the pre-activation ``z`` and its slope ``dz`` projected on a
            fixed random direction ``d`` of standard normal entries, and their norms: ``(z . d, |z|, dz . d, |dz|)``,
            float64 ``[N, L, 4]``.
    """

    path: Tensor
    t: Tensor
    ahead: Tensor
    behind: Tensor
    pattern: Tensor
    prints: Tensor

    def __len__(self) -> int:
        return len(self.t)

    def take(self, index: Tensor) -> _Points:
        """The points at ``index`` (a boolean mask or indices)."""
        return _Points(*(getattr(self, field.name)[index] for field in fields(self)))

    def insert(self, after: Tensor, new: _Points) -> _Points:
        """Insert ``new[k]`` right after row ``after[k]`` (sorted, distinct, not a path's last row)."""
        positions = torch.arange(len(self), device=self.t.device)
        moved = positions + torch.zeros_like(positions).index_add_(0, after + 1, torch.ones_like(after)).cumsum(0)
        placed = after + 1 + torch.arange(len(after), device=after.device)
        columns = []
        for field in fields(self):
            old, added = getattr(self, field.name), getattr(new, field.name)
            merged = old.new_empty((len(old) + len(added), *old.shape[1:]))
            merged[moved], merged[placed] = old, added
            columns.append(merged)
        return _Points(*columns)

    @staticmethod
    def cat(parts: list[_Points]) -> _Points:
        """Join chunks of points."""
        return _Points(*(torch.cat([getattr(part, field.name) for part in parts]) for field in fields(_Points)))


def _crossings(rate: Tensor) -> tuple[Tensor, Tensor]:
    """Where the affine functions ``gap + slope * tau`` of each row first reach zero ahead and last behind.

    Args:
        rate: ``slope / gap`` of each function, ``[B, n]`` with ``n >= 1``; overwritten (it is a temporary).

    Returns:
        ``(ahead, behind)``, float64 ``[B]``: the smallest ``tau >= 0`` (``inf`` if none) and the largest ``tau <= 0``
        (``-inf`` if none). A function at zero with a non-zero slope crosses at ``tau = 0`` both ways: the point lies
        on a boundary, and its region is the point itself.
    """
    # Zero is reached at tau = -1 / rate: ahead for a negative rate, behind for a positive one; +-inf for a function
    # at zero; 0 / 0 (at zero and not moving) never crosses. Three passes over the units: amin and amax without
    # indices run an order of magnitude faster on CPU than min and max with them, and -1 / rate is within one
    # rounding of the model's dtype of the crossing (far below TIME_TOLERANCE).
    rate.nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf)
    fastest_down, fastest_up = rate.amin(1), rate.amax(1)
    on_boundary = (fastest_down == -math.inf) | (fastest_up == math.inf)
    ahead = torch.where(fastest_down < 0, -1 / fastest_down.double(), math.inf)
    behind = torch.where(fastest_up > 0, -1 / fastest_up.double(), -math.inf)
    return ahead.masked_fill(on_boundary, 0.0), behind.masked_fill(on_boundary, 0.0)


def _as_tuple(value: Any, dims: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * dims


def _windows(
    x: Tensor,
    kernel: tuple[int, ...],
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    dilation: tuple[int, ...],
    out_size: tuple[int, ...],
    fill: float,
) -> Tensor:
    """Every pooling window of the last ``len(kernel)`` dimensions: ``[..., *out_size, *kernel]`` (a padded view)."""
    dims = len(kernel)
    spans = [d * (k - 1) + 1 for k, d in zip(kernel, dilation, strict=True)]
    pads: list[int] = []
    for d in reversed(range(dims)):  # F.pad lists the last dimension first
        needed = (out_size[d] - 1) * stride[d] + spans[d]  # ceil_mode may need more than the symmetric padding
        pads += [padding[d], max(0, needed - x.shape[d - dims] - padding[d])]
    if any(pads):
        x = F.pad(x, pads, value=fill)
    first = x.ndim - dims
    for d in range(dims):
        x = x.unfold(first + d, spans[d], stride[d])
    index: tuple[EllipsisType | slice, ...] = (
        ...,
        *(slice(size) for size in out_size),
        *(slice(None, None, d) for d in dilation),
    )
    return x[index]


# The max-pooling functions a forward pass reaches (modules call them too), with their number of spatial dimensions.
_MAX_POOLS: dict[Callable[..., Any], int] = {
    F.max_pool1d: 1,
    F.max_pool2d: 2,
    F.max_pool3d: 3,
    torch.max_pool1d: 1,
    torch.max_pool2d: 2,
    torch.max_pool3d: 3,
    F.max_pool1d_with_indices: 1,
    F.max_pool2d_with_indices: 2,
    F.max_pool3d_with_indices: 3,
}
_MAX_POOL_ARGUMENTS = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")


class _Probe:
    """The affine model of a batch of points, assembled during one forward pass with tangents.

    Its ``add_layer`` is the capture transform of every activation call; ``add_max_pool`` is called by
    :class:`_TraversalOps`. After the pass, ``ahead`` and ``behind`` hold the crossings nearest to each point (as
    offsets along ``t``), ``bits`` the packed patterns of the selected layers and ``prints`` the projections.
    """

    def __init__(
        self, layers: list[LayerInfo], selected: list[int], last: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        self.names = [layer.name for layer in layers]
        self.selected = frozenset(selected)
        self.last = last
        generator = torch.Generator().manual_seed(_PROJECTION_SEED)
        # A fixed random direction per layer: a hidden non-linearity moves the projection almost surely.
        self.projections = [
            torch.randn(layer.num_units, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
            for layer in layers[: last + 1]
        ]
        self.reset(0)

    def reset(self, num_points: int, line: Segments | None = None) -> None:
        """Prepare for a forward pass over ``num_points`` points (on the segments of ``line``)."""
        self.num_points = num_points
        self.line = line  # until the points enter their first affine map
        self.ahead: Tensor | float = math.inf
        self.behind: Tensor | float = -math.inf
        self.bits: list[Tensor] = []
        self.prints: list[Tensor] = []
        self.complete = False
        self.finite = FiniteCheck(self.names)

    def _constrain(self, rate: Tensor) -> None:
        if rate.shape[1] == 0:
            return
        ahead, behind = _crossings(rate)
        self.ahead = torch.minimum(ahead, torch.as_tensor(self.ahead, dtype=ahead.dtype, device=ahead.device))
        self.behind = torch.maximum(behind, torch.as_tensor(self.behind, dtype=behind.dtype, device=behind.device))

    def add_layer(self, position: int, pre_activation: Tensor, rule: ActivationRule) -> None:
        """Capture transform: crossings, bits and projection of one activation call."""
        value, slope = fwAD.unpack_dual(pre_activation)
        check_batch_first(self.names[position], value, self.num_points)
        self.finite.add(value)
        z = value.reshape(self.num_points, -1)
        dz = torch.zeros_like(z) if slope is None else slope.reshape(self.num_points, -1)
        assert rule.kinks is not None  # smooth layers were rejected before the traversal
        for kink in sorted({0.0, *rule.kinks}):  # 0: where the bit flips, kink or not
            self._constrain(dz / (z - kink if kink else z))
        if position in self.selected:
            self.bits.append(pack_words(rule.bits(value).reshape(self.num_points, -1)))
        direction = self.projections[position]
        summary = [
            z @ direction,
            torch.linalg.vector_norm(z, dim=1),
            dz @ direction,
            torch.linalg.vector_norm(dz, dim=1),
        ]
        self.prints.append(torch.stack(summary, dim=1).double())
        # Later max pooling cannot change the measured layers: ignore it.
        self.complete = position == self.last

    def add_max_pool(self, dims: int, arguments: dict[str, Any], output: Tensor | tuple[Tensor, Tensor]) -> None:
        """Crossings of one max-pooling call: where an element of a window would overtake the window's winner."""
        if self.complete:
            return
        value, slope = fwAD.unpack_dual(arguments["input"])
        pooled_value, pooled_slope = fwAD.unpack_dual(output if isinstance(output, Tensor) else output[0])
        if value.ndim != dims + 2 or len(value) != self.num_points:
            raise ValueError(
                f"Exact folding needs batch-first max pooling ([B, C, *spatial]); got an input of shape "
                f"{tuple(value.shape)} for {self.num_points} points."
            )
        if slope is None:
            return  # the input does not move along the segment: no winner changes
        kernel = _as_tuple(arguments["kernel_size"], dims)
        geometry = (
            kernel,
            _as_tuple(arguments.get("stride") or kernel, dims),
            _as_tuple(arguments.get("padding", 0), dims),
            _as_tuple(arguments.get("dilation", 1), dims),
            tuple(pooled_value.shape[-dims:]),
        )
        value_windows = _windows(value, *geometry, fill=-math.inf)  # padding never wins
        slope_windows = _windows(slope, *geometry, fill=0.0)
        winner_slope = torch.zeros_like(pooled_value) if pooled_slope is None else pooled_slope
        for offset in itertools.product(*(range(k) for k in kernel)):  # one kernel position at a time: less memory
            position: tuple[EllipsisType | int, ...] = (..., *offset)
            gap = pooled_value - value_windows[position]
            self._constrain((winner_slope - slope_windows[position]).div_(gap).flatten(1))


# Functions affine in their first argument whose third is a bias: the tangent is the function of the input's tangent
# without the bias. PyTorch's forward-mode formulas for them also run the function on the primal with a zero weight
# tangent (a third of the convolutions' cost).


def _no_tangent(*tensors: Any) -> bool:
    return all(not isinstance(x, Tensor) or fwAD.unpack_dual(x).tangent is None for x in tensors)


# The arguments of F.batch_norm after its input.
_BATCH_NORM_PARAMETERS = ("running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")


def _affine_tangent(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor | None:
    """The tangent of an affine map of the dual input ``args[0]``, computed in one call; ``None`` for other calls."""
    tangent = fwAD.unpack_dual(args[0]).tangent
    if tangent is None:
        return None
    if func in AFFINE_MAPS and _no_tangent(*args[1:], *kwargs.values()):
        return linear_part(func, tangent, args, kwargs)
    if func is F.batch_norm:
        # In eval mode with running statistics batch norm is the affine map ``(x - mean) * weight / std + bias``.
        named = {**dict(zip(_BATCH_NORM_PARAMETERS, args[1:], strict=False)), **kwargs}
        running_var, weight = named.get("running_var"), named.get("weight")
        if named.get("training", False) or running_var is None or not _no_tangent(*named.values()):
            return None
        scale = torch.rsqrt(running_var + named.get("eps", 1e-5))
        if weight is not None:
            scale = scale * weight
        return tangent * scale.view(-1, *([1] * (tangent.ndim - 2)))
    return None


class _TraversalOps(TorchFunctionMode):
    """The forward pass's operations that the traversal handles itself.

    Affine maps (linear layers, convolutions, eval-mode batch norm) get their tangents in one call each, instead of
    PyTorch's forward-mode formulas; every max-pooling call is reported to the probe.
    """

    def __init__(self, probe: _Probe) -> None:
        super().__init__()
        self.probe = probe

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        line = self.probe.line
        if line is not None and func in AFFINE_MAPS and args and _no_tangent(*args[1:], *kwargs.values()):
            primal = fwAD.unpack_dual(args[0]).primal
            if line.hold(primal):
                # The points' first affine map, from the segments' ends: its tangent is the same along each segment.
                self.probe.line = None
                return fwAD.make_dual(*line.affine(func, (primal, *args[1:]), kwargs))
        if args and (func in AFFINE_MAPS or func is F.batch_norm):
            tangent = _affine_tangent(func, args, kwargs)
            if tangent is not None:
                return fwAD.make_dual(func(fwAD.unpack_dual(args[0]).primal, *args[1:], **kwargs), tangent)
        output = func(*args, **kwargs)
        dims = _MAX_POOLS.get(func)
        if dims is not None:
            self.probe.add_max_pool(dims, {**dict(zip(_MAX_POOL_ARGUMENTS, args, strict=False)), **kwargs}, output)
        return output


def _evaluate(
    run: Callable[[Tensor], Any],
    capture: Any,
    probe: _Probe,
    segments: tuple[Tensor, Tensor],
    path: Tensor,
    t: Tensor,
    batch_size: int,
    dtype: torch.dtype,
) -> _Points:
    """Evaluate the points ``(path, t)`` in forward passes of at most ``batch_size`` points."""
    starts, ends = segments
    parts = []
    for begin in range(0, len(t), batch_size):
        chunk_path, chunk_t = path[begin : begin + batch_size], t[begin : begin + batch_size]
        # Interpolated in float64, then cast: as close to the segment as the dtype allows, exact at both ends.
        line = Segments(starts, ends, chunk_t, index=chunk_path, dtype=dtype)
        probe.reset(len(chunk_t), line)
        capture.reset()
        with fwAD.dual_level():
            output = run(fwAD.make_dual(line.points, (ends - starts)[chunk_path].to(dtype)))
            # Non-finite values would also fail the consistency check, with a misleading message: report them first.
            probe.finite.end_pass(fwAD.unpack_dual(output).primal if isinstance(output, Tensor) else output)
            probe.finite.check()
        capture.check_pass()
        parts.append(
            _Points(
                path=chunk_path,
                t=chunk_t,
                ahead=(chunk_t + probe.ahead).clamp(max=1.0),
                behind=(chunk_t + probe.behind).clamp(min=0.0),
                pattern=torch.cat(probe.bits, dim=1),
                prints=torch.stack(probe.prints, dim=1),
            )
        )
    return _Points.cat(parts)


class _Tally:
    """Running range, length and maximal folding of every path, per selected layer, fed points in ``t`` order.

    Args:
        start: Packed start pattern of each path, ``int64 [P, words]`` (``measure.pack_words``).
        widths: Words of each selected layer, in the order they are concatenated.
    """

    def __init__(self, start: Tensor, widths: list[int]) -> None:
        self.start = start
        self.previous = start.clone()
        self.widths = widths
        num_paths, device = len(start), start.device
        self.layer_r1 = torch.zeros(num_paths, len(widths), dtype=torch.int64, device=device)
        self.layer_r2 = torch.zeros_like(self.layer_r1)
        self.layer_chi_max = folding_from_ranges(self.layer_r1, self.layer_r2)  # zeros in the folding dtype
        self.chi_max = folding_from_ranges(self.layer_r1[:, 0], self.layer_r2[:, 0])
        self.r1 = torch.zeros(num_paths, dtype=torch.int64, device=device)
        self.changes = torch.zeros_like(self.r1)

    def add(self, path: Tensor, pattern: Tensor) -> None:
        """Append points (sorted by path, then ``t``, continuing where each path stopped) to their paths."""
        first = torch.ones_like(path, dtype=torch.bool)
        first[1:] = path[1:] != path[:-1]
        # Each point's predecessor is the row before it, or for a path's first row the last point streamed.
        previous = pattern.roll(1, 0)
        previous[first] = self.previous[path[first]]
        changed = popcount(torch.stack([pattern ^ self.start[path], pattern ^ previous]))  # one call for both
        from_start, from_previous = segment_sums(changed, self.widths).unbind(0)  # [points, layers] each
        # Every point's prefix range and length, per layer and over all layers: running values within its path's
        # rows, continued from what the path had before this call.
        segment = first.cumsum(0) - 1
        layer_r1 = torch.maximum(_segment_cummax(from_start, segment), self.layer_r1[path])
        layer_r2 = _segment_cumsum(from_previous, first) + self.layer_r2[path]
        r1 = torch.maximum(_segment_cummax(from_start.sum(1, keepdim=True), segment), self.r1[path, None])
        r2 = layer_r2.sum(1, keepdim=True)
        folding = folding_from_ranges(torch.cat([layer_r1, r1], 1), torch.cat([layer_r2, r2], 1))
        self.layer_chi_max.scatter_reduce_(0, path[:, None].expand_as(layer_r1), folding[:, :-1], "amax")
        self.chi_max.scatter_reduce_(0, path, folding[:, -1], "amax")
        # A path's last row holds its running values.
        last = torch.ones_like(first)
        last[:-1] = first[1:]
        self.layer_r1[path[last]] = layer_r1[last]
        self.layer_r2[path[last]] = layer_r2[last]
        self.r1[path[last]] = r1[last, 0]
        self.changes.index_add_(0, path, (from_previous.sum(1) > 0).long())
        self.previous[path[last]] = pattern[last]


def _segment_cumsum(values: Tensor, first: Tensor) -> Tensor:
    """Running sums down the rows of ``values [n, c]`` that restart at every row where ``first [n]`` is true."""
    running = values.cumsum(0)
    before = (running - values)[first]  # the sum of all rows before each segment
    return running - before.repeat_interleave(_segment_lengths(first), 0)


def _segment_cummax(values: Tensor, segment: Tensor) -> Tensor:
    """Running maxima down the rows of the non-negative ``values [n, c]`` within each segment (``segment [n]``).

    One cummax over all rows: each segment (ascending) is lifted above every value of the segments before it.
    """
    lift = (segment * (int(values.max()) + 1 if len(values) else 1)).unsqueeze(1)
    return (values + lift).cummax(0).values - lift


def _segment_lengths(first: Tensor) -> Tensor:
    starts = first.nonzero().squeeze(1)
    return torch.diff(starts, append=starts.new_tensor([len(first)]))


def _check_consistency(left: _Points, right: _Points, names: list[str], tolerance: float) -> None:
    """Raise if the affine models at the two ends of finished intervals disagree (see the module docstring)."""
    a, b = left.t[:, None], right.t[:, None]
    # Where the two regions meet; any point of [a, b] when both ends claim the same region.
    meet = ((left.ahead + right.behind)[:, None] / 2).clamp(a, b)
    z_a, size_a, dz_a, step_a = left.prints.unbind(-1)
    z_b, size_b, dz_b, step_b = right.prints.unbind(-1)
    mismatch = (z_a + (meet - a) * dz_a - z_b - (meet - b) * dz_b).abs()
    scale = size_a + (meet - a) * step_a + size_b + (b - meet) * step_b
    bad = ~(mismatch <= tolerance * scale)  # NaN is bad
    same_region = (left.ahead[:, None] >= b) & (right.behind[:, None] <= a)
    bad |= same_region & ~((dz_a - dz_b).abs() <= tolerance * (step_a + step_b))
    if bool(bad.any()):
        name = names[int(bad.any(0).nonzero()[0])]
        raise ValueError(
            f"The pre-activation of layer {name!r} is not piecewise linear along the segment with the breakpoints "
            "the traversal knows, so exact folding cannot be computed: an operation before this layer (after the "
            "previous activation) is neither linear nor a supported piecewise-linear one (for example abs, "
            "torch.max, adaptive max pooling, LayerNorm or a smooth function). Use path_folding with a step count."
        )


_NAMED_LAYERS = 5
"""How many smooth layers the error of a network that is not piecewise linear names."""


def _require_piecewise_linear(
    model: nn.Module, run: Callable[[Tensor], Any], sample: Tensor, layers: list[LayerInfo], last: int
) -> None:
    with capture_activations(model, lambda _position, _z, rule: rule, expected=layers) as capture:
        run(sample)
    smooth = [
        f"{layer.name!r} ({layer.activation})"
        for layer, rule in zip(layers[: last + 1], capture.values, strict=False)
        if rule.kinks is None
    ]
    if smooth:
        # A network of many smooth layers (EfficientNet: 65) would make an unreadable message: the first few.
        named = ", ".join(smooth[:_NAMED_LAYERS]) + (
            f" and {len(smooth) - _NAMED_LAYERS} more" if len(smooth) > _NAMED_LAYERS else ""
        )
        raise ValueError(
            f"Exact folding needs a piecewise-linear network up to the last measured layer, but layer(s) "
            f"{named} are smooth (no kinks), which bends every later pre-activation. Use path_folding "
            "with a step count, or measure only layers before them."
        )


def _initial_points(num_paths: int, batch_size: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Both ends of every path and an evenly spread interior (off simple fractions), as ``(path, t)``."""
    interior = max(0, min(_INITIAL_POINTS, batch_size // num_paths) - 2)
    t = torch.cat(
        [
            torch.zeros(1, dtype=torch.float64),
            (torch.arange(interior, dtype=torch.float64) + _SPLIT) / max(interior, 1),
            torch.ones(1, dtype=torch.float64),
        ]
    ).to(device)
    path = torch.arange(num_paths, device=device).repeat_interleave(len(t))
    return path, t.repeat(num_paths)


def _pending_through(path: Tensor, pending: Tensor) -> Tensor:
    """For each point, how many pending intervals of its path start at or before it."""
    starts_here = torch.cat([pending, pending.new_zeros(1)]).long()
    through = starts_here.cumsum(0)
    first = torch.ones_like(path, dtype=torch.bool)
    first[1:] = path[1:] != path[:-1]
    indices = torch.arange(len(path), device=path.device)
    first_row = torch.where(first, indices, torch.zeros_like(indices)).cummax(0).values
    return through - (through[first_row] - starts_here[first_row])


def exact_folding(
    model: nn.Module,
    starts: Tensor,
    ends: Tensor,
    layers: list[LayerInfo],
    selected: list[int],
    batch_size: int,
    forward: Callable[[Tensor], Any] | None = None,
) -> FoldingResult:
    """Exact folding of each segment ``starts[p] -> ends[p]`` of a piecewise-linear network.

    The result is the limit of :func:`~lightning_spacefold.path_folding` as ``steps`` grows (see the module
    docstring for the algorithm, what is supported and the tolerances). Runs in eval mode without gradients (forward
    -mode AD is unaffected); training flags are restored and hooks removed afterwards, also on errors.

    Args:
        model: The network; it must take a batch ``[B, *input_shape]``. A ``torch.compile``'d model is traversed
            through the module it wraps.
        starts: Start of each path, ``[P, *input_shape]``, floating point, finite.
        ends: End of each path, same shape, dtype and device as ``starts``.
        layers: All activation layers of the model in forward order (:func:`~lightning_spacefold.find_layers`).
        selected: Indices into ``layers`` of the layers to measure (non-empty, ascending).
        batch_size: Points per forward pass.
        forward: The function that maps a batch of points to outputs; ``model`` itself by default.

    Returns:
        A :class:`~lightning_spacefold.FoldingResult` with ``steps=None``, ``distances=None`` and ``regions``: the
        number of pieces with a constant pattern (of the selected layers) along each path, counting the start and
        each return to an earlier pattern; 1 when the pattern never changes.

    Raises:
        ValueError: If a layer at or before the last selected one is smooth, an operation breaks piecewise
            linearity (naming the first affected layer), or the model runs different layers on different batches.
        NonFiniteError: If a pre-activation up to the last selected layer, or the output, is NaN or infinite.
    """
    selected = sorted(selected)
    last = selected[-1]
    time_tolerance = TIME_TOLERANCE.get(starts.dtype, TIME_TOLERANCE[torch.float16])
    consistency_tolerance = CONSISTENCY_TOLERANCE.get(starts.dtype, CONSISTENCY_TOLERANCE[torch.float16])
    device = starts.device
    segments = (starts.double(), ends.double())
    widths = [math.ceil(layers[index].num_units / 64) for index in selected]
    names = [layer.name for layer in layers[: last + 1]]

    wrapped = getattr(model, "_orig_mod", None)
    if forward is None and isinstance(wrapped, nn.Module):
        # Forward-mode AD does not run through a torch.compile'd module: traverse the module it wraps (same names).
        model = wrapped
    run = model if forward is None else forward
    keep_heap(device)
    with evaluation_mode(model):
        _require_piecewise_linear(model, run, starts[:1], layers, last)
        probe = _Probe(layers, selected, last, device, starts.dtype)
        measured = frozenset(range(last + 1))  # later layers cannot change the result
        with (
            capture_activations(
                model, probe.add_layer, measured, has_functional_layers(layers), expected=layers
            ) as capture,
            _TraversalOps(probe),
        ):

            def evaluate(path: Tensor, t: Tensor) -> _Points:
                return _evaluate(run, capture, probe, segments, path, t, batch_size, starts.dtype)

            points = evaluate(*_initial_points(len(starts), batch_size, device))
            tally = _Tally(points.pattern[points.t == 0], widths)
            while True:
                same_path = points.path[1:] == points.path[:-1]
                pending = same_path & (points.behind[1:] - points.ahead[:-1] > time_tolerance)
                through = _pending_through(points.path, pending)
                # Points with nothing pending before them are final: check their intervals, stream and drop them.
                finished = through == 0
                left = (finished[:-1] & same_path).nonzero().squeeze(1)
                _check_consistency(points.take(left), points.take(left + 1), names, consistency_tolerance)
                tally.add(points.path[finished], points.pattern[finished])
                kept = ~finished
                if not bool(kept.any()):
                    break
                points, through = points.take(kept), through[kept]
                left = torch.cat([pending, pending.new_zeros(1)])[kept][:-1].nonzero().squeeze(1)
                # The leftmost pending intervals of every path first, as many as one forward pass takes.
                order = torch.argsort((through[left] - 1) * len(starts) + points.path[left])
                chosen = left[order[:batch_size]].sort().values
                gap_start, gap_end = points.ahead[chosen], points.behind[chosen + 1]
                new = evaluate(points.path[chosen], gap_start + _SPLIT * (gap_end - gap_start))
                points = points.insert(chosen, new)

    layer_r1, layer_r2 = tally.layer_r1, tally.layer_r2
    r2 = layer_r2.sum(-1)
    return FoldingResult(
        chi=folding_from_ranges(tally.r1, r2),
        r1=tally.r1,
        r2=r2,
        layer_chi=folding_from_ranges(layer_r1, layer_r2),
        layer_r1=layer_r1,
        layer_r2=layer_r2,
        layer_names=[layers[index].name for index in selected],
        steps=None,
        chi_max=tally.chi_max,
        layer_chi_max=tally.layer_chi_max,
        regions=tally.changes + 1,
    )
