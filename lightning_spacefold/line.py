"""Paths are straight lines: the network's first affine map evaluated at the ends of each segment only.

Every point of a path lies on one segment, ``x(t) = s + t (e - s)``. An affine map ``A`` (a linear layer, a
convolution) applied to the points is affine in ``t`` too: ``A(x(t)) = A(s) + t L(e - s)``, with ``L`` the map
without its bias. When the points enter the network through such a map, possibly after steps that only reshape them
(``nn.Flatten``, a view), :class:`LineShortcut` computes ``A(s)`` and ``L(e - s)`` once per segment and every
point's output from them, instead of running the map on every point. For an MLP whose first layer is its widest,
that is most of the forward pass.

The network still receives the points themselves: any other use of the input (a skip connection from it, a
concatenation) sees the real values, and a call is only taken over when its input is recognised as the points: the
same memory, row for row, unmodified since they were made. Everything else runs as it is. The results equal those
of running the map on every point up to float rounding (the two sides of the identity round differently), which
can only change a bit whose pre-activation lies within a few units in the last place of zero.

When an earlier pass on the same model and inputs showed that the points reach nothing but that map (through views
and shape queries), the points are not even computed: :class:`LineShortcut` hands the network an unset tensor and
watches every operation of the pass; one that would read the points (anything but a view, a shape query or the
map) finds them computed first. Code that bypasses PyTorch's function overrides (TorchScript) is never trusted:
its passes cannot show that the points are unused.
"""

from __future__ import annotations

import math
import mmap
import weakref
from collections.abc import Callable, Hashable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

T = TypeVar("T")
R = TypeVar("R")

__all__ = ["AFFINE_MAPS", "LineShortcut", "Segments", "linear_part", "segment_points"]

AFFINE_MAPS = frozenset(
    {F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d}
)
"""Functions affine in their first argument, with an optional ``bias`` as their third."""


def _getter(name: str) -> Any:
    """The function a tensor property's access passes to a TorchFunctionMode."""
    return torch._C.TensorBase.__dict__[name].__get__


# Operations that neither read nor copy a contiguous tensor: views of it, and questions about (or new tensors of) its
# shape.
_VIEWS = frozenset(
    {
        Tensor.view,
        Tensor.view_as,
        Tensor.reshape,
        Tensor.reshape_as,
        torch.reshape,
        Tensor.flatten,
        torch.flatten,
        Tensor.unflatten,
        torch.unflatten,
        Tensor.squeeze,
        torch.squeeze,
        Tensor.unsqueeze,
        torch.unsqueeze,
        Tensor.contiguous,
        Tensor.detach,
        torch.detach,
    }
)
_SHAPE_QUERIES = frozenset(
    {
        Tensor.size,
        Tensor.dim,
        Tensor.__len__,
        Tensor.numel,
        Tensor.stride,
        Tensor.is_contiguous,
        Tensor.is_floating_point,
        Tensor.element_size,
        Tensor.data_ptr,
        torch.empty_like,
        torch.zeros_like,
        torch.ones_like,
        torch.full_like,
        _getter("shape"),
        _getter("ndim"),
        _getter("dtype"),
        _getter("device"),
        _getter("requires_grad"),
        _getter("is_cuda"),
    }
)

POINTS_PER_OPERATION = 16384
"""Points' values (elements) per operation of a pass above which points unused but by the shortcut are not computed.

Leaving them unset means watching every operation of the pass, several microseconds each on a CPU core, and computing
them costs about 1 ns per value. Measured: the MLP of the benchmarks (40,000 values per operation) gains from it
(0.67x the measurement without the shortcut), a digits MLP of 64 inputs (4,000) loses (1.31x the previous release's
time, against 1.12x with its first layer alone watched).
"""


@dataclass
class _Learnt:
    """What a pass showed of how a model uses its points."""

    stem: nn.Module | None  # the module whose affine map took the points, when one did
    unused: bool  # nothing else used them
    operations: int  # operations of the pass (with the measurement's own)


_LEARNT: weakref.WeakKeyDictionary[nn.Module, tuple[Hashable, _Learnt]] = weakref.WeakKeyDictionary()
"""Per model, the input key of its last watched pass and what it showed (one entry: a ``forward`` made anew for every
call, a lambda say, must not grow it)."""


