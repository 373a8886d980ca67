"""The measured forward pass compiled by ``torch.compile``: ``compile=True`` of ``path_folding``.

In eager mode, a measurement pays for PyTorch's separate passes over every activation: ``z > 0``, the finiteness
sum, the packing of the bits. Compiled, they are fused into the forward pass. One compiled step per model, forward
function, layers, input shape, points per pass, dtype, device and autocast state is kept (weakly: forgotten with
the model) and reused by every later measurement of the same shapes, as a training run's measurements are.

The step runs the forward pass with capture hooks that are created once per step (so that re-registering them
for each call does not recompile) and take each pre-activation's bits, packed, and its sum at the moment of the call
(an in-place activation changes its input afterwards), all in one graph. Forward pre-hooks see the activation modules
and the activations written as a module around a functional call (timm's ``GELU``, Hugging Face's
``GELUActivation``); a ``TorchFunctionMode`` that dynamo traces sees bare functional calls (``F.relu`` in
``nn.TransformerEncoderLayer``). An eager probe on one path checks that the step sees the very tensors that eager
capture sees, with the same rules, and shows where the first affine map is evaluated at the segments' ends
(:mod:`~lightning_spacefold.line`): when it is an ``nn.Linear`` or an ``nn.Conv1d/2d/3d`` module (zero padding) that
receives the points. The last, smaller chunk of a measurement is padded to the step's shape (repeated paths and
parameters whose results are dropped), so it compiles once; a model with batch statistics in eval mode (BatchNorm
without running statistics) is not padded and compiles a second shape.

Measured eagerly instead, with one warning per model: models with declared SwiGLU units among their layers, models
with a layer whose pre-activation the step does not see (a module named like an activation whose functional call
takes another tensor than the module's input, as Hugging Face's ``NewGELUActivation`` calls ``torch.tanh``), and any
model whose compilation fails (the failure is remembered).
"""

from __future__ import annotations

import types
import warnings
import weakref
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lightning_spacefold.capture import (
    _FUNCTION_LOOKUP,
    ActivationRule,
    LayerInfo,
    LayersChangedError,
    _without_wrappers,
    activation_modules,
    capture_activations,
    has_functional_layers,
)
from lightning_spacefold.finite import FiniteCheck, finite_sum, output_sum
from lightning_spacefold.line import LineShortcut, Segments, segment_points

__all__ = ["BACKEND", "CompiledStep", "compiled_step", "pack_bits"]

BACKEND: str | Callable[..., Any] = "inductor"
"""The ``torch.compile`` backend of the steps (tests use ``"eager"`` or ``"aot_eager"`` to check the plumbing)."""

INDUCTOR_OPTIONS: dict[str, Any] = {"memory_planning": True} if torch.__version__ >= "2.14" else {}
"""Inductor's options for the steps: the step's temporaries in one block per call (a pool), not one each.

Freed one by one, a transformer encoder step's megabyte activations left more free memory at the top of glibc's
heap than its trim threshold, so the heap shrank after each call and the next call faulted its pages in again:
12,600-16,200 page faults per call, against 0 with the pool (``nn.TransformerEncoder``, 4 layers, 132 points).
Not before torch 2.14: torch 2.13's inductor generated failing code for small CNNs and MLPs with it. A step that
fails with these options is compiled again without them.
"""

_AFFINE_MODULES: dict[type[nn.Module], Callable[..., Tensor]] = {
    nn.Linear: F.linear,
    nn.Conv1d: F.conv1d,
    nn.Conv2d: F.conv2d,
    nn.Conv3d: F.conv3d,
}
"""Modules whose forward is exactly their function of the input (convolutions with zero padding)."""


