"""Finding the activation layers of a model and capturing what enters them during a forward pass.

An activation layer is one call of an activation: an activation module (``nn.ReLU``, ``nn.GELU``, ... or a
registered custom module) or an activation called functionally (``F.relu``, ``torch.tanh``, ``x.relu_()``, ...).
Module calls are seen through forward pre-hooks, functional calls through a :class:`~torch.overrides.TorchFunctionMode`;
a functional call made inside an activation module (``nn.ReLU`` calls ``F.relu``) belongs to that module and is not
counted again. The captured tensor is always the pre-activation, taken before the call, so in-place activations
give the bits of their input.

Layer names: the module's qualified name (``features.1``); for a functional call the enclosing module's name and
the function (``block.relu``, or ``relu`` at the top level), except inside an activation written as a module
around functional calls (a class named like an activation, without submodules or parameters of its own, such as
Hugging Face's ``NewGELUActivation``, which calls ``torch.tanh``): such a call is named after the module
(``h.0.mlp.act``). A model wrapped by ``torch.compile`` has the names of the model it wraps. A name that occurs
several times in one forward pass (a shared module, a loop) gets ``#1``, ``#2``, ... in call order.

Gated units (SwiGLU, ``silu(u) * v`` in LLaMA-style MLPs) are declared with :func:`register_swiglu`: the product
that enters the MLP's output projection is then the layer, with the papers' bit (``silu(u) * v > 0``).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lightning_spacefold.measure import greater_than_zero

__all__ = [
    "ActivationRule",
    "LayerInfo",
    "LayersChangedError",
    "activation_modules",
    "capture_activations",
    "check_forward",
    "find_layers",
    "has_functional_layers",
    "register_activation",
    "register_swiglu",
]


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

    bits: Callable[[Tensor], Tensor] = greater_than_zero
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
    rule = ActivationRule(bits or greater_than_zero, None if kinks is None else tuple(float(k) for k in kinks))
    _MODULE_RULES[module_type] = _constant(rule)


def _module_rule(module: nn.Module) -> Callable[[nn.Module], ActivationRule] | None:
    if hasattr(module, _GATED_PRODUCT):
        return _constant(_SMOOTH)
    for cls in type(module).__mro__:
        if cls in _MODULE_RULES:
            return _MODULE_RULES[cls]
    return None


@dataclass(frozen=True)
class LayerInfo:
    """One activation layer of a model, as seen in a forward pass.

    Attributes:
        name: Stable, readable name (see the module docstring).
        activation: The activation module's class name, or ``F.<name>`` for a functional call (``F.<name> in
            <class name>`` inside an activation written as a module around functional calls).
        num_units: Units per sample (the flattened size of the pre-activation of one input).
        module: Qualified name of the module that ran it: the activation module, or the innermost module whose
            forward made the functional call (``""`` for the model itself).
    """

    name: str
    activation: str
    num_units: int
    module: str = field(default="", repr=False)


def _unique_names(base_names: list[str]) -> list[str]:
    counts = Counter(base_names)
    seen: Counter[str] = Counter()
    names = []
    for base in base_names:
        seen[base] += 1
        names.append(f"{base}#{seen[base]}" if counts[base] > 1 else base)
    return names


class _Frame(NamedTuple):
    """A module being run, on the capture's stack."""

    name: str
    wrapper: str | None  # the class name of an activation-like module: its functional calls take its name
    gated_mlp: bool  # a declared gated MLP: its own activation calls are part of its units


class LayersChangedError(ValueError):
    """A forward pass ran other activation layers than the ones the measurement expected."""


class _Capture:
    """State of one capture: the module stack and what each activation call produced."""

    def __init__(
        self,
        transform: Callable[[int, Tensor, ActivationRule], Any],
        select: frozenset[int] | None,
        expected: Sequence[LayerInfo] | None,
    ) -> None:
        self.transform = transform
        self.select = select
        self.expected = expected
        self.expected_names = None if expected is None else [layer.name for layer in expected]
        self.module_stack: list[_Frame] = []
        self.activation_depth = 0
        self.gated_depth = 0  # inside a declared gated MLP, whose own activation calls are not layers
        self.transforming = False
        self.base_names: list[str] = []
        self.modules: list[str] = []
        self.activations: list[str] = []
        self.values: list[Any] = []

    def record(
        self, base_name: str, module: str, activation: str, rule: ActivationRule, pre_activation: Tensor
    ) -> None:
        index = len(self.base_names)
        self.base_names.append(base_name)
        self.modules.append(module)
        self.activations.append(activation)
        # Checked before the transform, which relies on the expected layers' positions.
        if self.expected is not None and (index >= len(self.expected) or self.expected[index].activation != activation):
            self.raise_changed()
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
        self.base_names, self.modules, self.activations, self.values = [], [], [], []

    def check_pass(self) -> None:
        """After a forward pass: raise :class:`LayersChangedError` unless it ran exactly the expected layers."""
        if self.expected_names is not None and self.names != self.expected_names:
            self.raise_changed()

    def raise_changed(self) -> None:
        assert self.expected is not None
        raise LayersChangedError(
            f"The model ran {len(self.expected)} activation layers on one batch and other ones on another (now "
            f"{', '.join(self.names[:5])}{', ...' if len(self.names) > 5 else ''}); folding needs the same layers for "
            "every input (no data-dependent control flow)."
        )


