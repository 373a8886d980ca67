"""path_folding against a plain per-point loop, hand-computed networks, model hygiene and bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_spacefold import fold_measure, folding, path_folding, path_patterns
from lightning_spacefold.capture import LayerInfo, capture_activations, evaluation_mode
from lightning_spacefold.folding import default_batch_size, segment_points, walk_layout, walk_passes


def per_point_reference(model: nn.Module, starts: torch.Tensor, ends: torch.Tensor, steps: int):
    """One forward per point; whole-network and per-layer chi, and the distance profile."""
    t = torch.arange(steps + 1, dtype=torch.float64) / steps
    chis, layer_chis, distances = [], [], []
    with evaluation_mode(model), capture_activations(model, lambda _p, z, rule: rule.bits(z).flatten(1)) as capture:
        for start, end in zip(starts, ends, strict=True):
            per_point = []
            for i in range(steps + 1):
                capture.reset()
                model(segment_points(start[None], end[None], t[i : i + 1]))
                per_point.append([bits[0] for bits in capture.values])
            layers = [torch.stack([point[index] for point in per_point]) for index in range(len(per_point[0]))]
            whole = torch.cat(layers, dim=1)
            chis.append(fold_measure(whole))
            layer_chis.append(torch.stack([fold_measure(bits) for bits in layers]))
            distances.append((whole != whole[:1]).sum(-1))
    return torch.stack(chis), torch.stack(layer_chis), torch.stack(distances)


class Residual(nn.Module):
    """Residual blocks sharing one ReLU module, an in-place ReLU and functional activations."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(4, 8)
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))
        self.shared = nn.ReLU()
        self.inplace = nn.ReLU(inplace=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inplace(self.stem(x))
        for block in self.blocks:
            x = x + self.shared(block(x))
        x = F.leaky_relu(x - 0.1) + torch.tanh(x)
        return self.head(x)


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(3, 4, 3),
        nn.GELU(),
        nn.Flatten(),
        nn.Linear(4, 5),
        nn.Sigmoid(),
        nn.Linear(5, 2),
    )


def mlp(activation: type[nn.Module], gain: float = 1.0) -> nn.Module:
    model = nn.Sequential(nn.Linear(3, 16), activation(), nn.Linear(16, 16), activation(), nn.Linear(16, 2))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(gain)
    return model


MODELS = {
    "relu-mlp": (lambda: mlp(nn.ReLU), (3,)),
    "leaky-mlp": (lambda: mlp(nn.LeakyReLU), (3,)),
    "gelu-mlp": (lambda: mlp(nn.GELU), (3,)),
    "tanh-mlp": (lambda: mlp(nn.Tanh), (3,)),
    "sigmoid-mlp": (lambda: mlp(nn.Sigmoid, gain=6.0), (3,)),  # saturating units fold only with large weights
    "cnn": (cnn, (1, 6, 6)),
    "residual": (Residual, (4,)),
}


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("batch_size", [None, 7])
def test_matches_per_point_loop(name: str, batch_size: int | None) -> None:
    torch.manual_seed(0)
    make, shape = MODELS[name]
    model = make().double()
    starts, ends = 3 * torch.randn(6, *shape, dtype=torch.float64), 3 * torch.randn(6, *shape, dtype=torch.float64)
    steps = 40
    result = path_folding(model, starts, ends, steps=steps, batch_size=batch_size, return_distances=True)
    chi, layer_chi, distances = per_point_reference(model, starts, ends, steps)
    assert torch.equal(result.chi, chi)
    assert torch.equal(result.layer_chi, layer_chi)
    assert torch.equal(result.distances, distances)
    assert torch.equal(result.r1, distances.amax(-1))
    assert result.chi.gt(0).any(), "the test network should fold some path"
    assert result.steps == steps and len(result) == 6


