"""compile=True: the same results as eager measurement, compiled once per model and shape, eager when it cannot be.

The plumbing is tested with a counting backend that runs the traced graph as it is (no code generation); one test
compiles tiny MLPs with the default inductor backend (activation modules; functional calls, wrapped and bare).
"""

from __future__ import annotations

import gc
import warnings
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import lightning_spacefold.callback as callback_module
import lightning_spacefold.compiled as compiled
from lightning_spacefold import (
    SpaceFoldingCallback,
    path_folding,
    path_patterns,
    register_activation,
    register_swiglu,
)
from lightning_spacefold.capture import LayerInfo
from lightning_spacefold.compiled import pack_bits
from lightning_spacefold.finite import NonFiniteError
from lightning_spacefold.measure import pack_words
from tests.test_callback import Blobs, Classifier, trainer
from tests.test_capture import Mixed

FIELDS = ("chi", "r1", "r2", "layer_chi", "layer_r1", "layer_r2", "chi_max", "layer_chi_max", "distances", "walked")


class Counting:
    """A backend that counts the graphs it compiles and runs them as traced."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, graph: torch.fx.GraphModule, _inputs: list[Tensor]):
        self.graphs += 1
        return graph.forward


@pytest.fixture
def backend(monkeypatch: pytest.MonkeyPatch) -> Counting:
    counting = Counting()
    monkeypatch.setattr(compiled, "BACKEND", counting)
    return counting


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 70), nn.ReLU(), nn.Linear(70, 8), nn.ReLU(), nn.Linear(8, 3))


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(48, 5), nn.Tanh())


def segments(paths: int = 7) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(0)
    return 3 * torch.randn(paths, 1, 3, 4, generator=generator), 3 * torch.randn(paths, 1, 3, 4, generator=generator)


def assert_same(compiled_result, eager_result) -> None:
    for field in FIELDS:
        value, expected = getattr(compiled_result, field), getattr(eager_result, field)
        assert (value is None and expected is None) or torch.equal(value, expected), field


def test_pack_bits_equals_pack_words() -> None:
    bits = torch.rand(5, 3, 130) > 0.5
    bits[0, 0, 63] = bits[1, 0, 127] = True  # the sign bits
    assert torch.equal(pack_bits(bits), pack_words(bits))
    assert pack_bits(torch.tensor([[True] + [False] * 63])).item() == 1


@pytest.mark.parametrize("make", [mlp, cnn])
def test_same_results_as_eager_compiled_once_last_chunk_padded(make, backend: Counting) -> None:
    model, (starts, ends) = make(), segments()
    # 7 paths x 41 points in passes of 25 points: groups of fewer paths and a last, shorter chunk (padded).
    kwargs = {"steps": 40, "batch_size": 25, "return_distances": True}
    eager = path_folding(model, starts, ends, **kwargs)
    assert eager.chi.max() > 0  # the test sees folding
    for _ in range(3):
        assert_same(path_folding(model, starts, ends, compile=True, **kwargs), eager)
    assert backend.graphs == 1  # one graph, compiled once: no recompilation for the last chunk or later calls
    layers = ["2"] if make is mlp else ["4"]
    assert_same(
        path_folding(model, starts, ends, layers=layers, compile=True, **kwargs),
        path_folding(model, starts, ends, layers=layers, **kwargs),
    )


def test_the_first_affine_module_is_evaluated_at_the_segments_ends(backend: Counting) -> None:
    model, (starts, ends) = mlp(), segments()
    path_folding(model, starts, ends, steps=8, compile=True)
    (step,) = compiled._STEPS[model].steps.values()
    assert step.affine == "1"
    model[1].forward = lambda x: pytest.fail("the points went through the first Linear")  # the step replaces it
    with torch.no_grad():
        path_folding(model, starts, ends, steps=8, compile=True)
    assert model[1].forward is not None and "forward" in vars(model[1])  # the user's own forward is put back


def test_path_patterns(backend: Counting) -> None:
    model, (starts, ends) = cnn(), segments()
    for _ in range(2):
        assert torch.equal(
            path_patterns(model, starts, ends, steps=9, compile=True), path_patterns(model, starts, ends, steps=9)
        )
    assert backend.graphs == 1


def test_under_autocast(backend: Counting) -> None:
    model, (starts, ends) = mlp(), segments()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = path_folding(model, starts, ends, steps=16)
        assert_same(path_folding(model, starts, ends, steps=16, compile=True), eager)
    assert_same(path_folding(model, starts, ends, steps=16, compile=True), path_folding(model, starts, ends, steps=16))
    assert backend.graphs == 2  # autocast is part of the key


def test_in_place_activation_gives_the_bits_of_its_input(backend: Counting) -> None:
    class ClampUp(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return x.clamp_(min=0.5)

    register_activation(ClampUp, bits=lambda z: z < 0)
    torch.manual_seed(0)
    model, (starts, ends) = nn.Sequential(nn.Flatten(), nn.Linear(12, 9), ClampUp(), nn.Linear(9, 2)), segments()
    assert_same(path_folding(model, starts, ends, steps=12, compile=True), path_folding(model, starts, ends, steps=12))


def test_non_finite_values_are_reported(backend: Counting) -> None:
    model, (starts, ends) = mlp(), segments()
    with torch.no_grad():
        model[3].weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="fed layer '4'"):
        path_folding(model, starts, ends, steps=8, compile=True)


class GELU(nn.Module):
    """An activation written as a module around a functional call, as timm's (ConvNeXt) and Hugging Face's."""

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(x)


class ClipActivation(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return F.hardtanh(x, -2.0, 2.0)


class ShiftedTanhActivation(nn.Module):
    """An activation-like module whose functional call does not take its input: the step cannot hook it."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x - 1)