def pack_bits(bits: Tensor) -> Tensor:
    """:func:`~lightning_spacefold.measure.pack_words` as one reduction that a compiler fuses with the bits.

    Args:
        bits: Boolean tensor ``[..., M]``.

    Returns:
        ``int64`` tensor ``[..., ceil(M / 64)]``, the same words as ``pack_words``: unit ``j`` is bit ``j % 64`` of
        word ``j // 64`` (bit 63 gives the sign; the sum of distinct powers of two never carries).
    """
    bits = F.pad(bits, (0, -bits.shape[-1] % 64)).unflatten(-1, (-1, 64))
    weights = torch.ones((), dtype=torch.int64, device=bits.device) << torch.arange(64, device=bits.device)
    # A select, not a product: inductor's CPU code multiplies int64 vectors element by element (AVX2 has no 64-bit
    # multiply), which made this loop 2x slower (transformer encoder FFN, [4224, 512] pre-activations).
    return torch.where(bits, weights, 0).sum(-1)


class _Recorder(TorchFunctionMode):
    """Hands each layer's pre-activation to ``take`` in call order, as the compiled step sees the layers.

    Forward pre-hooks see the calls of activation modules and of activations written as a module around a functional
    call (``F.gelu in GELU``: the module's input is the function's). This mode, entered only where the layers include
    bare functional calls (``F.relu`` in ``nn.TransformerEncoderLayer``), sees those: the calls of
    :data:`~lightning_spacefold.capture._FUNCTION_LOOKUP` outside the hooked modules, whose own calls belong to them.
    """

    def __init__(self, take: Callable[[Tensor], None]) -> None:
        super().__init__()
        self.take = take
        self.depth = 0  # hooked module calls in progress
        # Created once: the same hook objects at every call do not recompile.
        self.enter, self.leave, self.take_input = self._enter, self._leave, self._take_input

    def _take_input(self, _module: nn.Module, args: tuple[Any, ...]) -> None:
        self.take(args[0])

    def _enter(self, _module: nn.Module, args: tuple[Any, ...]) -> None:
        self.depth += 1
        # Outside this mode: dynamo breaks the graph at a Tensor method written in Python (``unflatten``) called
        # through a mode.
        with torch._C.DisableTorchFunction():
            self.take(args[0])

    def _leave(self, _module: nn.Module, _args: tuple[Any, ...], _output: Any) -> None:
        self.depth -= 1

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.depth == 0 and func in _FUNCTION_LOOKUP:
            self.take(args[0] if args else kwargs["input"])
        return func(*args, **kwargs)

    @contextmanager
    def hooked(self, modules: list[nn.Module], owners: list[nn.Module]) -> Iterator[None]:
        """Hook ``modules``, whose calls are layers, and ``owners``, the modules that make the bare functional calls.

        The owners are hooked as eager capture hooks them: a hooked ``nn.TransformerEncoderLayer`` leaves its fused
        fast path (``torch._transformer_encoder_layer_fwd``) for the code that calls its activation. Without bare calls
        the mode is not entered, and the modules' pre-hooks alone take their inputs: forward hooks that count the
        depth made compiled ResNet-18 1.15x slower.
        """
        if not owners:
            handles = [module.register_forward_pre_hook(self.take_input) for module in modules]
        else:
            handles = [module.register_forward_pre_hook(self.enter) for module in modules]
            # Not always_call (dynamo guards on those hooks' ids: a recompilation per call); an error resets the depth.
            handles += [module.register_forward_hook(self.leave) for module in modules]
            handles += [module.register_forward_pre_hook(_no_hook) for module in owners]
        try:
            yield
        finally:
            self.depth = 0
            for handle in handles:
                handle.remove()


def _no_hook(_module: nn.Module, _args: tuple[Any, ...]) -> None:
    pass


class _Line(Segments):
    """A chunk's segments as :meth:`Segments.affine` reads them, made inside the compiled step (without points)."""

    def __init__(self, starts: Tensor, ends: Tensor, t: Tensor, dtype: torch.dtype) -> None:
        self.starts, self.ends, self.t, self.dtype, self.index = starts, ends, t, dtype, None


