"""Finding the activation layers of a model and capturing what enters them during a forward pass.

An activation layer is one call of an activation: an activation module (``nn.ReLU``, ``nn.GELU``, ... or a
registered custom module) or an activation called functionally (``F.relu``, ``torch.tanh``, ``x.relu_()``, ...).
Module calls are seen through forward pre-hooks, functional calls through a :class:`~torch.overrides.TorchFunctionMode`;
a functional call made inside an activation module (``nn.ReLU`` calls ``F.relu``) belongs to that module and is not
counted again. The captured tensor is always the pre-activation, taken before the call, so in-place activations
give the bits of their input.

Layer names: the module's qualified name (``features.1``); for a functional call the enclosing module's name and
the function (``block.relu``, or ``relu`` at the top level); a name that occurs several times in one forward pass
(a shared module, a loop) gets ``#1``, ``#2``, ... in call order.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

__all__ = [
    "ActivationRule",
    "LayerInfo",
    "capture_activations",
    "find_layers",
    "has_functional_layers",
    "register_activation",
]


def _positive(pre_activation: Tensor) -> Tensor:
    return pre_activation > 0


@dataclass(frozen=True)
class ActivationRule:
    """How one activation call turns its pre-activation ``z`` into bits, and where it bends.

    Args:
        bits: Maps the pre-activation tensor to a boolean tensor of the same shape. The default, ``z > 0``, is
            ``f(z) > 0`` for the ReLU family and every odd activation, and the middle of the range for Sigmoid,
            Softplus and Hardsigmoid.
        kinks: For a piecewise-linear activation, the pre-activation values where its slope changes (``(0.0,)``
            for ReLU, ``(0.0, 6.0)`` for ReLU6); ``None`` for a smooth one. Exact traversal needs them.
    """

    bits: Callable[[Tensor], Tensor] = _positive
    kinks: tuple[float, ...] | None = None


_SMOOTH = ActivationRule()
_RELU_LIKE = ActivationRule(kinks=(0.0,))
_HARDSIGMOID = ActivationRule(kinks=(-3.0, 3.0))


def _constant(rule: ActivationRule) -> Callable[..., ActivationRule]:
    return lambda *_: rule


def _hardtanh_call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> ActivationRule:
    min_val = args[1] if len(args) > 1 else kwargs.get("min_val", -1.0)
    max_val = args[2] if len(args) > 2 else kwargs.get("max_val", 1.0)
    return ActivationRule(kinks=(float(min_val), float(max_val)))


def _hardtanh_module(module: nn.Hardtanh) -> ActivationRule:
    return ActivationRule(kinks=(float(module.min_val), float(module.max_val)))


# Module class -> rule for one of its instances (nn.ReLU6 is an nn.Hardtanh and takes its rule).
_MODULE_RULES: dict[type[nn.Module], Callable[[nn.Module], ActivationRule]] = {
    **dict.fromkeys((nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.RReLU), _constant(_RELU_LIKE)),
    nn.Hardtanh: lambda module: _hardtanh_module(cast(nn.Hardtanh, module)),
    nn.Hardsigmoid: _constant(_HARDSIGMOID),
    **dict.fromkeys(
        (nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.Tanh, nn.Sigmoid, nn.Softplus),
        _constant(_SMOOTH),
    ),
    nn.Softsign: _constant(_SMOOTH),
}

# Every way of calling an activation functionally that reaches ``__torch_function__``: its layer name and the
# rule for a call from its arguments.
_FUNCTIONS: dict[
    str, tuple[tuple[Callable[..., Any], ...], Callable[[tuple[Any, ...], dict[str, Any]], ActivationRule]]
] = {
    "relu": ((F.relu, F.relu_, torch.relu, torch.relu_, Tensor.relu, Tensor.relu_), _constant(_RELU_LIKE)),
    "relu6": ((F.relu6,), _constant(ActivationRule(kinks=(0.0, 6.0)))),
    "leaky_relu": ((F.leaky_relu, F.leaky_relu_), _constant(_RELU_LIKE)),
    "prelu": ((F.prelu, torch.prelu), _constant(_RELU_LIKE)),
    "rrelu": ((F.rrelu, F.rrelu_, torch.rrelu, torch.rrelu_), _constant(_RELU_LIKE)),
    "hardtanh": ((F.hardtanh, F.hardtanh_), _hardtanh_call),
    "hardsigmoid": ((F.hardsigmoid,), _constant(_HARDSIGMOID)),
    "elu": ((F.elu, F.elu_), _constant(_SMOOTH)),
    "selu": ((F.selu, F.selu_, torch.selu, torch.selu_), _constant(_SMOOTH)),
    "celu": ((F.celu, F.celu_, torch.celu, torch.celu_), _constant(_SMOOTH)),
    "gelu": ((F.gelu,), _constant(_SMOOTH)),
    "silu": ((F.silu,), _constant(_SMOOTH)),
    "mish": ((F.mish,), _constant(_SMOOTH)),
    "hardswish": ((F.hardswish,), _constant(_SMOOTH)),
    "tanh": ((F.tanh, torch.tanh, torch.tanh_, Tensor.tanh, Tensor.tanh_), _constant(_SMOOTH)),
    "sigmoid": ((F.sigmoid, torch.sigmoid, torch.sigmoid_, Tensor.sigmoid, Tensor.sigmoid_), _constant(_SMOOTH)),
    "softplus": ((F.softplus,), _constant(_SMOOTH)),
    "softsign": ((F.softsign,), _constant(_SMOOTH)),
}
_FUNCTION_LOOKUP = {function: (name, rule) for name, (functions, rule) in _FUNCTIONS.items() for function in functions}


def register_activation(
    module_type: type[nn.Module],
    bits: Callable[[Tensor], Tensor] | None = None,
    kinks: tuple[float, ...] | None = None,
) -> None:
    """Make a custom activation module a layer of its own.

    Calls of subclasses count too. Functional activations called inside the module are then not counted
    separately.

    Args:
        module_type: The activation's ``nn.Module`` class; its forward's first argument is the pre-activation.
        bits: Maps the pre-activation to a boolean tensor of the same shape (default ``z > 0``).
        kinks: If the activation is piecewise linear, the pre-activation values where its slope changes; this
            lets ``exact=True`` traverse it. ``None`` for a smooth activation.

    Raises:
        TypeError: If ``module_type`` is not an ``nn.Module`` subclass, ``bits`` is not callable or ``kinks`` is not
            a tuple of numbers.

    Examples:
        >>> class Square(nn.Module):
        ...     def forward(self, x):
        ...         return x * x
        >>> register_activation(Square, bits=lambda z: z.abs() > 1)
        >>> find_layers(nn.Sequential(nn.Linear(2, 3), Square()), torch.zeros(1, 2))
        [LayerInfo(name='1', activation='Square', num_units=3)]
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"`module_type` must be an nn.Module subclass, got {module_type!r}.")
    if bits is not None and not callable(bits):
        raise TypeError(f"`bits` must be a callable mapping the pre-activation to booleans, got {bits!r}.")
    if kinks is not None and not (
        isinstance(kinks, tuple) and all(isinstance(k, (int, float)) and not isinstance(k, bool) for k in kinks)
    ):
        raise TypeError(f"`kinks` must be None or a tuple of numbers, got {kinks!r}.")
    rule = ActivationRule(bits or _positive, None if kinks is None else tuple(float(k) for k in kinks))
    _MODULE_RULES[module_type] = _constant(rule)


