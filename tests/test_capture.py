"""Finding activation layers and capturing their pre-activations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_spacefold import find_layers, path_folding, register_activation
from lightning_spacefold.capture import _MODULE_RULES, _SMOOTH, capture_activations


class Mixed(nn.Module):
    """A shared ReLU used twice, an in-place ReLU, functional calls at two depths and a tensor method."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 5)
        self.fc2 = nn.Linear(5, 5)
        self.block = nn.Sequential(nn.Linear(5, 4))
        self.act = nn.ReLU()
        self.inplace = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.fc1(x))
        x = self.act(self.fc2(x))
        x = self.inplace(x - 0.5)
        x = torch.tanh(self.block(x))
        return F.gelu(x).relu_()


def test_names_units_and_kinds_in_forward_order() -> None:
    layers = find_layers(Mixed(), torch.randn(2, 3))
    assert [(layer.name, layer.activation, layer.num_units) for layer in layers] == [
        ("act#1", "ReLU", 5),
        ("act#2", "ReLU", 5),
        ("inplace", "ReLU", 5),
        ("tanh", "F.tanh", 4),
        ("gelu", "F.gelu", 4),
        ("relu", "F.relu", 4),
    ]


def test_functional_call_is_named_after_its_module() -> None:
    class Block(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.leaky_relu(x) + F.silu(x)

    model = nn.Sequential(nn.Linear(2, 3), Block())
    assert [layer.name for layer in find_layers(model, torch.randn(1, 2))] == ["1.leaky_relu", "1.silu"]


def test_conv_feature_maps_are_flattened_per_sample() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Sigmoid())
    assert [(layer.name, layer.num_units) for layer in find_layers(model, torch.randn(2, 1, 6, 6))] == [
        ("1", 4 * 6 * 6),
        ("4", 4 * 3 * 3),
    ]


def test_captures_pre_activation_of_in_place_activations() -> None:
    model = Mixed()
    x = torch.randn(4, 3)
    expected = model.act(model.fc2(model.act(model.fc1(x)))) - 0.5
    with capture_activations(model, lambda _position, z, _rule: z.clone()) as capture:
        model(x)
    torch.testing.assert_close(capture.values[2], expected)
    assert (capture.values[2] < 0).any()  # the input really had negative entries, which ReLU zeroes in place


def test_selected_layers_only_are_transformed_and_positions_count_them() -> None:
    model = Mixed()
    with capture_activations(model, lambda position, z, _rule: position, frozenset({1, 4})) as capture:
        model(torch.randn(2, 3))
    assert capture.values == [0, 1]
    assert len(capture.base_names) == 6


def test_kinks_of_piecewise_linear_activations() -> None:
    model = nn.Sequential(nn.ReLU6(), nn.Hardtanh(-2.0, 3.0), nn.LeakyReLU(), nn.GELU())

    def forward(x: torch.Tensor) -> torch.Tensor:
        return F.hardtanh(model(x), -0.5, max_val=0.25)

    with capture_activations(model, lambda _position, _z, rule: rule.kinks) as capture:
        forward(torch.randn(2, 3))
    assert capture.values == [(0.0, 6.0), (-2.0, 3.0), (0.0,), None, (-0.5, 0.25)]


def test_custom_activation_counts_once_with_its_bit_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    class Shifted(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.relu(x - 1)

    monkeypatch.setattr("lightning_spacefold.capture._MODULE_RULES", dict(_MODULE_RULES))
    register_activation(Shifted, bits=lambda z: z > 1, kinks=(1.0,))
    model = nn.Sequential(nn.Linear(2, 3), Shifted())
    assert [layer.name for layer in find_layers(model, torch.randn(1, 2))] == ["1"]
    x = torch.randn(5, 2)
    with capture_activations(model, lambda _position, z, rule: (rule.bits(z), rule.kinks)) as capture:
        model(x)
    bits, kinks = capture.values[0]
    assert torch.equal(bits, model[0](x) > 1)
    assert kinks == (1.0,)


def test_register_activation_rejects_bad_arguments() -> None:
    with pytest.raises(TypeError, match="nn.Module subclass"):
        register_activation(lambda x: x)
    with pytest.raises(TypeError, match="callable"):
        register_activation(nn.Identity, bits=3)
    with pytest.raises(TypeError, match="tuple of numbers"):
        register_activation(nn.Identity, kinks=[0.0])


def test_transform_operations_are_not_layers() -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU())
    with capture_activations(model, lambda _position, z, _rule: torch.sigmoid(z).relu()) as capture:
        model(torch.randn(2, 2))
    assert capture.base_names == ["1"]


def test_hooks_removed_and_flags_restored_when_forward_raises() -> None:
    class Failing(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 2)
            self.act = nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.act(self.fc(x))
            raise RuntimeError("boom")

    model = Failing().train()
    model.fc.eval()
    with pytest.raises(RuntimeError, match="boom"):
        find_layers(model, torch.randn(1, 2))
    assert model.training and not model.fc.training and model.act.training
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
    assert not torch.overrides._get_current_function_mode_stack()