class CompiledStep:
    """One compiled forward pass of a chunk of points: outputs the sums and the layers' packed bits (or bits).

    Holds no reference to the model: the modules are looked up by name at each call, and the model (or forward
    function) is an argument of the compiled function.

    Args:
        hooked: Qualified names of the modules whose calls are layers (see :class:`_Recorder`).
        owners: Qualified names of the modules that make the bare functional calls among the layers.
        selected: Positions of the measured layers among the calls.
        rules: The rule of each call (of every layer, measured or not).
        affine: Name of the module whose forward is evaluated at the segments' ends, or ``None``.
        dtype: The measured pre-activations' dtype (for the finiteness error).
        shape: Segments and parameters per call ``(G, K)`` (smaller chunks are padded to it), or ``None``.
        patterns: Return the bits ``[G * K, M]`` instead of each layer's packed words.
    """

    def __init__(
        self,
        hooked: list[str],
        owners: list[str],
        selected: list[int],
        rules: list[ActivationRule],
        affine: str | None,
        dtype: torch.dtype,
        shape: tuple[int, int] | None,
        patterns: bool,
        options: dict[str, Any] | None,
    ) -> None:
        self.hooked, self.owners, self.selected, self.rules, self.affine = hooked, owners, selected, rules, affine
        self.dtype, self.shape, self.patterns = dtype, shape, patterns
        # Each call's (sum, bits) in the pass; empty between calls (dynamo guards on its length).
        self.calls: list[tuple[Tensor, Tensor]] = []
        self.line: _Line | None = None  # the chunk's segments, during the pass
        self.module: nn.Module | None = None  # the affine module, during a call
        # Created once: the same hook, mode and forward objects at every call do not recompile.
        self.recorder, self.forward = _Recorder(self._record), self._affine_forward
        # A code object of its own: dynamo's recompile limit counts per code object, so that steps of other models
        # and shapes do not use up one another's.
        step = types.FunctionType(CompiledStep._step.__code__.replace(), globals(), "_step")
        self.compiled = torch.compile(types.MethodType(step, self), backend=BACKEND, dynamic=False, options=options)

    def _record(self, z: Tensor) -> None:
        bits = self.rules[len(self.calls)].bits(z).reshape(len(z), -1)
        # Packed in the same loop: inductor writes a boolean tensor an order of magnitude slower than int64 words.
        self.calls.append((finite_sum(z), bits if self.patterns else pack_bits(bits)))

    def _affine_forward(self, x: Tensor) -> Tensor:
        module, line = self.module, self.line
        assert module is not None and line is not None
        extra = () if isinstance(module, nn.Linear) else (module.stride, module.padding, module.dilation, module.groups)
        return line.affine(_AFFINE_MODULES[type(module)], (x, module.weight, module.bias, *extra), {})[0]

    def _step(self, run: Callable[[Tensor], Any], starts: Tensor, ends: Tensor, t: Tensor) -> Any:
        compute_dtype = torch.promote_types(starts.dtype, torch.float32)
        self.line = _Line(starts.to(compute_dtype), ends.to(compute_dtype), t, starts.dtype)
        with self.recorder if self.owners else nullcontext():
            output = run(segment_points(starts, ends, t))
        self.line = None
        layer_sums, bits = zip(*(self.calls[position] for position in self.selected), strict=True)
        last = output_sum(output)
        sums = torch.stack([*layer_sums, layer_sums[0].new_zeros(()) if last is None else last])
        return sums, torch.cat(bits, dim=1) if self.patterns else list(bits)

    def __call__(
        self,
        model: nn.Module,
        run: Callable[[Tensor], Any],
        starts: Tensor,
        ends: Tensor,
        t: Tensor,
        finite: FiniteCheck,
    ) -> tuple[Tensor, Any]:
        """Run the step on the segments ``starts[g] -> ends[g]`` at ``t[k]``.

        Returns:
            The output's finiteness sum (for ``finite.end_pass``) and each layer's words ``[g * k, words]`` (or the
            bits ``[g * k, M]``); the layers' sums are added to ``finite``.
        """
        rows, count = len(starts), len(t)
        if self.shape is not None:
            starts, ends, t = _padded(starts, self.shape[0]), _padded(ends, self.shape[0]), _padded(t, self.shape[1])
        modules = _named_modules(model)
        affine = None if self.affine is None else modules[self.affine]
        own_forward = None if affine is None else affine.__dict__.get("forward")
        hooked = [modules[name] for name in self.hooked], [modules[name] for name in self.owners]
        try:
            if affine is not None:
                self.module, affine.forward = affine, self.forward
            with self.recorder.hooked(*hooked):
                sums, values = self.compiled(run, starts, ends, t)
        finally:
            self.calls.clear()
            self.line = self.module = None
            if affine is not None:
                del affine.forward
                if own_forward is not None:
                    affine.forward = own_forward
        for layer_sum in sums[:-1]:
            finite.add(layer_sum)
        finite.dtype = self.dtype
        if (rows, count) != (len(starts), len(t)):
            shape = (len(starts), len(t))

            def trim(value: Tensor) -> Tensor:
                return value.unflatten(0, shape)[:rows, :count].flatten(0, 1)

            values = trim(values) if self.patterns else [trim(layer_words) for layer_words in values]
        return sums[-1], values