def _module_rule(module: nn.Module) -> Callable[[nn.Module], ActivationRule] | None:
    for cls in type(module).__mro__:
        if cls in _MODULE_RULES:
            return _MODULE_RULES[cls]
    return None


@dataclass(frozen=True)
class LayerInfo:
    """One activation layer of a model, as seen in a forward pass.

    Attributes:
        name: Stable, readable name (see the module docstring).
        activation: The activation module's class name, or ``F.<name>`` for a functional call.
        num_units: Units per sample (the flattened size of the pre-activation of one input).
    """

    name: str
    activation: str
    num_units: int


def _unique_names(base_names: list[str]) -> list[str]:
    counts = Counter(base_names)
    seen: Counter[str] = Counter()
    names = []
    for base in base_names:
        seen[base] += 1
        names.append(f"{base}#{seen[base]}" if counts[base] > 1 else base)
    return names


class _Capture:
    """State of one capture: the module stack and what each activation call produced."""

    def __init__(self, transform: Callable[[int, Tensor, ActivationRule], Any], select: frozenset[int] | None) -> None:
        self.transform = transform
        self.select = select
        self.module_stack: list[str] = []
        self.activation_depth = 0
        self.transforming = False
        self.base_names: list[str] = []
        self.activations: list[str] = []
        self.values: list[Any] = []

    def record(self, base_name: str, activation: str, rule: ActivationRule, pre_activation: Tensor) -> None:
        index = len(self.base_names)
        self.base_names.append(base_name)
        self.activations.append(activation)
        if self.select is not None and index not in self.select:
            return
        self.transforming = True  # the transform's own tensor ops are not activation layers
        try:
            self.values.append(self.transform(len(self.values), pre_activation, rule))
        finally:
            self.transforming = False

    @property
    def names(self) -> list[str]:
        return _unique_names(self.base_names)

    def reset(self) -> None:
        """Forget the last forward pass."""
        self.base_names, self.activations, self.values = [], [], []


class _FunctionalActivations(TorchFunctionMode):
    def __init__(self, capture: _Capture) -> None:
        super().__init__()
        self.capture = capture

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        capture = self.capture
        if func in _FUNCTION_LOOKUP and capture.activation_depth == 0 and not capture.transforming:
            name, rule = _FUNCTION_LOOKUP[func]
            owner = capture.module_stack[-1] if capture.module_stack else ""
            pre_activation = args[0] if args else kwargs["input"]
            capture.record(f"{owner}.{name}" if owner else name, f"F.{name}", rule(args, kwargs), pre_activation)
        return func(*args, **kwargs)