def test_layer_selection_measures_only_those_layers() -> None:
    torch.manual_seed(1)
    model = Residual().double()
    starts, ends = torch.randn(4, 4, dtype=torch.float64), torch.randn(4, 4, dtype=torch.float64)
    full = path_folding(model, starts, ends, steps=30)
    assert full.layer_names == ["inplace", "shared#1", "shared#2", "leaky_relu", "tanh"]
    part = path_folding(model, starts, ends, steps=30, layers=["tanh", "shared#1"])
    assert part.layer_names == ["shared#1", "tanh"]
    torch.testing.assert_close(part.layer_chi, full.layer_chi[:, [1, 4]])
    torch.testing.assert_close(part.layer_r2, full.layer_r2[:, [1, 4]])
    assert torch.equal(part.r2, full.layer_r2[:, [1, 4]].sum(-1))


class Tent(nn.Module):
    """1-D input; units u1 = x - 0.3, u2 = x - 0.7 and v = relu(u1) - 3 relu(u2) - 0.1.

    Along x from 0 to 1 the patterns (u1, u2, v) are 000 | 100 (0.3) | 101 (0.4) | 111 (0.7) | 110 (0.85):
    distances from the start 0, 1, 2, 3, 2, so r1 = 3, r2 = 4 and chi = 1/4. Backwards, from 110: distances
    0, 1, 2, 1, 2, so r1 = 2 and chi = 1/2. In both directions the first layer (u1, u2) never returns (chi 0) and
    v switches on and off again (r1 = 1, r2 = 2, chi = 1/2).
    """

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(1, 2)
        self.second = nn.Linear(2, 1)
        with torch.no_grad():
            self.first.weight.copy_(torch.tensor([[1.0], [1.0]]))
            self.first.bias.copy_(torch.tensor([-0.3, -0.7]))
            self.second.weight.copy_(torch.tensor([[1.0, -3.0]]))
            self.second.bias.copy_(torch.tensor([-0.1]))
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.second(self.act(self.first(x))))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_hand_computed_network_in_every_dtype(dtype: torch.dtype) -> None:
    model = Tent().to(dtype)
    starts, ends = torch.tensor([[0.0], [1.0]], dtype=dtype), torch.tensor([[1.0], [0.0]], dtype=dtype)
    # 16 steps put a grid point in every region, at least 0.0125 from every boundary.
    result = path_folding(model, starts, ends, steps=16)
    torch.testing.assert_close(result.chi, torch.tensor([0.25, 0.5]))
    torch.testing.assert_close(result.layer_chi, torch.tensor([[0.0, 0.5], [0.0, 0.5]]))
    assert result.r1.tolist() == [3, 2] and result.r2.tolist() == [4, 4]


def test_under_autocast() -> None:
    model = Tent()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = path_folding(model, torch.tensor([[0.0]]), torch.tensor([[1.0]]), steps=16)
        assert torch.is_autocast_enabled("cpu")
    torch.testing.assert_close(result.chi, torch.tensor([0.25]))
    # A random float32 network measured under autocast is the bfloat16 network: its walks differ.
    torch.manual_seed(0)
    network = nn.Sequential(nn.Linear(3, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))
    starts, ends = torch.randn(2, 8, 3) * 3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = path_folding(network, starts, ends, steps=200)
    assert not torch.equal(mixed.r2, path_folding(network, starts, ends, steps=200).r2)


def test_batch_statistics_normalisation_is_measured() -> None:
    model = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8, track_running_stats=False), nn.ReLU(), nn.Linear(8, 2))
    result = path_folding(model, torch.randn(1, 3), torch.randn(1, 3), steps=8)
    assert result.layer_names == ["2"] and result.chi.shape == (1,)