def _padded(values: Tensor, size: int) -> Tensor:
    """``values`` with its last row repeated up to ``size`` rows."""
    missing = size - len(values)
    return values if missing == 0 else torch.cat([values, values[-1:].expand(missing, *values.shape[1:])])


def _named_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {_without_wrappers(name): module for name, module in model.named_modules()}


class _ModelSteps:
    """The steps of one model, and whether it is measured eagerly (warned once)."""

    def __init__(self) -> None:
        self.steps: dict[Hashable, CompiledStep] = {}
        self.eager = False


_STEPS: weakref.WeakKeyDictionary[nn.Module, _ModelSteps] = weakref.WeakKeyDictionary()


def compiled_step(
    model: nn.Module,
    run: Callable[[Tensor], Any],
    forward_key: Hashable,
    found: Sequence[LayerInfo],
    selected: Sequence[int],
    starts: Tensor,
    ends: Tensor,
    t: Tensor,
    shape: tuple[int, int],
    patterns: bool = False,
) -> CompiledStep | None:
    """The compiled step for these layers and chunks, compiled on first use; ``None`` to measure eagerly.

    Call in eval mode without gradients (:func:`~lightning_spacefold.capture.evaluation_mode`), under the autocast
    state of the measurement.

    Args:
        model: The network.
        run: The model or the forward function.
        forward_key: What identifies the forward function.
        found: The model's activation layers (:func:`~lightning_spacefold.find_layers`).
        selected: Positions of the measured layers in ``found``.
        starts: Path starts; the first ``G`` (with the first ``K`` parameters) compile the step.
        ends: Path ends.
        t: The parameters of the points along each path.
        shape: Segments and parameters per forward pass ``(G, K)``.
        patterns: Steps for :func:`~lightning_spacefold.path_patterns` (bits instead of packed words).

    Raises:
        LayersChangedError: When the model's activation modules are not the ``found`` ones (found again and retried
            by :func:`~lightning_spacefold.folding.with_known_layers`).
    """
    entry = _STEPS.setdefault(model, _ModelSteps())
    if entry.eager:
        return None
    unsupported = [layer.name for layer in found if layer.activation == "SwiGLU"]
    if unsupported:
        _eager(entry, f"layer(s) {unsupported[:3]} are SwiGLU units. Measuring eagerly (same results).")
        return None
    device = starts.device
    autocast = torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type)
    key: tuple[Hashable, ...] = (
        patterns,
        forward_key,
        tuple(found),
        tuple(selected),
        starts.shape[1:],
        shape,
        starts.dtype,
        device,
    )
    key += (autocast, tuple(activation_modules(model)))
    step = entry.steps.get(key)
    if step is not None:
        return step
    modules = _named_modules(model)
    missing = [layer.module for layer in found if layer.module not in modules]
    if missing:
        raise LayersChangedError(f"The module {missing[0]!r} is gone since the layers were found.")
    bare = [layer.activation.startswith("F.") and " in " not in layer.activation for layer in found]
    hooked = list(dict.fromkeys(layer.module for layer, call in zip(found, bare, strict=True) if not call))
    owners = list(dict.fromkeys(layer.module for layer, call in zip(found, bare, strict=True) if call))
    probe = _probe(
        model, run, found, [modules[name] for name in hooked], [modules[name] for name in owners], starts[:1], ends[:1]
    )
    if probe.unseen is not None:
        _eager(
            entry,
            f"the compiled step does not see the pre-activation of layer {probe.unseen!r} (a functional call on "
            "another tensor than its module's input, or several calls in one module). Measuring eagerly (same "
            "results).",
        )
        return None
    batch_statistics = any(
        isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is None
        for module in model.modules()
    )
    attempts = [INDUCTOR_OPTIONS, None] if BACKEND == "inductor" and INDUCTOR_OPTIONS else [None]
    for options in attempts:
        try:
            step = CompiledStep(
                hooked,
                owners,
                list(selected),
                probe.rules,
                probe.affine,
                probe.dtypes[selected[-1]],
                None if batch_statistics else shape,
                patterns,
                options,
            )
            step(model, run, starts[: shape[0]], ends[: shape[0]], t[: shape[1]], FiniteCheck([]))  # compiles
            break
        except torch.OutOfMemoryError:
            raise
        except Exception as error:  # whatever the compiler raises: the next attempt, else measured eagerly from now on
            failure = error
    else:
        _eager(entry, f"torch.compile failed ({_cause(failure)}). Measuring eagerly (same results).")
        return None
    entry.steps[key] = step
    return step


