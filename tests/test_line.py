"""The first affine map evaluated at the ends of each segment (lightning_spacefold.line)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_spacefold.capture as capture_module
import lightning_spacefold.line as line_module
from lightning_spacefold import path_folding, path_patterns, register_activation, soft_folding
from lightning_spacefold.finite import FiniteCheck
from lightning_spacefold.line import LineShortcut, Segments, segment_points


@pytest.fixture
def taken(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of rows of every affine call the shortcut took (one entry per forward pass that took it)."""
    rows: list[int] = []
    affine = Segments.affine

    def counted(self: Segments, func, args, kwargs):
        rows.append(len(self.starts))
        return affine(self, func, args, kwargs)

    monkeypatch.setattr(Segments, "affine", counted)
    return rows


def without_shortcut(monkeypatch: pytest.MonkeyPatch, measure):
    with monkeypatch.context() as patch:
        patch.setattr(Segments, "hold", lambda self, x: False)
        return measure()


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(49, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4, 10),
    )


class PatchEmbedding(nn.Module):
    """A ViT's stem: a strided convolution into patches, then tokens, a GELU MLP per token."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.patches = nn.Conv2d(1, 8, kernel_size=7, stride=7)
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.patches(images).flatten(2).transpose(1, 2)  # [B, 1, 8]
        return self.mlp(tokens).mean(1)


class InputSkip(nn.Module):
    """The input reaches the output twice: through the first layer and concatenated to its activations."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first, self.second = nn.Linear(49, 16), nn.Linear(16 + 49, 8)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.flatten(1)
        return torch.relu(self.second(torch.cat([torch.relu(self.first(x)), x], dim=1)))


class ScalesInPlace(nn.Module):
    """Doubles its input in place before the first layer: the points are no longer those of the segment."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(49, 16)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.first(images.mul_(2).flatten(1)))


class Transposed(nn.Module):
    """Runs its first layer on the transposed image: rows of the first layer's input are not points."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(7, 16)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.first(images[:, 0].transpose(1, 2))).flatten(1)


