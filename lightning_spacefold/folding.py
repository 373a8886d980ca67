"""Folding of a network along straight segments: :func:`path_folding`.

Every point of every path goes through the model in large batches. Memory does not grow with the number of
steps: each path is streamed in chunks of consecutive points, and per path only the packed start and previous
patterns and each layer's running range and length are kept.
"""

from __future__ import annotations

import functools
import itertools
import math
import weakref
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import ExitStack
from typing import Any, NamedTuple, TypeVar

import torch
from torch import Tensor, nn

from lightning_spacefold.capture import (
    ActivationRule,
    LayerInfo,
    LayersChangedError,
    activation_modules,
    capture_activations,
    check_batch_first,
    check_forward,
    evaluation_mode,
    find_layers,
    has_functional_layers,
)
from lightning_spacefold.checks import is_int
from lightning_spacefold.compiled import compiled_step
from lightning_spacefold.exact import exact_folding
from lightning_spacefold.finite import FiniteCheck, finite_sum
from lightning_spacefold.heap import keep_heap
from lightning_spacefold.line import LineShortcut, segment_points
from lightning_spacefold.measure import folding_from_ranges, pack_words, popcount, prefix_folding, segment_sums
from lightning_spacefold.result import FoldingResult

__all__ = [
    "check_path_arguments",
    "default_batch_size",
    "discover_layers",
    "path_folding",
    "path_patterns",
    "segment_points",
    "select_layers",
    "with_known_layers",
]

MIN_BATCH_SIZE = 64
MAX_BATCH_SIZE = 8192
CPU_BATCH_BYTES = 8 * 2**20
"""The largest activation (or input) of a forward pass on CPU, at most. Passes of 16 MiB ran the benchmark MLP's matrix
products 30% slower and raised the peak memory by tens of MiB; passes of 4 MiB cut small-input CNNs (ResNet-18 at
32x32) into passes of one path, 1.3x slower."""
COMPILED_BATCH_BYTES = 16 * 2**20
"""The same with ``compile=True`` on CPU: a compiled pass fuses its elementwise passes into the forward, and each call
checks the compiled code's guards, which cost ResNet-18 at 32x32 1.15x its eager time in passes of 8 MiB."""
ACCELERATOR_BATCH_BYTES = 512 * 2**20
"""The same on accelerators."""
WEIGHT_REUSE_LIMIT = 4
"""A pass grows past its budget, up to this many times it, until its largest activation holds as many bytes as the
model's largest parameter: every pass reads every weight once, and in passes of 33 points VGG-11's 411 MB classifier
weight made its measurement 1.15x its plain forward (two passes of 66: 1.02x)."""
WALK_WORDS = 2**14
"""Packed words (of all measured layers, over all points) a chunk of the walk holds at most, unless one forward pass
holds more: 128 KiB, and about seven times that in the chunk's temporaries."""


T = TypeVar("T")

Forward = Callable[[Tensor], Any]
"""A function that maps a batch of path points to the network's outputs, with the model's layers inside."""


def discover_layers(
    model: nn.Module, starts: Tensor, ends: Tensor, forward: Forward | None = None, *, reuse: bool = False
) -> list[LayerInfo]:
    """The model's activation layers, found on the first path's two ends.

    Two inputs rather than one: layers that normalise with the statistics of the batch (BatchNorm without running
    statistics) fail on a batch of one.

    Args:
        model: The network.
        starts: Path starts ``[P, *input_shape]``.
        ends: Path ends, same shape.
        forward: As in :func:`path_folding`.
        reuse: Return the layers found last time for this model, ``forward`` and inputs of this shape, dtype and
            device without running it (a forward pass on two points costs up to a quarter of a measurement); use it
            through :func:`with_known_layers`, which checks them.

    Raises:
        ValueError: If the forward pass runs no supported activation (naming the model's activation modules when
            ``forward`` ran none of them).
    """
    key = inputs_key(starts, forward)
    if reuse:
        known = _KNOWN_LAYERS.get(model)
        if known is not None and known[0] == key:
            return known[1]
    _KNOWN_LAYERS.pop(model, None)  # a discovery that fails leaves nothing behind
    found = find_layers(model, torch.cat([starts[:1], ends[:1]]), forward)
    if not found:
        raise _no_layers_error(model, forward)
    _KNOWN_LAYERS[model] = (key, found)
    return found