def test_leaves_the_model_exactly_as_it_was() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.5), nn.Linear(6, 2)).train()
    model[4].eval()
    model[0].weight.requires_grad_(False)
    calls = []
    handle = model[2].register_forward_hook(lambda *_: calls.append(1))
    statistics = {key: value.clone() for key, value in model.state_dict().items()}
    starts, ends = torch.randn(5, 3), torch.randn(5, 3)
    rng = torch.get_rng_state()

    path_folding(model, starts, ends, steps=9)

    assert [module.training for module in model.modules()] == [True, True, True, True, True, False]
    assert all(torch.equal(value, statistics[key]) for key, value in model.state_dict().items())
    assert not model[0].weight.requires_grad and model[4].weight.requires_grad
    assert all(parameter.grad is None for parameter in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    assert [len(module._forward_hooks) for module in model.modules()] == [0, 0, 0, 1, 0, 0]
    assert not any(module._forward_pre_hooks for module in model.modules())
    calls.clear()
    model(torch.randn(2, 3))
    assert calls == [1]
    handle.remove()


def test_hooks_removed_when_the_forward_raises() -> None:
    class FailsOnLargeBatches(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if len(x) > 1:
                raise RuntimeError("out of memory")
            return torch.relu(self.fc(x))

    model = FailsOnLargeBatches().train()
    with pytest.raises(RuntimeError, match="out of memory"):
        path_folding(model, torch.randn(2, 2), torch.randn(2, 2), steps=4)
    assert model.training
    assert not any(module._forward_hooks or module._forward_pre_hooks for module in model.modules())
    assert not torch.overrides._get_current_function_mode_stack()


def test_data_dependent_layers_are_rejected() -> None:
    class Branchy(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(x) if len(x) <= 2 else torch.relu(torch.relu(x))

    with pytest.raises(ValueError, match="same layers for every input"):
        path_folding(Branchy(), torch.randn(2, 2), torch.randn(2, 2), steps=4)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"starts": torch.randn(2, 3), "ends": torch.randn(2, 4)}, ValueError, "same shape"),
        ({"starts": torch.ones(2, 3, dtype=torch.long)}, TypeError, "floating point"),
        ({"starts": [[0.0, 1.0, 2.0]]}, TypeError, "torch.Tensor"),
        ({"starts": torch.full((2, 3), float("nan"))}, ValueError, "finite"),
        ({"ends": torch.full((2, 3), float("inf"))}, ValueError, "finite"),
        ({"starts": torch.randn(0, 3), "ends": torch.randn(0, 3)}, ValueError, "at least one path"),
        ({"steps": 0}, ValueError, "steps"),
        ({"steps": 2.5}, ValueError, "steps"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"layers": ["nope"]}, ValueError, r"Unknown layer name.*\['1', '3'\]"),
        ({"layers": "1"}, TypeError, "sequence of layer names"),
        ({"layers": []}, ValueError, "empty"),
        ({"model": "not a model"}, TypeError, "nn.Module"),
    ],
)
def test_bad_input_gets_a_clear_error(kwargs: dict, error: type[Exception], match: str) -> None:
    arguments = {"model": mlp(nn.ReLU), "starts": torch.randn(2, 3), "ends": torch.randn(2, 3), **kwargs}
    with pytest.raises(error, match=match):
        path_folding(arguments.pop("model"), arguments.pop("starts"), arguments.pop("ends"), **arguments)


def test_model_without_activation_says_how_to_register_one() -> None:
    with pytest.raises(ValueError, match=r"No supported activation.*Linear.*register_activation"):
        path_folding(nn.Sequential(nn.Linear(3, 2)), torch.randn(2, 3), torch.randn(2, 3))


def test_path_patterns_give_the_walk_that_path_folding_measures() -> None:
    torch.manual_seed(0)
    model = Residual().double()
    starts, ends = torch.randn(2, 5, 4, dtype=torch.float64) * 3
    patterns = path_patterns(model, starts, ends, steps=40)
    assert patterns.shape == (5, 41, 8 * 3 + 8 + 8) and patterns.dtype == torch.bool
    result = path_folding(model, starts, ends, steps=40, return_distances=True)
    assert torch.equal(fold_measure(patterns), result.chi)
    assert torch.equal((patterns != patterns[:, :1]).sum(-1), result.distances)
    tanh_only = path_patterns(model, starts, ends, steps=40, layers=["tanh"])
    torch.testing.assert_close(fold_measure(tanh_only), result.layer_chi[:, 4])