def linear_part(func: Any, x: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    """The map ``func(args[0], *args[1:], **kwargs)`` of :data:`AFFINE_MAPS` without its bias, applied to ``x``."""
    rest = (args[1], None, *args[3:]) if len(args) > 2 else args[1:]
    return func(x, *rest, **{**kwargs, "bias": None} if "bias" in kwargs else kwargs)


def segment_points(starts: Tensor, ends: Tensor, t: Tensor) -> Tensor:
    """Points ``(1 - t) x1 + t x2`` of each segment at the parameters ``t``, exact at both ends.

    Args:
        starts: ``[G, *shape]``.
        ends: ``[G, *shape]``.
        t: ``[K]`` parameters in ``[0, 1]``.

    Returns:
        ``[G * K, *shape]`` in the inputs' dtype, segment after segment; interpolated in at least float32.
    """
    compute_dtype = torch.promote_types(starts.dtype, torch.float32)
    weights = t.to(compute_dtype).view(1, -1, *([1] * (starts.ndim - 1)))
    points = torch.lerp(starts.to(compute_dtype).unsqueeze(1), ends.to(compute_dtype).unsqueeze(1), weights)
    return points.flatten(0, 1).to(starts.dtype)


class Segments:
    """The points of one forward pass and the segments they lie on.

    Args:
        starts: Segment starts ``[G, *shape]``.
        ends: Segment ends, same shape.
        t: Parameters: ``[K]`` for every segment at every ``t`` (the points segment after segment, ``[G * K]``),
            or ``[N]`` with ``index``.
        index: The segment of each of the N points, ``[N]``; ``None`` for the grid above.
        dtype: The points' dtype; the segments' by default.
    """

    def __init__(
        self,
        starts: Tensor,
        ends: Tensor,
        t: Tensor,
        index: Tensor | None = None,
        dtype: torch.dtype | None = None,
        *,
        unset: bool = False,
    ) -> None:
        self.dtype = starts.dtype if dtype is None else dtype
        compute_dtype = torch.promote_types(starts.dtype, torch.float32)
        self.starts, self.ends, self.t, self.index = starts.to(compute_dtype), ends.to(compute_dtype), t, index
        # The points' values are not computed until something reads them; never points that gradients flow through.
        differentiable = torch.is_grad_enabled() and (starts.requires_grad or ends.requires_grad)
        self.unset = unset and index is None and not differentiable
        self.points: Tensor
        if self.unset:
            count = len(starts) * len(t)
            self.points = _unwritten((count, *starts.shape[1:]), self.dtype, starts.device)
        else:
            self.set_points()
        self.storage = self.points.untyped_storage().data_ptr()
        self.version = self.points._version
        self.taken = False  # the shortcut was taken
        self.stem: nn.Module | None = None  # the module whose map took it
        self.read = False  # some other operation used the points
        # The points and the views of them made in the pass, by id: every alias comes from an operation seen here,
        # since any other operation on the points counts as a read (and computes unset points first).
        self.aliases = {id(self.points)}
        self.views: list[Any] = []

    def set_points(self) -> None:
        """Compute the points' values (interpolated in at least float32, exact at both ends)."""
        if self.index is None:
            points = segment_points(self.starts, self.ends, self.t).to(self.dtype)
        else:
            shape = (-1, *([1] * (self.starts.ndim - 1)))
            weights = self.t.to(self.starts.dtype).view(shape)
            points = torch.lerp(self.starts[self.index], self.ends[self.index], weights).to(self.dtype)
        if self.unset:
            with torch.no_grad():
                self.points.copy_(points)
            self.unset = False
            self.version = self.points._version
        else:
            self.points = points

    def mark_read(self) -> None:
        """Record that an operation other than the first map reads the points, computing them first if unset."""
        self.read = True
        if self.unset:
            self.set_points()

    def uses(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """Whether an operation's arguments include the points or a view of them made in this pass."""
        aliases = self.aliases
        for value in (*args, *kwargs.values()):
            if isinstance(value, list | tuple):
                if any(id(item) in aliases for item in value):
                    return True
            elif id(value) in aliases:
                return True
        return False

    def add_alias(self, view: Any) -> None:
        """Watch a view of the points too (kept alive for the pass, so that its id stays its own)."""
        self.aliases.add(id(view))
        self.views.append(view)

    def hold(self, x: Any) -> bool:
        """Whether ``x`` is the points, unmodified, row for row (itself or a reshaped view of it)."""
        points = self.points
        return (
            type(x) is Tensor
            and x.device == points.device
            and _memory(x) == self.storage
            and x.data_ptr() == points.data_ptr()
            and x.dtype == points.dtype
            and x.shape[:1] == points.shape[:1]
            and x.numel() == points.numel()
            and x.is_contiguous()
            and points._version == self.version  # no in-place change since they were made
        )

    def affine(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """``func`` of the points ``args[0]``, and its linear part ``L(e - s)`` along the segments.

        Both from two calls on the segments alone, ``func(s)`` and ``L(e - s)``: the points' values are
        ``func(s) + t L(e - s)``, combined in at least float32. The linear part is per segment ``[G, *out]`` for the
        grid, per point ``[N, *out]`` with ``index``.
        """
        row_shape = args[0].shape[1:]
        at_start = func(self.starts.to(self.dtype).reshape(-1, *row_shape), *args[1:], **kwargs)  # [G, *out]
        direction = (self.ends - self.starts).to(self.dtype).reshape(-1, *row_shape)
        along = linear_part(func, direction, args, kwargs)
        out_dtype = torch.promote_types(at_start.dtype, torch.float32)
        if self.index is None:
            t = self.t.to(out_dtype).view(1, -1, *([1] * (at_start.ndim - 1)))
            outputs = torch.addcmul(at_start.to(out_dtype).unsqueeze(1), t, along.to(out_dtype).unsqueeze(1))
            return outputs.flatten(0, 1).to(at_start.dtype), along
        along = along[self.index]
        t = self.t.to(out_dtype).view(-1, *([1] * (at_start.ndim - 1)))
        outputs = torch.addcmul(at_start[self.index].to(out_dtype), t, along.to(out_dtype))
        return outputs.to(at_start.dtype), along


def _unwritten(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """An uninitialised tensor for points that may never be written; on CPU in an anonymous memory map of its own.

    Never written, its pages take no memory; freed, it is unmapped. From the heap it left a hole that later
    allocations filled, page by page: the peak resident memory of a measurement rose by 10-20 MiB.
    """
    nbytes = math.prod(shape) * dtype.itemsize
    if device.type != "cpu" or nbytes == 0:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype).view(shape)


def _memory(tensor: Tensor) -> int | None:
    """Where a tensor's storage lives; ``None`` for tensors without memory (torch.compile traces with fake ones)."""
    try:
        return tensor.untyped_storage().data_ptr()
    except RuntimeError:
        return None


def _structure(model: nn.Module) -> tuple[tuple[int, bool], ...]:
    """The model's modules, by identity, and whether each is compiled (``nn.Module.compile``)."""
    return tuple((id(module), getattr(module, "_compiled_call_impl", None) is not None) for module in model.modules())


class LineShortcut:
    """While active, the first affine map that takes the points of :meth:`points` is evaluated on their segments.

    One shortcut per forward pass: the map that the points enter. Use as a context manager around the passes::

        with LineShortcut(model, key) as line:
            for chunk_t in chunks:
                output = line.run(model, starts, ends, chunk_t)

    The first pass on a model and key is watched whole (a TorchFunctionMode sees every operation of the pass): it
    shows which module's map takes the points and whether anything else uses them. Later passes run that module alone
    under the mode, or, where the points are used by nothing else and the call's passes are large enough to be worth
    it (:data:`POINTS_PER_OPERATION`), leave them unset and watch the whole pass again. Only the passes are watched:
    the caller's own work between them runs unseen.

    Args:
        model: The model the passes run, to remember across calls how it uses its points; ``None`` to watch every
            pass whole and compute the points always.
        key: What decides how the model uses its input, besides the model (e.g. the input's shape and the forward
            function).
        values_per_pass: How many values the points of a pass hold, at most (points times values per point): what
            leaving them unset would save.
    """

    def __init__(self, model: nn.Module | None = None, key: Hashable = None, values_per_pass: int = 0) -> None:
        # A module replaced or compiled since (whose code may read the points unseen) makes it another model here.
        self._model, self._key = model, (key, None if model is None else _structure(model))
        self._segments: Segments | None = None
        self._mode = _Watch(self)
        self._stack = ExitStack()
        self._values_per_pass = values_per_pass
        self._learnt: _Learnt | None = None
        self._unset = False  # the points of this call's passes are left unset
        self.watching = True  # the whole pass is watched
        self.operations = 0  # operations seen in the passes watched whole
        self.shortcuts = 0  # forward passes that took the shortcut

    def __enter__(self) -> LineShortcut:
        model = self._model
        known = None if model is None else _LEARNT.get(model)
        self._learnt = known[1] if known is not None and known[0] == self._key else None
        learnt = self._learnt
        self._unset = (
            learnt is not None
            and learnt.unused
            and self._values_per_pass > POINTS_PER_OPERATION * max(learnt.operations, 1)
        )
        self.watching = learnt is None or self._unset
        if not self.watching and learnt is not None and learnt.stem is not None:
            self._stack.enter_context(_watched_calls(learnt.stem, self._mode))
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stack.close()

    def run(self, forward: Callable[[Tensor], T], starts: Tensor, ends: Tensor, t: Tensor) -> T:
        """One forward pass: ``forward`` of the points ``[G * K, *shape]`` of ``starts[G] -> ends[G]`` at ``t[K]``."""
        self._segments = Segments(starts, ends, t, unset=self._unset)
        self.operations = 0
        # The watch costs about 3 us per operation it sees: it is entered for the pass alone.
        with self._mode if self.watching else nullcontext():
            output = forward(self._segments.points)
        self._end_pass()
        return output

    def unwatched(self, transform: Callable[[int, Tensor, R], T]) -> Callable[[int, Tensor, R], T]:
        """A capture's ``transform(position, pre_activation, rule)``, run out of the watch's sight.

        The watch costs about 3 us per operation it sees, and a measurement's own work on a layer is about 20
        operations. The transform reads nothing but its pre-activation: where that is the points or a view of them,
        it counts as a read that the watch saw (the points are computed first if unset); then its operations on a
        plain tensor skip the TorchFunctionModes (a subclass keeps its own overrides).
        """

        def run(position: int, pre_activation: Tensor, rule: R) -> T:
            segments = self._segments
            if segments is not None and segments.uses((pre_activation,), {}):
                segments.mark_read()
            if type(pre_activation) is not Tensor or torch.compiler.is_compiling():
                return transform(position, pre_activation, rule)
            with torch._C.DisableTorchFunction():
                return transform(position, pre_activation, rule)

        return run

    def _end_pass(self) -> None:
        """Close the pass; after a pass watched whole, remember how the model used its points."""
        segments, model = self._segments, self._model
        self._segments = None
        if segments is None or model is None or not self.watching:
            return
        unused = segments.taken and not segments.read
        _LEARNT[model] = (self._key, _Learnt(segments.stem, unused, self.operations))
        if not unused:
            self._unset = False  # the points turned out to be used: compute them for the rest of the call


class _Watch(TorchFunctionMode):
    """The operations of a pass, as :class:`LineShortcut` sees them."""

    def __init__(self, line: LineShortcut) -> None:
        super().__init__()
        self.line = line

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        line = self.line
        segments = line._segments
        if segments is None:
            return func(*args, **kwargs)
        line.operations += 1
        if not segments.taken and func in AFFINE_MAPS and args and segments.hold(args[0]):
            segments.taken = True
            segments.stem = _owner(line._model, args[1])
            line.shortcuts += 1
            return segments.affine(func, args, kwargs)[0]
        watching = segments.unset or (line._model is not None and line.watching and not segments.read)
        if watching and segments.uses(args, kwargs):
            if func in _SHAPE_QUERIES:
                return func(*args, **kwargs)
            if func in _VIEWS and isinstance(args[0], Tensor) and args[0].is_contiguous():
                view = func(*args, **kwargs)
                segments.add_alias(view)
                return view
            segments.mark_read()
        return func(*args, **kwargs)


def _owner(model: nn.Module | None, weight: Any) -> nn.Module | None:
    """The model's module whose ``weight`` the affine map used, if one did."""
    if model is None:
        return None
    return next((module for module in model.modules() if getattr(module, "weight", None) is weight), None)


@contextmanager
def _watched_calls(module: nn.Module, mode: TorchFunctionMode) -> Iterator[None]:
    """Run every call of ``module`` under ``mode`` (and the rest of the network without it)."""
    entered: list[bool] = []  # one entry per call in progress: whether it entered the mode

    def enter(_module: nn.Module, _args: Any) -> None:
        mode.__enter__()
        entered[-1] = True

    def leave(_module: nn.Module, _args: Any, _output: Any) -> None:
        if entered.pop():
            mode.__exit__(None, None, None)

    def start(_module: nn.Module, _args: Any) -> None:
        entered.append(False)  # before every other pre-hook: a later one that raises leaves nothing to undo

    handles = [
        module.register_forward_pre_hook(start, prepend=True),
        module.register_forward_pre_hook(enter),
        module.register_forward_hook(leave, always_call=True),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