def inputs_key(starts: Tensor, forward: Forward | None) -> Hashable:
    """What decides, besides the model, which layers a forward pass runs and how it uses its points.

    The inputs' shape, dtype and device and the ``forward`` function: the key of the layers found
    (:func:`discover_layers`) and of what :class:`~lightning_spacefold.line.LineShortcut` learnt of the points.
    """
    return starts.shape[1:], starts.dtype, starts.device, _identity(forward)


def _identity(forward: Forward | None) -> Hashable:
    """What tells one ``forward`` from another without keeping it (or, through a bound method, the model) alive."""
    if forward is None:
        return None
    return id(getattr(forward, "__self__", None)), id(getattr(forward, "__func__", forward))


def _no_layers_error(model: nn.Module, forward: Forward | None) -> ValueError:
    activations = activation_modules(model)
    if forward is not None and activations:
        return ValueError(
            f"`forward` ran none of the model's activation layers (the model has {', '.join(activations[:5])}"
            f"{', ...' if len(activations) > 5 else ''}). `forward` must run the model on the points it is given "
            "and return its output, e.g. `forward=lambda points: model(inputs_embeds=points).logits`."
        )
    found = sorted({type(module).__name__ for module in model.modules()})
    return ValueError(
        f"No supported activation found in the model (its modules: {', '.join(found)}). Folding is measured on "
        "activation layers: use a supported activation (ReLU, GELU, Tanh, ...) or register a custom one with "
        "lightning_spacefold.register_activation(MyActivation)."
    )


_KNOWN_LAYERS: weakref.WeakKeyDictionary[nn.Module, tuple[Hashable, list[LayerInfo]]] = weakref.WeakKeyDictionary()
"""The layers :func:`discover_layers` found last, per model (weakly: forgotten with the model)."""


def with_known_layers(
    measure: Callable[[list[LayerInfo]], T], model: nn.Module, starts: Tensor, ends: Tensor, forward: Forward | None
) -> T:
    """``measure(layers)`` with the model's activation layers, found once and reused by later measurements.

    ``measure`` must run its forward passes with ``capture_activations(..., expected=layers)``. When they run other
    layers (a module was replaced since the layers were found), the layers are found again and ``measure`` runs once
    more; a second mismatch is data-dependent control flow, and its ``LayersChangedError`` propagates.
    """
    try:
        return measure(discover_layers(model, starts, ends, forward, reuse=True))
    except LayersChangedError:
        return measure(discover_layers(model, starts, ends, forward))