def wrapped() -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 9), GELU(), nn.Linear(9, 6), ClipActivation(), nn.Linear(6, 2))
    return model, *segments()


def transformer() -> tuple[nn.Module, Tensor, Tensor]:
    """``F.relu`` called bare by each ``nn.TransformerEncoderLayer`` (on its slow path, which eager capture takes)."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=4, nhead=2, dim_feedforward=6, batch_first=True)
    starts, ends = segments()
    return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False), starts[:, 0], ends[:, 0]


def mixed() -> tuple[nn.Module, Tensor, Tensor]:
    """A shared and an in-place ReLU module, then ``torch.tanh``, ``F.gelu`` and ``.relu_()`` at the top level."""
    torch.manual_seed(0)
    return Mixed(), 3 * torch.randn(7, 3), 3 * torch.randn(7, 3)


@pytest.mark.parametrize("make", [wrapped, transformer, mixed])
def test_functional_activations_are_compiled(make, backend: Counting) -> None:
    model, starts, ends = make()
    eager = path_folding(model, starts, ends, steps=12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not measured eagerly
        for _ in range(2):
            assert_same(path_folding(model, starts, ends, steps=12, compile=True), eager)
        assert torch.equal(
            path_patterns(model, starts, ends, steps=12, compile=True), path_patterns(model, starts, ends, steps=12)
        )
    assert backend.graphs == 2  # one step for path_folding, one for path_patterns
    if make is wrapped:  # the functional's rule, taken from its call
        (step, _) = compiled._STEPS[model].steps.values()
        assert step.hooked == ["2", "4"] and step.rules[1].kinks == (-2.0, 2.0)


def test_only_bare_functional_calls_hook_the_modules_exits() -> None:
    # Exit hooks that count the depth made compiled ResNet-18 1.15x slower: only bare functional calls need them.
    recorder = compiled._Recorder(lambda _z: None)
    relu, owner = nn.ReLU(), nn.Linear(2, 2)
    with recorder.hooked([relu], []):
        assert len(relu._forward_pre_hooks) == 1 and not relu._forward_hooks
    with recorder.hooked([relu], [owner]):
        assert len(relu._forward_hooks) == 1 and len(owner._forward_pre_hooks) == 1
    assert not relu._forward_pre_hooks and not relu._forward_hooks and not owner._forward_pre_hooks


class SwiGLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(12, 4), nn.Linear(12, 4), nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(1)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def swiglu() -> nn.Module:
    torch.manual_seed(0)
    model = SwiGLU()
    register_swiglu(model)
    return model


def shifted_tanh() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 9), ShiftedTanhActivation(), nn.Linear(9, 2))


@pytest.mark.parametrize(
    ("make", "reason"), [(swiglu, "SwiGLU units"), (shifted_tanh, "does not see the pre-activation of layer '2'")]
)
def test_unsupported_layers_are_measured_eagerly_with_one_warning(make, reason: str, backend: Counting) -> None:
    model, (starts, ends) = make(), segments()
    with pytest.warns(UserWarning, match=reason):
        result = path_folding(model, starts, ends, steps=8, compile=True)
    assert_same(result, path_folding(model, starts, ends, steps=8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path_folding(model, starts, ends, steps=8, compile=True)
    assert backend.graphs == 0


def test_a_failing_compile_falls_back_to_eager_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def failing(_graph: torch.fx.GraphModule, _inputs: list[Tensor]):
        calls.append(1)
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(compiled, "BACKEND", failing)
    model, (starts, ends) = mlp(), segments()
    with pytest.warns(UserWarning, match="torch.compile failed .*no compiler here"):
        result = path_folding(model, starts, ends, steps=8, compile=True)
    assert_same(result, path_folding(model, starts, ends, steps=8))
    # Nothing left behind: no hooks, the modules' own forwards, and the failure remembered (no retry, no warning).
    assert all(not module._forward_pre_hooks and "forward" not in vars(module) for module in model.modules())
    assert calls == [1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_same(path_folding(model, starts, ends, steps=8, compile=True), result)
    assert calls == [1]


def test_bad_arguments() -> None:
    model, (starts, ends) = mlp(), segments()
    with pytest.raises(ValueError, match="cannot be combined with `exact=True`"):
        path_folding(model, starts, ends, exact=True, compile=True)
    with pytest.raises(TypeError, match="`compile` must be a bool"):
        path_folding(model, starts, ends, compile="yes")
    with pytest.raises(TypeError, match="`compile` must be a bool"):
        path_patterns(model, starts, ends, compile=1)
    with pytest.raises(ValueError, match="cannot be combined with `exact=True`"):
        SpaceFoldingCallback(exact=True, compile=True)
    with pytest.raises(TypeError, match="`compile` must be a bool"):
        SpaceFoldingCallback(compile="yes")


def test_a_replaced_activation_is_found_again(backend: Counting) -> None:
    model, (starts, ends) = mlp(), segments()
    path_folding(model, starts, ends, steps=8, compile=True)
    model[4] = nn.Tanh()
    result = path_folding(model, starts, ends, steps=8, compile=True)
    assert_same(result, path_folding(model, starts, ends, steps=8))


def test_the_cache_does_not_keep_the_model_alive(backend: Counting) -> None:
    model, (starts, ends) = mlp(), segments()
    path_folding(model, starts, ends, steps=8, compile=True)
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None


def test_callback_compiles_once_over_its_measurements(
    tmp_path: Path, backend: Counting, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    budgets: list[tuple[bool, nn.Module | None]] = []
    default_batch_size = callback_module.default_batch_size

    def recorded(
        layers: list[LayerInfo], inputs: torch.Tensor, compiled: bool = False, model: nn.Module | None = None
    ) -> int:
        budgets.append((compiled, model))
        return default_batch_size(layers, inputs, compiled, model)

    monkeypatch.setattr(callback_module, "default_batch_size", recorded)
    callback = SpaceFoldingCallback(
        every_n_train_steps=2, num_pairs=9, steps=16, probe_size=30, pairing="random", log_figures=False, compile=True
    )
    model = Classifier()
    trainer(tmp_path, callback, max_steps=4).fit(model, datamodule=Blobs())
    assert callback.latest_step == 4 and backend.graphs == 1  # measured at steps 0, 2 and 4
    assert budgets == [(True, model)]  # the passes sized for compiled code and the model's weights
    pairs = callback._drawn
    assert torch.equal(callback.latest_result.chi, path_folding(model, pairs.starts, pairs.ends, steps=16).chi)


def test_a_step_failing_with_the_inductor_options_compiles_without_them(monkeypatch: pytest.MonkeyPatch) -> None:
    # An option inductor refuses stands for options whose generated code fails (memory planning before torch 2.14).
    monkeypatch.setattr(compiled, "INDUCTOR_OPTIONS", {"no_such_option": True})
    options = []
    compile_with = torch.compile

    def recording(*args: Any, **kwargs: Any) -> Any:
        options.append(kwargs.get("options"))
        return compile_with(*args, **kwargs)

    monkeypatch.setattr(torch, "compile", recording)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
    starts, ends = 3 * torch.randn(4, 3), 3 * torch.randn(4, 3)
    eager = path_folding(model, starts, ends, steps=10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert_same(path_folding(model, starts, ends, steps=10, compile=True), eager)
    assert not [warning for warning in caught if "compile=True" in str(warning.message)]
    assert options == [{"no_such_option": True}, None]
    assert compiled._STEPS[model].steps  # compiled the second time, not measured eagerly


class Residual(nn.Module):  # not named like an activation: its call is a bare functional call
    def forward(self, x: Tensor) -> Tensor:
        return x + F.relu(x)


@pytest.mark.parametrize("functional", [False, True])
def test_inductor_on_a_tiny_mlp(functional: bool) -> None:
    torch.manual_seed(0)
    hidden = [GELU(), nn.Linear(8, 8), Residual()] if functional else [nn.ReLU()]
    model = nn.Sequential(nn.Linear(3, 8), *hidden, nn.Linear(8, 2))
    starts, ends = 3 * torch.randn(4, 3), 3 * torch.randn(4, 3)
    eager = path_folding(model, starts, ends, steps=10, return_distances=True)
    assert_same(path_folding(model, starts, ends, steps=10, return_distances=True, compile=True), eager)
    assert compiled._STEPS[model].steps  # compiled, not measured eagerly