def paths(count: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(count, 1, 7, 7, generator=generator), torch.randn(count, 1, 7, 7, generator=generator)


@pytest.mark.parametrize("make", [mlp, cnn, PatchEmbedding, InputSkip])
def test_same_folding_as_every_point_through_the_map(make, taken: list[int], monkeypatch) -> None:
    model, (starts, ends) = make(), paths()
    result = path_folding(model, starts, ends, steps=40, batch_size=100, return_distances=True)
    # 12 paths of 41 points in passes of 100 points: two paths a pass, each pass on 2 segment ends.
    assert taken == [2] * 6
    expected = without_shortcut(monkeypatch, lambda: path_folding(model, starts, ends, steps=40, batch_size=100))
    assert torch.equal(result.r1, expected.r1) and torch.equal(result.r2, expected.r2)
    assert torch.equal(result.layer_r2, expected.layer_r2)
    assert torch.equal(result.chi_max, expected.chi_max)
    assert bool((result.r2 > 0).all())
    patterns = path_patterns(model, starts, ends, steps=40)
    assert torch.equal(patterns, without_shortcut(monkeypatch, lambda: path_patterns(model, starts, ends, steps=40)))


@pytest.mark.parametrize("make", [ScalesInPlace, Transposed])
def test_inputs_that_are_not_the_points_run_as_they_are(make, taken: list[int], monkeypatch) -> None:
    model, (starts, ends) = make(), paths()
    result = path_folding(model, starts, ends, steps=20)
    assert taken == []
    expected = without_shortcut(monkeypatch, lambda: path_folding(model, starts, ends, steps=20))
    assert torch.equal(result.r2, expected.r2) and bool((result.r2 > 0).all())


def test_the_shortcut_outputs_equal_the_map_of_every_point() -> None:
    # The identity behind the shortcut, for a convolution with a bias keyword, stride and padding, in float64.
    generator = torch.Generator().manual_seed(0)
    starts, ends = torch.randn(3, 2, 9, 9, generator=generator), torch.randn(3, 2, 9, 9, generator=generator)
    weight, bias = torch.randn(5, 2, 3, 3, generator=generator), torch.randn(5, generator=generator)
    t = torch.linspace(0, 1, 7, dtype=torch.float64)
    points = segment_points(starts.double(), ends.double(), t)
    with LineShortcut() as line:
        shortcut = line.run(
            lambda x: F.conv2d(x, weight.double(), bias=bias.double(), stride=2), starts.double(), ends.double(), t
        )
        assert line.shortcuts == 1
    torch.testing.assert_close(shortcut, F.conv2d(points, weight.double(), bias=bias.double(), stride=2))


def test_under_autocast(taken: list[int], monkeypatch) -> None:
    model, (starts, ends) = mlp(), paths()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        patterns = path_patterns(model, starts, ends, steps=40)
        expected = without_shortcut(monkeypatch, lambda: path_patterns(model, starts, ends, steps=40))
    assert taken == [12]
    # bfloat16 keeps 8 bits: the two ways round differently, so a pre-activation within its rounding of zero may
    # take the other bit.
    assert (patterns != expected).float().mean().item() < 0.01
    assert (patterns != expected).any(-1).float().mean().item() < 0.2


def test_gradients_of_the_soft_folding_are_those_of_every_point(taken: list[int], monkeypatch) -> None:
    model, (starts, ends) = mlp(), paths()

    def gradient() -> torch.Tensor:
        model.zero_grad()
        soft_folding(model, starts, ends, steps=16).mean().backward()
        return model[1].weight.grad.clone()

    shortcut = gradient()
    assert taken == [12]
    torch.testing.assert_close(shortcut, without_shortcut(monkeypatch, gradient), rtol=1e-4, atol=1e-6)
    assert shortcut.abs().sum() > 0


@pytest.mark.parametrize("make", [mlp, cnn, InputSkip])
def test_exact_traversal_takes_the_first_map_from_the_segments(make, taken: list[int], monkeypatch) -> None:
    model, (starts, ends) = make(), paths(6)
    result = path_folding(model, starts, ends, exact=True)
    # Every evaluation pass (the starting grid and each pass of new points) takes the shortcut, on the 6 segments.
    assert len(taken) >= 2 and set(taken) == {6}
    expected = without_shortcut(monkeypatch, lambda: path_folding(model, starts, ends, exact=True))
    assert torch.equal(result.regions, expected.regions) and torch.equal(result.r2, expected.r2)
    assert torch.equal(result.chi_max, expected.chi_max) and bool((result.r2 > 0).all())


class Switchable(nn.Module):
    """Flatten and a first layer; with ``skip`` the input also reaches the output (read after the first layer),
    with ``scale`` it is doubled in place first."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first, self.second = nn.Linear(49, 8), nn.Linear(8 + 49, 4)
        self.skip = self.scale = False

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.scale:
            images.mul_(2)
        x = images.flatten(1)
        hidden = torch.relu(self.first(x))
        return self.second(torch.cat([hidden, x if self.skip else torch.zeros_like(x)], dim=1))


def run_passes(model: nn.Module, starts: torch.Tensor, ends: torch.Tensor) -> list[torch.Tensor]:
    """Two passes through one LineShortcut keyed on the model, as path_folding's chunks run."""
    outputs = []
    with torch.no_grad(), LineShortcut(model, "key", values_per_pass=len(starts) * 5 * 49) as line:
        for t in (torch.linspace(0, 0.5, 5, dtype=torch.float64), torch.linspace(0.5, 1, 5, dtype=torch.float64)):
            outputs.append(line.run(model, starts, ends, t))
    return outputs


def reference(model: nn.Module, starts: torch.Tensor, ends: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return [
            model(segment_points(starts, ends, torch.linspace(a, b, 5, dtype=torch.float64)))
            for a, b in ((0, 0.5), (0.5, 1))
        ]


@pytest.fixture
def computed(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """For every pass, whether its points' values were computed (at once, or when something read them).

    Points of any size are worth leaving unset here: these models are small.
    """
    monkeypatch.setattr(line_module, "POINTS_PER_OPERATION", 0)
    passes: list[bool] = []
    init, set_points = Segments.__init__, Segments.set_points

    def counted_init(self: Segments, *args, **kwargs) -> None:
        passes.append(False)
        init(self, *args, **kwargs)

    def counted_set(self: Segments) -> None:
        passes[-1] = True
        set_points(self)

    monkeypatch.setattr(Segments, "__init__", counted_init)
    monkeypatch.setattr(Segments, "set_points", counted_set)
    return passes


def test_points_used_by_nothing_but_the_first_map_are_not_computed(computed: list[bool]) -> None:
    model, (starts, ends) = Switchable(), paths(3)
    run_passes(model, starts, ends)
    assert computed == [True, True]  # the passes watched whole show that the points reach only the first layer
    outputs = run_passes(model, starts, ends)  # remembered across calls for the model and key
    assert computed == [True, True, False, False]
    for output, expected in zip(outputs, reference(model, starts, ends), strict=True):
        torch.testing.assert_close(output, expected)


@pytest.mark.parametrize("change", ["skip", "scale"])
def test_points_that_something_else_reads_are_computed_first(change: str, computed: list[bool]) -> None:
    model, (starts, ends) = Switchable(), paths(3)
    run_passes(model, starts, ends)
    setattr(model, change, True)  # now the input is read after the first layer, or changed in place before it
    expected = reference(model, starts.clone(), ends.clone())
    outputs = run_passes(model, starts, ends)
    assert computed == [True, True, True, True]  # the unset points were computed before they were read
    for output, value in zip(outputs, expected, strict=True):
        torch.testing.assert_close(output, value)


def test_code_that_bypasses_the_overrides_always_gets_computed_points(computed: list[bool]) -> None:
    # TorchScript runs its operations without PyTorch's function overrides: its passes never show unused points.
    model = torch.jit.script(nn.Sequential(nn.Flatten(), nn.Linear(49, 8), nn.ReLU()))
    starts, ends = paths(3)
    outputs = run_passes(model, starts, ends)
    assert computed == [True, True]
    for output, expected in zip(outputs, reference(model, starts, ends), strict=True):
        torch.testing.assert_close(output, expected)


def test_path_folding_skips_the_points_once_it_knows_they_are_unused(computed: list[bool], monkeypatch) -> None:
    model, (starts, ends) = mlp(), paths()
    first = path_folding(model, starts, ends, steps=40, batch_size=100, return_distances=True)
    assert computed == [True] * 6  # the first call's passes show that only the first layer takes the points
    second = path_folding(model, starts, ends, steps=40, batch_size=100, return_distances=True)
    assert computed[6:] == [False] * 6
    expected = without_shortcut(monkeypatch, lambda: path_folding(model, starts, ends, steps=40, batch_size=100))
    for result in (first, second):
        assert torch.equal(result.r2, expected.r2) and torch.equal(result.chi_max, expected.chi_max)
    skip, (starts, ends) = InputSkip(), paths()
    path_folding(skip, starts, ends, steps=40, batch_size=100)
    path_folding(skip, starts, ends, steps=40, batch_size=100)
    assert computed[-12:] == [True] * 12  # the input also reaches the second layer: always computed


class PassThrough(nn.Module):
    """An activation (registered as one) that hands its input on without an operation the watch could see."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class RawFirst(nn.Module):
    """An MLP whose first layer is, when ``raw``, a :class:`PassThrough` of the input itself."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.raw = False
        self.passed, self.first, self.second = PassThrough(), nn.Linear(49, 16), nn.Linear(16, 16)
        self.last = nn.Linear(16, 4)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.passed(images) if self.raw else images
        return self.last(torch.relu(self.second(torch.relu(self.first(x.flatten(1))))))


@pytest.mark.parametrize("soft_first", [False, True])
@pytest.mark.parametrize("learnt_first", [False, True])
def test_a_layer_that_takes_the_points_themselves_reads_them(
    learnt_first: bool, soft_first: bool, computed, monkeypatch
) -> None:
    # The measurement's own work on a layer runs unwatched: its reading the points must count all the same, also
    # after passes that showed them unused (for the first call after them: soft folding's, or path_folding's).
    monkeypatch.setattr("lightning_spacefold.capture._MODULE_RULES", dict(capture_module._MODULE_RULES))
    register_activation(PassThrough)
    model, (starts, ends) = RawFirst(), paths()
    model.raw = not learnt_first
    path_folding(model, starts, ends, steps=40, batch_size=100)
    model.raw = True
    if soft_first:
        soft = soft_folding(model, starts, ends, steps=8)
        expected_soft = soft_folding(copy.deepcopy(model), starts, ends, steps=8)  # a model it has not seen: computed
        assert expected_soft.min() > 0  # the second hidden layer folds every path
        torch.testing.assert_close(soft, expected_soft)
    result = path_folding(model, starts, ends, steps=40, batch_size=100)
    patterns = path_patterns(model, starts, ends, steps=8)
    assert computed[-7:] == [True] * 7  # the first layer's pre-activation is the points: every pass computes them
    expected = without_shortcut(monkeypatch, lambda: path_folding(model, starts, ends, steps=40, batch_size=100))
    assert torch.equal(result.layer_r2, expected.layer_r2) and torch.equal(result.layer_r1, expected.layer_r1)
    assert result.layer_r2[:, 0].min() > 0  # the input's own signs change along every path
    points = segment_points(starts, ends, torch.linspace(0, 1, 9, dtype=torch.float64)).flatten(1)
    assert torch.equal(patterns[..., :49].flatten(0, 1), points > 0)


def test_small_points_are_computed_and_then_only_the_first_map_is_watched(computed, monkeypatch) -> None:
    monkeypatch.setattr(line_module, "POINTS_PER_OPERATION", 16384)  # the default: 735 values are not worth it
    model, (starts, ends) = Switchable(), paths(3)
    run_passes(model, starts, ends)
    with torch.no_grad(), LineShortcut(model, "key", values_per_pass=len(starts) * 5 * 49) as line:
        output = line.run(model, starts, ends, torch.linspace(0, 0.5, 5, dtype=torch.float64))
        assert not line.watching and line.shortcuts == 1 and line.operations < 4  # the first layer's calls alone
    assert computed == [True, True, True]
    torch.testing.assert_close(output, reference(model, starts, ends)[0])


def test_whether_unset_points_are_worth_it_is_decided_per_call(computed: list[bool], monkeypatch) -> None:
    monkeypatch.setattr(line_module, "POINTS_PER_OPERATION", 50)
    model, (starts, ends) = mlp(), paths()
    path_folding(model, starts[:1], ends[:1], steps=2)  # a small warm-up: 147 values, not worth leaving unset
    path_folding(model, starts[:1], ends[:1], steps=2)
    assert computed == [True, True]
    path_folding(model, starts, ends, steps=40, batch_size=100)  # 4,900 values a pass: worth it
    assert computed[2:] == [False] * 6


def test_what_is_learnt_is_one_entry_per_model() -> None:
    # A forward made anew for every call (a lambda) is another key each time: the memory must not grow with calls.
    model, (starts, ends) = mlp(), paths(2)
    sizes = []
    for _ in range(3):
        path_folding(model, starts, ends, steps=4, forward=lambda points: model(points))
        sizes.append(len(line_module._LEARNT))
    _key, learnt = line_module._LEARNT[model]
    assert sizes[0] == sizes[1] == sizes[2] and learnt.stem is model[1]


def test_only_the_forward_passes_are_watched(monkeypatch) -> None:
    # The watch costs about 3 us per operation it sees: the measurement's own work between passes runs outside it.
    modes: dict[str, list[int]] = {"forward": [], "between passes": []}

    class Recording(nn.Sequential):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            modes["forward"].append(torch._C._len_torch_function_stack())
            return super().forward(x)

    end_pass = FiniteCheck.end_pass

    def recorded_end_pass(self: FiniteCheck, output: object) -> None:
        modes["between passes"].append(torch._C._len_torch_function_stack())
        end_pass(self, output)

    monkeypatch.setattr(FiniteCheck, "end_pass", recorded_end_pass)
    model = Recording(nn.Flatten(), nn.Linear(49, 8), nn.ReLU(), nn.Linear(8, 3), nn.ReLU())
    starts, ends = paths(4)
    path_folding(model, starts, ends, steps=8, batch_size=12)  # several passes, the first call: watched whole
    assert len(modes["between passes"]) > 1 and set(modes["between passes"]) == {0}
    assert set(modes["forward"]) == {1}