class _FunctionalActivations(TorchFunctionMode):
    def __init__(self, capture: _Capture) -> None:
        super().__init__()
        self.capture = capture

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        capture = self.capture
        counted = capture.activation_depth == 0 and capture.gated_depth == 0 and not capture.transforming
        if func in _FUNCTION_LOOKUP and counted:
            name, rule = _FUNCTION_LOOKUP[func]
            owner, wrapper, _ = capture.module_stack[-1] if capture.module_stack else ("", None, False)
            if wrapper is not None:
                layer, activation = owner, f"F.{name} in {wrapper}"
            else:
                layer, activation = f"{owner}.{name}" if owner else name, f"F.{name}"
            capture.record(layer, owner, activation, rule(args, kwargs), args[0] if args else kwargs["input"])
        return func(*args, **kwargs)


@contextmanager
def capture_activations(
    model: nn.Module,
    transform: Callable[[int, Tensor, ActivationRule], Any],
    select: frozenset[int] | None = None,
    functional: bool = True,
    expected: Sequence[LayerInfo] | None = None,
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
        expected: The layers every forward pass must run (:func:`find_layers`); a call of another kind, or one
            more call, raises :class:`LayersChangedError` before its transform, and ``check_pass()`` compares the
            names after a pass. Only the modules that ran the expected functional calls are then hooked (hooks on
            every module of a large network cost up to a fifth of its forward pass).

    Yields:
        The capture state.
    """
    capture = _Capture(transform, select, expected)
    # Functional calls are named after the module around them: with the layers known, only those modules need hooks.
    owners = None if expected is None else {layer.module for layer in expected}
    handles = []
    try:
        for qualified_name, module in model.named_modules():
            rule = _module_rule(module)
            name = _without_wrappers(qualified_name)
            names_calls = functional and (owners is None or name in owners)
            if rule is None and not names_calls and not hasattr(module, _GATED_MLP):
                continue
            handles.append(module.register_forward_pre_hook(_enter_hook(capture, name, module, rule)))
            handles.append(module.register_forward_hook(_exit_hook(capture, rule), always_call=True))
        with _FunctionalActivations(capture) if functional else nullcontext():
            yield capture
    finally:
        for handle in handles:
            handle.remove()


def _without_wrappers(qualified_name: str) -> str:
    """The name as the user's model has it: without the ``_orig_mod`` level that ``torch.compile`` inserts."""
    return ".".join(part for part in qualified_name.split(".") if part != "_orig_mod")


def has_functional_layers(layers: Sequence[LayerInfo]) -> bool:
    """Whether any of the layers is a functional call (so capturing needs ``functional=True``)."""
    return any(layer.activation.startswith("F.") for layer in layers)


def _enter_hook(
    capture: _Capture, name: str, module: nn.Module, rule: Callable[[nn.Module], ActivationRule] | None
) -> Callable[..., None]:
    frame = _Frame(
        name,
        type(module).__name__ if rule is None and _is_activation_like(module) else None,
        hasattr(module, _GATED_MLP),
    )
    gated_product = hasattr(module, _GATED_PRODUCT)
    activation = "SwiGLU" if gated_product else type(module).__name__

    def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
        capture.module_stack.append(frame)
        if rule is not None:
            # A declared gated product is read inside its MLP; any other activation there is part of the unit.
            outermost = capture.activation_depth == 0 and not capture.transforming
            outermost = outermost and (capture.gated_depth == 0 or gated_product)
            # Counted before recording: the exit hook always runs, also when the transform raises.
            capture.activation_depth += 1
            if outermost:
                capture.record(name or type(module).__name__, name, activation, rule(module), args[0])
        capture.gated_depth += frame.gated_mlp

    return hook


def _exit_hook(capture: _Capture, rule: Callable[[nn.Module], ActivationRule] | None) -> Callable[..., None]:
    def hook(_module: nn.Module, _args: tuple[Any, ...], _output: Any) -> None:
        capture.gated_depth -= capture.module_stack.pop().gated_mlp
        if rule is not None:
            capture.activation_depth -= 1

    return hook


def _is_activation_like(module: nn.Module) -> bool:
    """An activation written as a module around functional calls, e.g. Hugging Face's ``NewGELUActivation``.

    Recognised by its class name and by having neither submodules nor parameters of its own.
    """
    return (
        _ACTIVATION_CLASS_NAME.search(type(module).__name__) is not None
        and next(module.children(), None) is None
        and next(module.parameters(recurse=False), None) is None
    )


_ACTIVATION_CLASS_NAME = re.compile(r"activation|gelu|silu|swish|mish|relu|sigmoid|tanh|softplus", re.IGNORECASE)


# Attributes that register_swiglu sets on the modules of a model (attributes, so that they travel with the model to
# other processes): the output projection whose input is the gated product, and the MLP around it.
_GATED_PRODUCT = "_spacefold_gated_product"
_GATED_MLP = "_spacefold_gated_mlp"


def register_swiglu(model: nn.Module, projection: str = "down_proj") -> list[str]:
    """Declare the SwiGLU units of LLaMA-style gated MLPs, with the papers' bit: 1 iff ``silu(u) * v > 0``.

    A gated MLP computes ``projection(act(gate(x)) * up(x))``; its units are the products ``silu(u) * v``, whose
    bit is 1 iff ``u`` and ``v`` have the same sign. After this call, the input of every submodule named
    ``projection`` (the last part of its qualified name) is an activation layer named after that submodule, with
    activation ``SwiGLU``, and the activations called inside the MLP around it (the SiLU of ``u``) are no longer
    layers of their own. The declaration is stored on the model's modules (it travels with the model, e.g. to DDP
    processes). Exact traversal does not apply: the unit is not piecewise linear.

    Args:
        model: The network, e.g. a Hugging Face ``LlamaForCausalLM``.
        projection: The name of the output projection in each gated MLP (``down_proj`` in LLaMA, Mistral, Qwen).

    Returns:
        The qualified names of the declared layers, in module order.

    Raises:
        TypeError: If ``model`` is not an ``nn.Module`` or ``projection`` is not a string.
        ValueError: If no submodule is named ``projection``.

    Examples:
        >>> class GatedMLP(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.gate_proj, self.up_proj, self.down_proj = nn.Linear(2, 4), nn.Linear(2, 4), nn.Linear(4, 2)
        ...
        ...     def forward(self, x):
        ...         return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        >>> model = nn.Sequential(GatedMLP(), GatedMLP())
        >>> register_swiglu(model)
        ['0.down_proj', '1.down_proj']
        >>> [(layer.name, layer.activation, layer.num_units) for layer in find_layers(model, torch.randn(1, 2))]
        [('0.down_proj', 'SwiGLU', 4), ('1.down_proj', 'SwiGLU', 4)]
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    if not isinstance(projection, str):
        raise TypeError(f"`projection` must be the name of the output projection, got {projection!r}.")
    modules = dict(model.named_modules())
    declared = [name for name in modules if name.rpartition(".")[2] == projection]
    if not declared:
        raise ValueError(
            f"No submodule of {type(model).__name__} is named {projection!r}; pass `projection`, the name of the "
            "gated MLPs' output projection (the module that receives silu(u) * v)."
        )
    for name in declared:
        setattr(modules[name], _GATED_PRODUCT, True)
        setattr(modules[name.rpartition(".")[0]], _GATED_MLP, True)
    return [_without_wrappers(name) for name in declared]


def find_layers(model: nn.Module, inputs: Tensor, forward: Callable[[Tensor], Any] | None = None) -> list[LayerInfo]:
    """List the activation layers of a model in forward order, with their unit counts.

    Runs one forward pass without gradients on ``inputs`` (use a small batch), in eval mode; the model's
    training flags are restored afterwards.

    Args:
        model: The network.
        inputs: A batch of example inputs ``[B, *input_shape]`` as the model (or ``forward``) takes them.
        forward: The function that maps the batch to outputs, with the model's layers inside (for example the part
            of a language model after its embedding); ``model`` itself by default.

    Returns:
        One :class:`LayerInfo` per activation call. Empty when the model has no supported activation.

    Raises:
        TypeError: If ``model`` is not an ``nn.Module``, ``inputs`` is not a tensor or ``forward`` is not callable.
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
    check_forward(forward)
    if not isinstance(inputs, Tensor):
        raise TypeError(f"`inputs` must be a torch.Tensor batch, got {type(inputs).__name__}.")
    with evaluation_mode(model), capture_activations(model, lambda _position, z, _rule: z) as capture:
        (model if forward is None else forward)(inputs)
    pre_activations = capture.values
    names = capture.names
    for name, z in zip(names, pre_activations, strict=True):
        check_batch_first(name, z, len(inputs))
    return [
        LayerInfo(name, activation, z[0].numel(), module)
        for name, activation, z, module in zip(
            names, capture.activations, pre_activations, capture.modules, strict=True
        )
    ]


def activation_modules(model: nn.Module) -> list[str]:
    """Qualified names of the model's activation modules (those with a registered rule), in definition order."""
    return [name for name, module in model.named_modules() if _module_rule(module) is not None]


def check_forward(forward: object) -> None:
    """Raise a clear TypeError when ``forward`` is neither ``None`` nor callable."""
    if forward is not None and not callable(forward):
        raise TypeError(
            f"`forward` must be None (call the model) or a callable mapping a batch of points to outputs, got "
            f"{type(forward).__name__}."
        )


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
    if any(flags.values()):
        model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in flags.items():
            if module.training != training:  # per module: a user may have frozen submodules in eval mode
                module.training = training