def test_activation_that_is_not_batch_first_is_rejected() -> None:
    class SequenceFirst(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(x.transpose(0, 1))

    with pytest.raises(ValueError, match="batch-first"):
        find_layers(SequenceFirst(), torch.randn(1, 4, 3))


def test_find_layers_rejects_bad_arguments() -> None:
    with pytest.raises(TypeError, match="nn.Module"):
        find_layers(lambda x: x, torch.randn(1, 2))
    with pytest.raises(TypeError, match="torch.Tensor"):
        find_layers(nn.ReLU(), [1.0])


def test_a_raising_transform_leaves_the_capture_consistent() -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU())
    calls = []

    def transform(_position: int, z: torch.Tensor, _rule) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 1:
            raise StopIteration  # e.g. stopping the forward early
        return z

    with capture_activations(model, transform) as capture:
        with pytest.raises(StopIteration):
            model(torch.randn(2, 2))
        capture.reset()
        model(torch.randn(2, 2))
    assert capture.base_names == ["1"] and capture.activation_depth == 0


def test_a_functional_call_inside_an_activation_module_takes_the_modules_name() -> None:
    class Swish(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * torch.sigmoid(x)

    class Scale(nn.Module):  # not named like an activation: its call keeps the function's name
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.tanh(2 * x)

    model = nn.Sequential(nn.Linear(2, 3), Swish(), nn.Linear(3, 3), Scale())
    found = [(layer.name, layer.activation) for layer in find_layers(model, torch.randn(1, 2))]
    assert found == [("1", "F.sigmoid in Swish"), ("3.tanh", "F.tanh")]


def test_a_compiled_model_has_the_names_of_the_model_it_wraps() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    compiled = torch.compile(model, backend="eager")  # no code generation: the names are the point here
    assert [layer.name for layer in find_layers(compiled, torch.randn(2, 2))] == ["1", "3"]
    starts, ends = torch.randn(4, 2) * 3, torch.randn(4, 2) * 3
    result = path_folding(compiled, starts, ends, steps=32)
    assert result.layer_names == ["1", "3"]
    assert torch.equal(result.r2, path_folding(model, starts, ends, steps=32).r2)


def test_exact_traversal_of_a_compiled_model_traverses_the_model_it_wraps() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU()).eval()
    with torch.no_grad():
        model[3].running_mean.uniform_(-1.0, 1.0)
        model[3].running_var.uniform_(0.5, 2.0)
    starts, ends = torch.randn(3, 2) * 3, torch.randn(3, 2) * 3
    expected = path_folding(model, starts, ends, exact=True)
    result = path_folding(torch.compile(model, backend="eager"), starts, ends, exact=True)
    assert result.layer_names == ["1", "4"]
    assert torch.equal(result.r2, expected.r2) and torch.equal(result.regions, expected.regions)
    assert bool((expected.regions > 3).all())


def test_layers_know_the_module_that_ran_them() -> None:
    layers = find_layers(Mixed(), torch.randn(2, 3))
    assert [layer.module for layer in layers] == ["act", "act", "inplace", "", "", ""]


def test_with_known_layers_only_the_modules_around_functional_calls_are_hooked() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 3))
            self.head = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.tanh(self.block(x)))

    model = Net()
    expected = find_layers(model, torch.randn(2, 2))
    hooked = []

    def hook_counts(_position: int, _z: torch.Tensor, _rule: object) -> None:
        hooked.append({name: len(module._forward_pre_hooks) for name, module in model.named_modules()})

    with capture_activations(model, hook_counts, expected=expected) as capture:
        model(torch.randn(2, 2))
        capture.check_pass()
    assert hooked == [{"": 1, "block": 0, "block.0": 0, "block.1": 0, "head": 0}]
    assert capture.names == ["tanh"]
    with capture_activations(model, hook_counts):
        model(torch.randn(2, 2))
    assert hooked[-1] == {"": 1, "block": 1, "block.0": 1, "block.1": 1, "head": 1}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_default_bits_are_z_greater_than_zero_in_every_dtype(dtype: torch.dtype) -> None:
    # Zeros of both signs, the smallest subnormals (of float32 and float64), NaN, infinities and ordinary values;
    # NumPy compares on CPU except in bfloat16, which it lacks.
    values = [-0.0, 0.0, 1e-45, -1e-45, 5e-324, float("nan"), float("inf"), float("-inf"), 2.0, -3.0]
    z = torch.tensor([values, values[::-1]], dtype=torch.float64).to(dtype)
    expected = torch.tensor([[float(x) > 0 for x in row] for row in z.double().tolist()])
    bits = _SMOOTH.bits(z)
    assert bits.dtype == torch.bool
    assert torch.equal(bits, expected)
    assert torch.equal(_SMOOTH.bits(z.t()), expected.t())  # not contiguous
    assert torch.equal(_SMOOTH.bits(z.requires_grad_()), expected)