@contextmanager
def capture_activations(
    model: nn.Module,
    transform: Callable[[int, Tensor, ActivationRule], Any],
    select: frozenset[int] | None = None,
    functional: bool = True,
) -> Iterator[_Capture]:
    """Capture the pre-activation of every activation layer in the forward passes run inside the block.

    The yielded object's ``values`` lists ``transform(position, pre_activation, rule)`` for every (selected) layer
    call in forward order (``position`` counts the selected calls from 0), ``names`` the layer names and
    ``activations`` their kinds; call ``reset()`` between forward passes. Every hook is removed on exit, also when
    the forward raises.

    Args:
        model: The network.
        transform: Applied to each pre-activation at the moment of the call, so nothing else is kept alive.
        select: Indices (in forward order) of the layers to transform; ``None`` for all.
        functional: Also capture activations called functionally. That takes a ``TorchFunctionMode`` and a hook
            on every module (to name the calls); pass ``False`` when :func:`find_layers` found none, to save the
            overhead.

    Yields:
        The capture state.
    """
    capture = _Capture(transform, select)
    handles = []
    try:
        for qualified_name, module in model.named_modules():
            rule = _module_rule(module)
            if rule is None and not functional:
                continue
            handles.append(module.register_forward_pre_hook(_enter_hook(capture, qualified_name, module, rule)))
            handles.append(module.register_forward_hook(_exit_hook(capture, rule), always_call=True))
        with _FunctionalActivations(capture) if functional else nullcontext():
            yield capture
    finally:
        for handle in handles:
            handle.remove()


def has_functional_layers(layers: list[LayerInfo]) -> bool:
    """Whether any of the layers is a functional call (so capturing needs ``functional=True``)."""
    return any(layer.activation.startswith("F.") for layer in layers)


def _enter_hook(
    capture: _Capture, name: str, module: nn.Module, rule: Callable[[nn.Module], ActivationRule] | None
) -> Callable[..., None]:
    def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
        capture.module_stack.append(name)
        if rule is not None:
            outermost = capture.activation_depth == 0 and not capture.transforming
            # Counted before recording: the exit hook always runs, also when the transform raises.
            capture.activation_depth += 1
            if outermost:
                capture.record(name or type(module).__name__, type(module).__name__, rule(module), args[0])

    return hook


def _exit_hook(capture: _Capture, rule: Callable[[nn.Module], ActivationRule] | None) -> Callable[..., None]:
    def hook(_module: nn.Module, _args: tuple[Any, ...], _output: Any) -> None:
        capture.module_stack.pop()
        if rule is not None:
            capture.activation_depth -= 1

    return hook


def find_layers(model: nn.Module, inputs: Tensor) -> list[LayerInfo]:
    """List the activation layers of a model in forward order, with their unit counts.

    Runs one forward pass without gradients on ``inputs`` (use a small batch), in eval mode; the model's
    training flags are restored afterwards.

    Args:
        model: The network.
        inputs: A batch of example inputs ``[B, *input_shape]`` as the model takes them.

    Returns:
        One :class:`LayerInfo` per activation call. Empty when the model has no supported activation.

    Raises:
        TypeError: If ``model`` is not an ``nn.Module`` or ``inputs`` is not a tensor.
        ValueError: If an activation's pre-activation is not batch-first.

    Examples:
        Activation modules are named by their qualified names, functional calls by the enclosing module and the
        function:

        >>> import torch
        >>> from torch import nn
        >>> from lightning_spacefold import find_layers
        >>> class Net(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.hidden = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
        ...         self.out = nn.Linear(8, 3)
        ...
        ...     def forward(self, x):
        ...         return torch.tanh(self.out(self.hidden(x)))
        >>> for layer in find_layers(Net(), torch.zeros(1, 4)):
        ...     print(layer)
        LayerInfo(name='hidden.1', activation='ReLU', num_units=8)
        LayerInfo(name='tanh', activation='F.tanh', num_units=3)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    if not isinstance(inputs, Tensor):
        raise TypeError(f"`inputs` must be a torch.Tensor batch, got {type(inputs).__name__}.")
    with evaluation_mode(model), capture_activations(model, lambda _position, z, _rule: z) as capture:
        model(inputs)
    pre_activations = capture.values
    names = capture.names
    for name, z in zip(names, pre_activations, strict=True):
        check_batch_first(name, z, len(inputs))
    return [
        LayerInfo(name, activation, z[0].numel())
        for name, activation, z in zip(names, capture.activations, pre_activations, strict=True)
    ]


def check_batch_first(name: str, pre_activation: Tensor, batch_size: int) -> None:
    """Raise a clear error when a layer's pre-activation does not have one row per input."""
    if pre_activation.ndim == 0 or pre_activation.shape[0] != batch_size:
        raise ValueError(
            f"Activation layer {name!r} received a tensor of shape {tuple(pre_activation.shape)} for a batch of "
            f"{batch_size} inputs; folding needs batch-first activations (one row per input). Restrict "
            f"`layers` to the batch-first layers or make the model batch-first."
        )


@contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """Run the block in eval mode without gradients, then restore every module's training flag."""
    flags = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in flags.items():
            module.training = training  # per module: a user may have frozen submodules in eval mode