class _Walk:
    """Running range, length and maximal folding of a group of paths, per layer, fed one chunk of points at a time.

    A chunk is ``G`` paths by ``K`` consecutive points, run through the model in one or more forward passes. Each
    layer's bits are packed into 64-bit words inside its activation hook and written into the chunk's block of
    words, so no layer's bits outlive its call; the distances of all layers are counted together when the chunk
    ends. Between chunks only the packed start and previous patterns of each path are kept. The sums of each
    layer's pre-activations and of the output are kept for one finiteness check at the end
    (:mod:`~lightning_spacefold.finite`).

    One walk serves all the groups of a measurement (:meth:`begin_group`): every tensor that outlives a chunk is
    allocated once, for all paths, and updated in place. Small tensors allocated among a chunk's large temporaries
    and kept past them fragment the CPU allocator's heap: the resident memory grew by gigabytes over many groups.
    """

    def __init__(
        self,
        names: list[str],
        widths: list[int],
        num_paths: int,
        chunk_shape: tuple[int, int],
        device: torch.device,
        finite: FiniteCheck,
        num_points: int | None = None,
    ) -> None:
        self.names, self.widths = names, widths
        self.offsets = [0, *itertools.accumulate(widths)]  # each layer's first word
        self.num_paths = 0  # of the current group
        self.rows = slice(0, 0)  # the current group's paths
        self.chunk = slice(0, 0)  # the current chunk's points
        self.block = (slice(0, 0), slice(0, 0))  # the current pass's paths and points within the chunk
        # Per path, each layer and then the whole network (the last column): range, length and maximal folding.
        self.ranges = torch.zeros(num_paths, len(names) + 1, dtype=torch.int64, device=device)
        self.lengths = torch.zeros_like(self.ranges)
        self.maxima = folding_from_ranges(self.ranges, self.lengths)  # zeros in the folding dtype
        num_words = self.offsets[-1]
        self.buffer = torch.zeros(*chunk_shape, num_words, dtype=torch.int64, device=device)
        self.words = self.buffer  # this chunk's packed patterns, [G, K, words]
        self.start = torch.zeros(chunk_shape[0], num_words, dtype=torch.int64, device=device)  # the group's starts
        self.previous = torch.zeros_like(self.start)
        self.opens = True  # the next chunk opens the group's paths
        self.finite = finite
        # With ``num_points``, every point's distance from its path's start and length walked, [P, num_points] each,
        # written chunk by chunk.
        self.distances = self.walked = None
        if num_points is not None:
            self.distances = torch.zeros(num_paths, num_points, dtype=torch.int64, device=device)
            self.walked = torch.zeros_like(self.distances)

    def begin_group(self, rows: slice, num_paths: int) -> None:
        """Walk the paths ``rows`` (``num_paths`` of them) from their start."""
        self.rows, self.num_paths, self.opens = rows, num_paths, True

    def begin_chunk(self, chunk: slice) -> None:
        """Take the points ``chunk`` (within bounds) of the group's paths."""
        self.chunk = chunk
        self.words = self.buffer[: self.num_paths, : chunk.stop - chunk.start]

    def begin_pass(self, paths: slice, points: slice) -> None:
        """Run the chunk's paths ``paths`` at its points ``points`` (both within bounds) in the next forward pass."""
        self.block = (paths, points)

    def add_layer(self, position: int, pre_activation: Tensor, rule: ActivationRule) -> None:
        paths, points = self.block
        check_batch_first(
            self.names[position], pre_activation, (paths.stop - paths.start) * (points.stop - points.start)
        )
        self.finite.add(pre_activation)
        self.add_words(position, pack_words(rule.bits(pre_activation).reshape(len(pre_activation), -1)))

    def add_words(self, position: int, words: Tensor) -> None:
        """Write one layer's packed words ``[pass points, words]`` into the chunk's block."""
        paths, points = self.block
        block = self.words[paths, points, self.offsets[position] : self.offsets[position + 1]]
        block.copy_(words.reshape(block.shape))

    def end_chunk(self) -> None:
        """Close the chunk: update the running values (and the points' distances and lengths walked)."""
        words = self.words
        start, previous = self.start[: self.num_paths], self.previous[: self.num_paths]
        if self.opens:
            start.copy_(words[:, 0])
            previous.copy_(words[:, 0])  # the first point adds 0 to the length
            self.opens = False
        # What changed from the start and from the point before, written side by side for one count of both.
        changed = words.new_empty(2, *words.shape)
        torch.bitwise_xor(words, start.unsqueeze(1), out=changed[0])
        torch.bitwise_xor(words[:, 1:], words[:, :-1], out=changed[1, :, 1:])
        torch.bitwise_xor(words[:, 0], previous, out=changed[1, :, 0])
        previous.copy_(words[:, -1])
        # [2, G, layers + 1, K]: the distances of each layer's bits along the chunk and of all bits together (the last
        # row), points last for the prefix values.
        from_start, from_previous = segment_sums(popcount(changed), self.widths, total=True).transpose(-1, -2)
        ranges, lengths, maxima = self.ranges[self.rows], self.lengths[self.rows], self.maxima[self.rows]
        torch.maximum(maxima, prefix_folding(from_start, from_previous, ranges, lengths).amax(-1), out=maxima)
        if self.distances is not None and self.walked is not None:
            self.distances[self.rows, self.chunk] = from_start[:, -1]
            self.walked[self.rows, self.chunk] = from_previous[:, -1].cumsum(-1) + lengths[:, -1:]
        torch.maximum(ranges, from_start.amax(-1), out=ranges)
        lengths += from_previous.sum(-1)