def tent_switch_network() -> nn.Sequential:
    """``a = relu(x)``, ``b = relu(x - 1)``, ``c = relu(a - 2 b - 0.5)``: path_folding's docstring example."""
    model = nn.Sequential(nn.Linear(1, 2), nn.ReLU(), nn.Linear(2, 1), nn.ReLU())
    nn.utils.vector_to_parameters(torch.tensor([1.0, 1.0, 0.0, -1.0, 1.0, -2.0, -0.5]), model.parameters())
    return model


class CountingForward(nn.Module):
    """Counts the batches it runs."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.inner(x)


def test_layers_found_once_are_reused_by_later_measurements() -> None:
    model = CountingForward(tent_switch_network())
    starts, ends = torch.tensor([[0.25]]), torch.tensor([[1.75]])
    path_folding(model, starts, ends, steps=3)
    assert model.calls == 2  # finding the layers, then one pass over the 4 points
    model.calls = 0
    second = path_folding(model, starts, ends, steps=3)
    assert model.calls == 1
    assert torch.allclose(second.chi, torch.tensor([1 / 3]))
    path_folding(model.double(), starts.double(), ends.double(), steps=3)  # another dtype: found again
    assert model.calls == 3


def test_exact_traversal_reuses_the_layers_and_sees_a_replaced_module() -> None:
    model = CountingForward(tent_switch_network())
    starts, ends = torch.tensor([[0.25]]), torch.tensor([[1.75]])
    first = path_folding(model, starts, ends, exact=True)
    calls, model.calls = model.calls, 0
    assert torch.equal(path_folding(model, starts, ends, exact=True).chi, first.chi)
    assert model.calls == calls - 1  # the layers were not found again
    # Patterns (a, b, c, relu(c)) of the four regions: 1000, 1011, 1111, 1100, so r1 = 3, r2 = 5.
    model.inner.append(nn.ReLU())
    added = path_folding(model, starts, ends, exact=True)
    assert added.layer_names == ["inner.1", "inner.3", "inner.4"]
    assert torch.allclose(added.chi, torch.tensor([1 - 3 / 5]))
    model.inner[1] = nn.GELU()
    with pytest.raises(ValueError, match=r"'inner\.1' \(GELU\) are smooth"):
        path_folding(model, starts, ends, exact=True)


def test_a_replaced_or_added_module_is_seen_by_the_next_measurement() -> None:
    model = tent_switch_network()
    starts, ends = torch.tensor([[0.25]]), torch.tensor([[1.75]])
    assert path_folding(model, starts, ends, steps=3).layer_names == ["1", "3"]
    # Patterns (a, b, c, relu(c)): 1000, 1011, 1111, 1100: distances from the start 0, 2, 3, 1, so r1 = 3, r2 = 5.
    model.append(nn.ReLU())
    added = path_folding(model, starts, ends, steps=3)
    assert added.layer_names == ["1", "3", "4"]
    assert torch.allclose(added.chi, torch.tensor([1 - 3 / 5]))
    # Without c, a and b switch once each: r1 = r2 = 2.
    model[3], model[4] = nn.Identity(), nn.Identity()
    removed = path_folding(model, starts, ends, steps=3)
    assert removed.layer_names == ["1"]
    assert torch.equal(removed.chi, torch.tensor([0.0]))
    # A module of another kind under the same name is found again too (Hardtanh's bit is z > 0 as well).
    model[1] = nn.Hardtanh()
    assert path_folding(model, starts, ends, steps=3).layer_names == ["1"]
    assert path_folding(model, starts, ends, exact=True).regions.tolist() == [2]  # b switches on at x = 1


@pytest.mark.parametrize(
    ("num_paths", "num_points", "batch_size", "num_words", "layout"),
    [
        # 64 paths of 65 points, 1,337 points a pass: 20 whole paths fit, balanced to 4 groups of 16; a chunk of
        # 16,384 / 16 words = 1,024 points is smaller than a pass, so a chunk is a pass.
        (64, 65, 1337, 16, (16, 65, 16, 65)),
        # Few words: chunks of up to 8,192 points hold 126 paths, balanced to 2 chunks of 64, each in 2 passes of 32.
        (128, 65, 2080, 2, (64, 65, 32, 65)),
        # Paths longer than a chunk: chunks of 5,000 points (10,000 balanced), each in passes of 1,000.
        (3, 10_000, 1000, 2, (1, 5000, 1, 1000)),
        # Many words: a chunk is a pass, 1,001 points balanced to 11 of 91.
        (2, 1001, 100, 1000, (1, 91, 1, 91)),
    ],
)
def test_walk_layout_by_hand(
    num_paths: int, num_points: int, batch_size: int, num_words: int, layout: tuple[int, int, int, int]
) -> None:
    assert tuple(walk_layout(num_paths, num_points, batch_size, num_words)) == layout


def test_walk_passes_cover_a_chunk_once() -> None:
    passes = list(walk_passes(5, 7, 2, 3))
    assert passes[:2] == [(slice(0, 2), slice(0, 3)), (slice(0, 2), slice(3, 6))]
    covered = torch.zeros(5, 7, dtype=torch.int64)
    for paths, points in passes:
        covered[paths, points] += 1
    assert torch.equal(covered, torch.ones(5, 7, dtype=torch.int64))


def test_default_batch_size_by_hand() -> None:
    def layers(*units: int) -> list[LayerInfo]:
        return [LayerInfo(str(index), "ReLU", count) for index, count in enumerate(units)]

    mnist = torch.zeros(1, 1, 28, 28)
    # The largest of the input and the activations: 784 float32 inputs are 3,136 bytes, 8 MiB hold 2,674 of them.
    assert default_batch_size(layers(256, 256, 10), mnist) == 8 * 2**20 // (784 * 4)
    assert default_batch_size(layers(256, 256, 10), mnist, compiled=True) == 16 * 2**20 // (784 * 4)
    assert default_batch_size(layers(16 * 28 * 28, 32 * 14 * 14), mnist) == 8 * 2**20 // (16 * 28 * 28 * 4)
    assert default_batch_size(layers(2), torch.zeros(1, 2)) == 8192  # at most
    assert default_batch_size(layers(10**6), mnist) == 64  # at least
    assert default_batch_size(layers(10**6), mnist.double().to("meta")) == 512 * 2**20 // (10**6 * 8)  # accelerators
    # Passes grow until their largest activation holds the model's largest weight, up to 4x the budget: a 12 MiB
    # weight and 64 KiB a point (16,384 units) give 192 points instead of 128; a 64 MiB one and 256 KiB a point give
    # 32 MiB passes (128 points; 256 compiled) instead of 64 points; small weights change nothing.
    weight_12_mib, weight_64_mib = nn.Linear(2048, 1536, device="meta"), nn.Linear(4096, 4096, device="meta")
    image = torch.zeros(1, 3, 32, 32)
    assert default_batch_size(layers(2**14), image) == 128
    assert default_batch_size(layers(2**14), image, model=weight_12_mib) == 192
    assert default_batch_size(layers(2**16), image, model=weight_64_mib) == 128
    assert default_batch_size(layers(2**16), image, compiled=True, model=weight_64_mib) == 256
    assert default_batch_size(layers(256, 256, 10), mnist, model=nn.Linear(784, 256)) == 8 * 2**20 // (784 * 4)


def test_path_folding_sizes_its_passes_by_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    sized: list[nn.Module | None] = []
    original = folding.default_batch_size

    def recorded(
        layers: list[LayerInfo], inputs: torch.Tensor, compiled: bool = False, model: nn.Module | None = None
    ) -> int:
        sized.append(model)
        return original(layers, inputs, compiled, model)

    monkeypatch.setattr(folding, "default_batch_size", recorded)
    model = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1))
    starts, ends = torch.zeros(2, 2), torch.ones(2, 2)
    path_folding(model, starts, ends, steps=4)
    path_folding(model, starts, ends, exact=True)
    path_folding(model, starts, ends, steps=4, batch_size=8)  # the caller's batch size stands
    assert sized == [model, model]  # sampled and exact, each by the model's weights