def _cause(error: BaseException) -> str:
    """The first line of the error that started it all (the compiler wraps it)."""
    while (inner := getattr(error, "inner_exception", None) or error.__cause__) is not None:
        error = inner
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def _eager(entry: _ModelSteps, reason: str) -> None:
    entry.eager = True
    warnings.warn(f"compile=True: {reason}", stacklevel=4)


class _Probe(NamedTuple):
    """What one eager pass shows the compiled step."""

    affine: str | None
    """The affine module that takes the shortcut, or ``None``."""
    rules: list[ActivationRule]
    """Each layer's rule, as eager capture takes it."""
    dtypes: list[torch.dtype]
    """Each layer's pre-activation dtype."""
    unseen: str | None
    """The first layer whose pre-activation the step's :class:`_Recorder` does not see, or ``None``."""


def _probe(
    model: nn.Module,
    run: Callable[[Tensor], Any],
    found: Sequence[LayerInfo],
    hooked: list[nn.Module],
    owners: list[nn.Module],
    start: Tensor,
    end: Tensor,
) -> _Probe:
    """One eager pass on a path's two ends, captured as eager measurement captures it and seen as the step sees it.

    Raises:
        LayersChangedError: When the capture saw other layers than ``found``.
    """
    seen: list[Tensor] = []
    calls: dict[nn.Module, list[int]] = {}  # shortcuts taken before and after each call of an affine module
    candidates = [
        module
        for module in model.modules()
        if type(module) in _AFFINE_MODULES and getattr(module, "padding_mode", "zeros") == "zeros"
    ]
    recorder = _Recorder(seen.append)
    with (
        LineShortcut() as line,
        capture_activations(
            model, lambda _position, z, rule: (z, rule), functional=has_functional_layers(found), expected=found
        ) as capture,
        recorder.hooked(hooked, owners),
        recorder if owners else nullcontext(),
    ):

        def before(module: nn.Module, _args: Any) -> None:
            calls.setdefault(module, []).append(line.shortcuts)

        def after(module: nn.Module, _args: Any, _output: Any) -> None:
            calls[module].append(line.shortcuts)

        handles = [module.register_forward_pre_hook(before) for module in candidates]
        handles += [module.register_forward_hook(after) for module in candidates]
        try:
            line.run(run, start, end, torch.tensor([0.0, 1.0], dtype=torch.float64, device=start.device))
        finally:
            for handle in handles:
                handle.remove()
    capture.check_pass()
    pre, rules = [z for z, _ in capture.values], [rule for _, rule in capture.values]
    # The step must see the very tensors that the capture saw, in the same order.
    differ = [z is not s for z, s in zip(pre, seen, strict=False)] + [len(seen) != len(pre)]
    unseen = found[min(differ.index(True), len(found) - 1)].name if any(differ) else None
    names = {module: name for name, module in _named_modules(model).items()}
    # The one module, called once, during whose call the shortcut was taken.
    affine = [names[module] for module, counts in calls.items() if counts == [0, 1]]
    return _Probe(affine[0] if affine else None, rules, [z.dtype for z in pre], unseen)