def default_batch_size(
    layers: list[LayerInfo], inputs: Tensor, compiled: bool = False, model: nn.Module | None = None
) -> int:
    """Points per forward pass such that the largest activation of a batch stays within a cache-friendly budget.

    The budget is 8 MiB on CPU (:data:`CPU_BATCH_BYTES`: larger batches run slower there and take more memory), 16 MiB
    for compiled passes on CPU (:data:`COMPILED_BATCH_BYTES`) and 512 MiB on accelerators. Every pass reads all the
    model's weights, so where its largest parameter is larger than that, the largest activation may grow to its size,
    up to :data:`WEIGHT_REUSE_LIMIT` times the budget. The result lies between 64 and 8192 points.

    Args:
        layers: The model's activation layers (:func:`~lightning_spacefold.find_layers`).
        inputs: Example inputs ``[B, *input_shape]`` on the device and in the dtype of the measurement.
        compiled: Whether the passes run compiled (``compile=True``).
        model: The model, whose largest parameter sets the budget's growth; ``None`` for the budget alone.

    Returns:
        The number of points per forward pass.
    """
    per_point = max([inputs[0].numel(), *(layer.num_units for layer in layers)]) * inputs.element_size()
    if inputs.device.type != "cpu":
        budget = ACCELERATOR_BATCH_BYTES
    else:
        budget = COMPILED_BATCH_BYTES if compiled else CPU_BATCH_BYTES
    if model is not None:
        largest = max((weight.numel() * weight.element_size() for weight in model.parameters()), default=0)
        budget = max(budget, min(largest, WEIGHT_REUSE_LIMIT * budget))
    return int(min(MAX_BATCH_SIZE, max(MIN_BATCH_SIZE, budget // per_point)))


def path_folding(
    model: nn.Module,
    starts: Tensor,
    ends: Tensor,
    *,
    steps: int = 64,
    layers: Sequence[str] | None = None,
    batch_size: int | None = None,
    return_distances: bool = False,
    exact: bool = False,
    forward: Forward | None = None,
    compile: bool = False,
) -> FoldingResult:
    """Measure how the network folds each segment from ``starts[p]`` to ``ends[p]``.

    The segment is sampled at ``t_i = i / steps`` (both ends included); each point's activation pattern is the
    concatenation of the selected layers' bits; ``chi = 1 - r1 / r2`` (specification, section 2). The model runs in
    eval mode without gradients; every module's training flag is restored and every hook removed afterwards,
    also when the forward raises. Call it under ``torch.autocast`` to measure the mixed-precision network.

    Args:
        model: The network; it must take a batch ``[B, *input_shape]`` (or ``forward`` does).
        starts: Start of each path, ``[P, *input_shape]``, floating point.
        ends: End of each path, same shape, dtype and device as ``starts``.
        steps: Number of segments per path; ``steps + 1`` points are evaluated.
        layers: Names of the layers to measure (see :func:`~lightning_spacefold.find_layers`); ``None`` for all.
        batch_size: Points per forward pass; by default chosen from the model's largest activation (see
            :func:`default_batch_size`). Memory grows with it, not with ``steps``.
        return_distances: Also return the Hamming distance from the start and the length walked to every point,
            ``[P, steps + 1]`` each (``distances`` and ``walked``).
        exact: Traverse the exact sequence of activation regions along each segment instead of sampling
            ``steps + 1`` points (piecewise-linear networks; see :mod:`lightning_spacefold.exact`). ``chi`` is then
            the limit of dense sampling, ``steps`` is ignored and the result has ``regions``, the number of pieces
            with a constant pattern along each path. It runs without autocast, in the model's own dtype.
        forward: The function that maps a batch of points to outputs, for paths in a space that the model does not
            take directly: e.g. ``lambda points: model(inputs_embeds=points).logits`` for paths between the
            embeddings of two token sequences. The layers are still found in ``model``. ``model`` itself by default.
        compile: Fuse each forward pass with the bits, their packing and the finiteness sums by ``torch.compile``
            (see :mod:`lightning_spacefold.compiled`): compiled once per model, forward, layers, input shape, batch
            size, dtype, device and autocast state, and reused by later calls. The same results; the first call
            pays for the compilation (seconds to a minute). Models with functional activations, or whose
            compilation fails, are measured eagerly with one warning. Not with ``exact``.

    Returns:
        A :class:`FoldingResult` on the inputs' device.

    Raises:
        TypeError: If the model or the inputs have the wrong type, or ``forward`` is not callable.
        ValueError: For inputs of different shapes, empty, non-finite, ``steps < 1``, ``batch_size < 1``, a model
            with no supported activation, an unknown layer name, ``return_distances`` with ``exact``, or with
            ``exact`` a model that is not piecewise linear (naming the layer), ``compile`` with ``exact``.
        NonFiniteError: A ``ValueError`` raised when a pre-activation of a measured layer, or the model's output, is
            NaN or infinite (a diverged or overflowed network), naming the first such layer.

    Examples:
        A ReLU network of one input with the units ``a = relu(x)``, ``b = relu(x - 1)`` and then
        ``c = relu(a - 2 b - 0.5)``. From ``x = 0.25`` to ``1.75``, ``c`` switches on at 0.5, ``b`` at 1 and ``c``
        off again at 1.5: the patterns ``(a, b, c)`` are 100, 101, 111, 110, at Hamming distances 0, 1, 2, 1 from
        the start, so ``r1 = 2``, ``r2 = 3`` and ``chi = 1 - 2/3``.

        >>> import torch
        >>> from torch import nn
        >>> from lightning_spacefold import path_folding
        >>> model = nn.Sequential(nn.Linear(1, 2), nn.ReLU(), nn.Linear(2, 1), nn.ReLU())
        >>> # a = relu(x), b = relu(x - 1), then c = relu(a - 2 b - 0.5): on when 0.5 < x < 1.5
        >>> nn.utils.vector_to_parameters(torch.tensor([1.0, 1.0, 0.0, -1.0, 1.0, -2.0, -0.5]), model.parameters())
        >>> starts, ends = torch.tensor([[0.25]]), torch.tensor([[1.75]])
        >>> result = path_folding(model, starts, ends, steps=3)  # x = 0.25, 0.75, 1.25, 1.75
        >>> result.r1, result.r2, result.chi
        (tensor([2]), tensor([3]), tensor([0.3333]))

        Per layer: the first ReLU's bits ``(a, b)`` switch once each (``chi = 0``); ``c`` goes on and off
        (``r1 = 1``, ``r2 = 2``).

        >>> result.layer_names, result.layer_chi
        (['1', '3'], tensor([[0.0000, 0.5000]]))

        Two points (``steps=1``) miss the way back; the exact traversal finds all four regions.

        >>> path_folding(model, starts, ends, steps=1).chi
        tensor([0.])
        >>> exact = path_folding(model, starts, ends, exact=True)
        >>> exact.chi, exact.regions
        (tensor([0.3333]), tensor([4]))
    """
    check_path_arguments(model, starts, ends, steps, batch_size, forward)
    if not isinstance(compile, bool):
        raise TypeError(f"`compile` must be a bool, got {compile!r}.")
    if exact:
        if compile:
            raise ValueError("`compile=True` fuses sampled forward passes; it cannot be combined with `exact=True`.")
        if return_distances:
            raise ValueError("`return_distances` needs sampled points; it cannot be combined with `exact=True`.")
        measure = functools.partial(_exact_folding, model, starts, ends, layers, batch_size, forward)
    else:
        measure = functools.partial(
            _sampled_folding, model, starts, ends, steps, layers, batch_size, return_distances, forward, compile
        )
    return with_known_layers(measure, model, starts, ends, forward)


def _exact_folding(
    model: nn.Module,
    starts: Tensor,
    ends: Tensor,
    layers: Sequence[str] | None,
    batch_size: int | None,
    forward: Forward | None,
    found: list[LayerInfo],
) -> FoldingResult:
    selected = select_layers([layer.name for layer in found], layers)
    # Crossing times need the model's own precision: bfloat16 breaks the affine models of the traversal.
    with torch.autocast(starts.device.type, enabled=False):
        return exact_folding(
            model, starts, ends, found, selected, batch_size or default_batch_size(found, starts, model=model), forward
        )


def _sampled_folding(
    model: nn.Module,
    starts: Tensor,
    ends: Tensor,
    steps: int,
    layers: Sequence[str] | None,
    batch_size: int | None,
    return_distances: bool,
    forward: Forward | None,
    compile: bool,
    found: list[LayerInfo],
) -> FoldingResult:
    selected = select_layers([layer.name for layer in found], layers)
    names = [found[index].name for index in selected]
    num_paths, num_points = len(starts), steps + 1
    widths = [math.ceil(found[index].num_units / 64) for index in selected]
    batch_size = default_batch_size(found, starts, compile, model) if batch_size is None else batch_size
    group_size, chunk_size, pass_paths, pass_points = walk_layout(num_paths, num_points, batch_size, sum(widths))
    t = torch.arange(num_points, dtype=torch.float64, device=starts.device) / steps
    run = model if forward is None else forward
    finite = FiniteCheck(names)
    walk = _Walk(
        names,
        widths,
        num_paths,
        (group_size, chunk_size),
        starts.device,
        finite,
        num_points if return_distances else None,
    )
    keep_heap(starts.device)
    with evaluation_mode(model), ExitStack() as eager:
        shape = (pass_paths, pass_points)
        step = (
            compiled_step(model, run, _identity(forward), found, selected, starts, ends, t, shape) if compile else None
        )
        if step is None:
            values = pass_paths * pass_points * starts[0].numel()
            line = eager.enter_context(LineShortcut(model, inputs_key(starts, forward), values))
            capture = eager.enter_context(
                capture_activations(
                    model,
                    line.unwatched(walk.add_layer),
                    frozenset(selected),
                    has_functional_layers(found),
                    expected=found,
                )
            )
        for first in range(0, num_paths, group_size):
            group = slice(first, min(first + group_size, num_paths))
            walk.begin_group(group, group.stop - group.start)
            for begin in range(0, num_points, chunk_size):
                chunk = slice(begin, min(begin + chunk_size, num_points))
                walk.begin_chunk(chunk)
                group_starts, group_ends, chunk_t = starts[group], ends[group], t[chunk]
                for paths, points in walk_passes(len(group_starts), len(chunk_t), pass_paths, pass_points):
                    walk.begin_pass(paths, points)
                    if step is None:
                        capture.reset()
                        output = line.run(run, group_starts[paths], group_ends[paths], chunk_t[points])
                        capture.check_pass()
                    else:
                        output, layer_words = step(
                            model, run, group_starts[paths], group_ends[paths], chunk_t[points], finite
                        )
                        for position, words in enumerate(layer_words):
                            walk.add_words(position, words)
                    finite.end_pass(output)
                walk.end_chunk()
    finite.check()

    # Each its own tensor: results are handed out and may be changed in place.
    layer_r1, layer_r2, r1, r2 = (
        x.contiguous() for x in (walk.ranges[:, :-1], walk.lengths[:, :-1], walk.ranges[:, -1], walk.lengths[:, -1])
    )
    return FoldingResult(
        chi=folding_from_ranges(r1, r2),
        r1=r1,
        r2=r2,
        layer_chi=folding_from_ranges(layer_r1, layer_r2),
        layer_r1=layer_r1,
        layer_r2=layer_r2,
        layer_names=names,
        steps=steps,
        chi_max=walk.maxima[:, -1].contiguous(),
        layer_chi_max=walk.maxima[:, :-1].contiguous(),
        distances=walk.distances,
        walked=walk.walked,
    )


def path_patterns(
    model: nn.Module,
    starts: Tensor,
    ends: Tensor,
    *,
    steps: int = 64,
    layers: Sequence[str] | None = None,
    forward: Forward | None = None,
    compile: bool = False,
) -> Tensor:
    """The activation patterns themselves at the ``steps + 1`` points of each segment, in one forward pass.

    For analyses that need the whole walk (``interaction_profile``, the folding of every prefix, ...). Unlike
    :func:`path_folding` it keeps every pattern: memory grows with ``P * (steps + 1) * M``.

    Args:
        model: The network; it must take a batch ``[B, *input_shape]``.
        starts: Start of each path, ``[P, *input_shape]``, floating point.
        ends: End of each path, same shape, dtype and device as ``starts``.
        steps: Number of segments per path, at the same ``t_i = i / steps`` as :func:`path_folding`.
        layers: Names of the layers whose bits to concatenate (forward order); ``None`` for all.
        forward: The function that maps a batch of points to outputs (see :func:`path_folding`); ``model`` by
            default.
        compile: Fuse the forward pass with the bits by ``torch.compile``, as in :func:`path_folding`: compiled once
            per model and shape, reused by later calls of the same shape.

    Returns:
        Boolean patterns ``[P, steps + 1, M]`` (M: units of the selected layers).

    Raises:
        TypeError: If the model or the inputs have the wrong type.
        ValueError: As :func:`path_folding`.

    Examples:
        The network and segment of :func:`path_folding`'s example; the patterns ``(a, b, c)`` at its four points:

        >>> import torch
        >>> from torch import nn
        >>> from lightning_spacefold import fold_measure, path_patterns
        >>> model = nn.Sequential(nn.Linear(1, 2), nn.ReLU(), nn.Linear(2, 1), nn.ReLU())
        >>> # a = relu(x), b = relu(x - 1), then c = relu(a - 2 b - 0.5): on when 0.5 < x < 1.5
        >>> nn.utils.vector_to_parameters(torch.tensor([1.0, 1.0, 0.0, -1.0, 1.0, -2.0, -0.5]), model.parameters())
        >>> starts, ends = torch.tensor([[0.25]]), torch.tensor([[1.75]])
        >>> patterns = path_patterns(model, starts, ends, steps=3)
        >>> patterns.int()
        tensor([[[1, 0, 0],
                 [1, 0, 1],
                 [1, 1, 1],
                 [1, 1, 0]]], dtype=torch.int32)
        >>> fold_measure(patterns)
        tensor([0.3333])
    """
    check_path_arguments(model, starts, ends, steps, None, forward)
    if not isinstance(compile, bool):
        raise TypeError(f"`compile` must be a bool, got {compile!r}.")
    found = discover_layers(model, starts, ends, forward)
    selected = select_layers([layer.name for layer in found], layers)
    t = torch.arange(steps + 1, dtype=torch.float64, device=starts.device) / steps
    finite = FiniteCheck([found[index].name for index in selected])

    def bits(_position: int, pre_activation: Tensor, rule: ActivationRule) -> Tensor:
        finite.add(pre_activation)
        return rule.bits(pre_activation).flatten(1)

    run = model if forward is None else forward
    keep_heap(starts.device)
    with evaluation_mode(model):
        shape = (len(starts), steps + 1)
        step = (
            compiled_step(model, run, _identity(forward), found, selected, starts, ends, t, shape, True)
            if compile
            else None
        )
        if step is not None:
            output, patterns = step(model, run, starts, ends, t, finite)
        else:
            values = len(starts) * (steps + 1) * starts[0].numel()
            with (
                LineShortcut(model, inputs_key(starts, forward), values) as line,
                capture_activations(
                    model, line.unwatched(bits), frozenset(selected), has_functional_layers(found)
                ) as capture,
            ):
                output = line.run(run, starts, ends, t)
            patterns = torch.cat(capture.values, dim=1)
    finite.end_pass(output)
    finite.check()
    return patterns.unflatten(0, shape)


class WalkLayout(NamedTuple):
    """How :func:`path_folding` cuts its paths: chunks of the walk and the forward passes within them."""

    group_size: int
    """Paths walked together."""
    chunk_size: int
    """Consecutive points of those paths counted together (a chunk)."""
    pass_paths: int
    """Paths of the chunk in one forward pass."""
    pass_points: int
    """Points of each of those paths in one forward pass."""


def walk_layout(num_paths: int, num_points: int, batch_size: int, num_words: int) -> WalkLayout:
    """The chunks and forward passes of a walk of ``num_paths`` paths of ``num_points`` points.

    A chunk holds several forward passes of ``batch_size`` points where its packed words are few (at most
    :data:`WALK_WORDS`): counting a chunk costs the same few dozen operations whatever its size.

    Args:
        num_paths: Paths.
        num_points: Points per path.
        batch_size: Points per forward pass, at most.
        num_words: Packed words per point (all measured layers).
    """
    chunk_points = max(batch_size, WALK_WORDS // num_words)
    group_size = _balanced(num_paths, max(1, chunk_points // min(num_points, chunk_points)))
    chunk_size = _balanced(num_points, max(1, chunk_points // group_size))
    # Each forward pass: whole paths of the chunk, or a run of one path's points.
    pass_paths = _balanced(group_size, max(1, batch_size // chunk_size))
    pass_points = chunk_size if pass_paths > 1 else _balanced(chunk_size, batch_size)
    return WalkLayout(group_size, chunk_size, pass_paths, pass_points)


def walk_passes(num_paths: int, num_points: int, paths: int, points: int) -> Iterator[tuple[slice, slice]]:
    """The forward passes of a chunk: blocks of at most ``paths`` of its paths by ``points`` of its points."""
    for first in range(0, num_paths, paths):
        for begin in range(0, num_points, points):
            yield slice(first, min(first + paths, num_paths)), slice(begin, min(begin + points, num_points))


def _balanced(total: int, most: int) -> int:
    """Largest part size when ``total`` is cut into as few parts of at most ``most`` as possible, evenly."""
    return math.ceil(total / math.ceil(total / most))


def check_path_arguments(
    model: nn.Module, starts: Tensor, ends: Tensor, steps: int, batch_size: int | None, forward: Forward | None = None
) -> None:
    """Raise a clear TypeError/ValueError for a bad model, ``forward``, segment ends, ``steps`` or ``batch_size``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    check_forward(forward)
    for name, value in (("starts", starts), ("ends", ends)):
        if not isinstance(value, Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor of shape [P, *input_shape], got {type(value).__name__}.")
        if not value.is_floating_point():
            raise TypeError(f"`{name}` must be floating point (segments are interpolated), got {value.dtype}.")
    if starts.shape != ends.shape or starts.dtype != ends.dtype or starts.device != ends.device:
        raise ValueError(
            "`starts` and `ends` must have the same shape, dtype and device, got "
            f"{tuple(starts.shape)} {starts.dtype} {starts.device} and {tuple(ends.shape)} {ends.dtype} {ends.device}."
        )
    if starts.ndim < 1 or len(starts) == 0:
        raise ValueError(
            f"`starts` and `ends` must hold at least one path ([P, *input_shape], P >= 1), got {tuple(starts.shape)}."
        )
    # One sum per tensor first (finite in all but absurd cases); the element-wise test only to confirm.
    if not all(bool(torch.isfinite(finite_sum(x))) or bool(torch.isfinite(x).all()) for x in (starts, ends)):
        raise ValueError(
            "`starts` and `ends` must be finite; found NaN or infinity. Clean the inputs before measuring."
        )
    if not is_int(steps, 1):
        raise ValueError(f"`steps` must be an integer >= 1 (segments per path), got {steps!r}.")
    if batch_size is not None and not is_int(batch_size, 1):
        raise ValueError(f"`batch_size` must be None or an integer >= 1 (points per forward pass), got {batch_size!r}.")


def select_layers(available: list[str], layers: Sequence[str] | None) -> list[int]:
    """Indices of the requested layers among the available ones, in forward order, with clear errors.

    Args:
        available: Names of the model's activation layers, in forward order.
        layers: Requested names, or ``None`` for all.

    Returns:
        Indices into ``available``.

    Raises:
        TypeError: If ``layers`` is not a sequence of names.
        ValueError: If ``layers`` is empty or names an unknown layer.
    """
    if layers is None:
        return list(range(len(available)))
    if isinstance(layers, str) or not all(isinstance(name, str) for name in layers):
        raise TypeError(f"`layers` must be a sequence of layer names, got {layers!r}.")
    unknown = [name for name in layers if name not in available]
    if unknown:
        raise ValueError(f"Unknown layer name(s) {unknown}; the model's activation layers are {available}.")
    if not layers:
        raise ValueError(f"`layers` is empty; pick at least one of {available} or pass None for all.")
    wanted = set(layers)
    return [index for index, name in enumerate(available) if name in wanted]
