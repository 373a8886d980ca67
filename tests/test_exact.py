"""Tests for lightning_spacefold.exact (exact folding along a segment)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_spacefold import FoldingResult, path_folding
from lightning_spacefold.exact import _crossings, _Probe, _Tally, _TraversalOps
from lightning_spacefold.line import Segments

# A prime step count for dense sampling: t = i / steps is no simple fraction (as the breakpoints of the hand-built
# networks are) other than 0 and 1, so no sample lands exactly on a breakpoint.
DENSE_STEPS = 100_003


def exact(
    model: nn.Module,
    starts: torch.Tensor,
    ends: torch.Tensor,
    layers: Sequence[str] | None = None,
    batch_size: int = 4096,
) -> FoldingResult:
    return path_folding(model, starts, ends, layers=layers, batch_size=batch_size, exact=True)


def assert_same_walk(result: FoldingResult, dense: FoldingResult) -> None:
    assert result.layer_names == dense.layer_names
    assert torch.equal(result.layer_r1, dense.layer_r1)
    assert torch.equal(result.layer_r2, dense.layer_r2)
    assert torch.equal(result.r1, dense.r1)
    assert torch.equal(result.r2, dense.r2)
    torch.testing.assert_close(result.chi, dense.chi)
    torch.testing.assert_close(result.layer_chi, dense.layer_chi)


def line(start: float, end: float, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """One path on the real line, [1, 1] each."""
    return torch.tensor([[start]], dtype=dtype), torch.tensor([[end]], dtype=dtype)


def one_d_layer(weights: list[float], biases: list[float]) -> nn.Linear:
    layer = nn.Linear(1, len(weights))
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weights)[:, None])
        layer.bias.copy_(torch.tensor(biases))
    return layer


def on_off_twice(dtype: torch.dtype = torch.float64) -> nn.Module:
    """1-D input x; h = relu(x - (0.125, 0.375, 0.625, 0.75)); u = relu(-0.0625 + h_a - 2 h_b + 2 h_c - 2 h_d).

    u's pre-activation has slopes 0, +1, -1, +1, -1 between the kinks of h: -0.0625 at x = 0, 0.1875 at 0.375,
    -0.0625 at 0.625, 0.0625 at 0.75, -0.1875 at 1. It crosses zero at 0.1875 (on), 0.5625 (off), 0.6875 (on) and
    0.8125 (off). Every number is dyadic: the network computes exactly in float32 and float64.
    """
    first = one_d_layer([1.0, 1.0, 1.0, 1.0], [-0.125, -0.375, -0.625, -0.75])
    second = nn.Linear(4, 1)
    with torch.no_grad():
        second.weight.copy_(torch.tensor([[1.0, -2.0, 2.0, -2.0]]))
        second.bias.fill_(-0.0625)
    return nn.Sequential(OrderedDict(hidden=first, relu1=nn.ReLU(), out=second, relu2=nn.ReLU())).to(dtype)


def random_pairs(shape: tuple[int, ...], scale: float, seed: int, count: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return scale * torch.randn(count, *shape, generator=generator), scale * torch.randn(
        count, *shape, generator=generator
    )


def relu_mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Linear(2, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 3)
    )


def relu_family_mlp() -> nn.Module:
    """LeakyReLU, ReLU6 (reaching its kink at 6), Hardtanh and PReLU."""
    torch.manual_seed(2)
    return nn.Sequential(
        nn.Linear(2, 10),
        nn.LeakyReLU(0.1),
        nn.Linear(10, 10),
        nn.ReLU6(),
        nn.Linear(10, 10),
        nn.Hardtanh(-0.5, 0.5),
        nn.Linear(10, 10),
        nn.PReLU(),
    )


def conv2d_net() -> nn.Module:
    torch.manual_seed(3)
    norm = nn.BatchNorm2d(3)
    with torch.no_grad():
        norm.running_mean.uniform_(-0.5, 0.5)
        norm.running_var.uniform_(0.5, 2.0)
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.2, 0.2)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        norm,
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Dropout(0.5),
        nn.Linear(16, 6),
        nn.ReLU(),
    )


class DilatedPool(nn.Module):
    """Functional max pooling with overlapping, dilated, padded windows and ceil mode."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool1d(x, kernel_size=3, stride=2, padding=1, dilation=2, ceil_mode=True)


def conv1d_net() -> nn.Module:
    torch.manual_seed(4)
    return nn.Sequential(
        nn.Conv1d(1, 3, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool1d(3, stride=2, padding=1, ceil_mode=True),
        nn.Conv1d(3, 3, 3, padding=1),
        nn.LeakyReLU(0.2),
        DilatedPool(),
        nn.Flatten(),
        nn.LazyLinear(5),
        nn.ReLU(),
    )


def conv3d_net() -> nn.Module:
    torch.manual_seed(5)
    return nn.Sequential(
        nn.Conv3d(1, 2, 2), nn.ReLU(), nn.MaxPool3d(2, stride=1), nn.Flatten(), nn.LazyLinear(4), nn.ReLU()
    )


class Residual(nn.Module):
    """Residual additions and a concatenation of two branches."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(6)
        self.stem = nn.Linear(3, 8)
        self.block1 = nn.Linear(8, 8)
        self.block2 = nn.Linear(8, 8)
        self.side = nn.Linear(8, 4)
        self.head = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.stem(x))
        h = h + F.relu(self.block1(h))
        h = h + F.relu(self.block2(h))
        return F.relu(self.head(torch.cat([h, F.relu(self.side(h))], dim=1)))


# name: (builder, input shape, input scale, seed of the pairs: one of them folds)
RANDOM_NETWORKS = {
    "relu-mlp": (relu_mlp, (2,), 3.0, 8),
    "relu-family": (relu_family_mlp, (2,), 10.0, 11),
    "conv2d-batchnorm-maxpool-avgpool": (conv2d_net, (1, 8, 8), 1.0, 32),
    "conv1d-overlapping-maxpool": (conv1d_net, (1, 12), 1.0, 26),
    "conv3d-maxpool": (conv3d_net, (1, 4, 4, 4), 1.0, 17),
    "residual-concat": (Residual, (3,), 3.0, 19),
}


@pytest.mark.parametrize("name", RANDOM_NETWORKS)
def test_exact_equals_dense_sampling_on_random_networks(name: str) -> None:
    build, shape, scale, seed = RANDOM_NETWORKS[name]
    model = build()
    starts, ends = random_pairs(shape, scale, seed)
    model(starts)  # initialise lazy layers
    result = exact(model, starts, ends)
    dense = path_folding(model, starts, ends, steps=DENSE_STEPS)
    assert_same_walk(result, dense)
    assert result.steps is None and result.distances is None
    assert bool((result.regions > 5).all())  # the paths cross many regions: the comparison is not trivial
    assert bool((result.chi > 0).any())


def test_exact_equals_dense_sampling_on_selected_layers() -> None:
    model = relu_family_mlp()
    starts, ends = random_pairs((2,), 10.0, seed=7)
    layers = ["1", "5"]  # the LeakyReLU and the Hardtanh; the ReLU6 between them still bends the Hardtanh's input
    result = exact(model, starts, ends, layers=layers)
    assert_same_walk(result, path_folding(model, starts, ends, steps=DENSE_STEPS, layers=layers))
    assert result.layer_names == layers


def test_on_off_twice_by_hand() -> None:
    # Patterns (h_a h_b h_c h_d | u) from x = 0 to 1 and their distance from the start:
    #   0000|0 (0), 1000|0 (1), 1000|1 (2), 1100|1 (3), 1100|0 (2), 1110|0 (3), 1110|1 (4), 1111|1 (5), 1111|0 (4)
    # r1 = 5, r2 = 8, chi = 3/8; layer h: r1 = r2 = 4, chi = 0; layer u: on and off twice, r1 = 1, r2 = 4, chi = 3/4.
    model = on_off_twice()
    starts, ends = line(0.0, 1.0)
    result = exact(model, starts, ends)
    assert result.regions.tolist() == [9]
    assert (result.r1.tolist(), result.r2.tolist()) == ([5], [8])
    assert result.layer_r1.tolist() == [[4, 1]] and result.layer_r2.tolist() == [[4, 4]]
    torch.testing.assert_close(result.chi, torch.tensor([3 / 8]))
    torch.testing.assert_close(result.layer_chi, torch.tensor([[0.0, 3 / 4]]))
    assert_same_walk(result, path_folding(model, starts, ends, steps=DENSE_STEPS))


def test_three_crossings_by_hand() -> None:
    # relu(x - 0.25), relu(x - 0.5), relu(x - 0.75) from x = 0 to 1: 000, 100, 110, 111; r1 = r2 = 3, chi = 0.
    model = nn.Sequential(one_d_layer([1.0, 1.0, 1.0], [-0.25, -0.5, -0.75]), nn.ReLU()).double()
    result = exact(model, *line(0.0, 1.0))
    assert (result.regions.tolist(), result.r1.tolist(), result.r2.tolist()) == ([4], [3], [3])
    assert result.chi.tolist() == [0.0]


@pytest.mark.parametrize("activation", [nn.Hardtanh(-2.0, 2.0), nn.Hardsigmoid()])
def test_bits_flipping_inside_a_linear_piece(activation: nn.Module) -> None:
    # Both units stay inside the activation's middle piece (kinks at +-2 or +-3), so the segment is one affine region,
    # but the bits flip at 0: at x = 0.5 and 0.51. Patterns 00, 10 (on a stretch narrower than the first grid's
    # spacing), 11: 3 regions, r1 = r2 = 2.
    model = nn.Sequential(one_d_layer([1.0, 1.0], [-0.5, -0.51]), activation).double()
    result = exact(model, *line(0.0, 1.0))
    assert (result.regions.tolist(), result.r1.tolist(), result.r2.tolist()) == ([3], [2], [2])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_simultaneous_crossings(dtype: torch.dtype) -> None:
    # a = relu(x - 0.25), m = relu(x - 0.5), b = relu(x - 0.6875); v = relu(a - 2 m - 0.0625) is on on
    # (0.3125, 0.6875) and turns off exactly where b turns on. Patterns (a m b | v) and distances from the start:
    #   000|0 (0), 100|0 (1), 100|1 (2), 110|1 (3), 111|0 (3): r1 = 3, r2 = 1 + 1 + 1 + 2 = 5, chi = 2/5.
    # Resolving the double crossing into two would add a region: 111|1 (distance 4, chi 1/5) or 110|0.
    second = nn.Linear(3, 1)
    with torch.no_grad():
        second.weight.copy_(torch.tensor([[1.0, -2.0, 0.0]]))
        second.bias.fill_(-0.0625)
    model = nn.Sequential(one_d_layer([1.0, 1.0, 1.0], [-0.25, -0.5, -0.6875]), nn.ReLU(), second, nn.ReLU()).to(dtype)
    starts, ends = line(0.0, 1.0, dtype)
    result = exact(model, starts, ends)
    assert (result.regions.tolist(), result.r1.tolist(), result.r2.tolist()) == ([5], [3], [5])
    torch.testing.assert_close(result.chi, torch.tensor([2 / 5]))
    assert_same_walk(result, path_folding(model, starts, ends, steps=DENSE_STEPS))

    # Two units of one layer crossing at the same t, one turning on and one off: 01 -> 10, one step of length 2.
    model = nn.Sequential(one_d_layer([1.0, -1.0], [-0.5, 0.5]), nn.ReLU()).to(dtype)
    result = exact(model, starts, ends)
    assert (result.regions.tolist(), result.r1.tolist(), result.r2.tolist()) == ([2], [2], [2])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_end_points_exactly_on_boundaries(dtype: torch.dtype) -> None:
    # on_off_twice from x = 0.1875 to 0.5625, where u's pre-activation is exactly 0 (bit 0) at both ends:
    #   t = 0: 1000|0, interior: 1000|1 then 1100|1, t = 1: 1100|0. Distances 0, 1, 2, 1: r1 = 2, r2 = 3, chi = 1/3.
    # Starting from the interior pattern instead would give 1000|1, 1100|1, 1100|0: r1 = 2, r2 = 2, chi = 0.
    model = on_off_twice(dtype)
    starts, ends = line(0.1875, 0.5625, dtype)
    result = exact(model, starts, ends)
    assert (result.regions.tolist(), result.r1.tolist(), result.r2.tolist()) == ([4], [2], [3])
    torch.testing.assert_close(result.chi, torch.tensor([1 / 3]))
    assert_same_walk(result, path_folding(model, starts, ends, steps=DENSE_STEPS))
    backwards = exact(model, ends, starts)  # 1100|0, 1100|1, 1000|1, 1000|0: the same counts
    assert (backwards.regions.tolist(), backwards.r1.tolist(), backwards.r2.tolist()) == ([4], [2], [3])

    # From x = 0.125, where h_a's pre-activation is exactly 0: its slope there says nothing about the interior, where
    # h_a bends u's input. The start pattern 0000|0 is that of x = 0, so the walk is the one of test_on_off_twice.
    starts, ends = line(0.125, 1.0, dtype)
    result = exact(model, starts, ends)
    assert (result.regions.tolist(), result.r1.tolist(), result.r2.tolist()) == ([9], [5], [8])
    assert_same_walk(result, path_folding(model, starts, ends, steps=DENSE_STEPS))


def test_segment_inside_one_region() -> None:
    model = on_off_twice()
    result = exact(model, *line(0.2, 0.3))  # all of it in 1000|1
    assert (result.regions.tolist(), result.r2.tolist(), result.chi.tolist()) == ([1], [0], [0.0])

    model = conv2d_net()
    starts, _ = random_pairs((1, 8, 8), 1.0, seed=8)
    nearby = starts + 1e-9 * torch.randn(starts.shape, generator=torch.Generator().manual_seed(9))
    for ends in (starts, nearby):  # a point, and a segment too short to reach a boundary
        result = exact(model, starts, ends)
        assert result.regions.tolist() == [1, 1, 1]
        assert result.chi.tolist() == [0.0, 0.0, 0.0]


def test_max_pool_winner_change_is_a_breakpoint() -> None:
    # max(x1, x2) from (0, 1) to (1, 0) is max(1 - t, t): it bends at t = 0.5 without any activation crossing.
    # u = relu(max - 0.6) is on, off on (0.4, 0.6), on again: r1 = 1, r2 = 2, chi = 1/2, 3 regions.
    model = nn.Sequential(nn.MaxPool1d(2), nn.Flatten(), one_d_layer([1.0], [-0.6]), nn.ReLU()).double()
    starts = torch.tensor([[[0.0, 1.0]]], dtype=torch.float64)
    result = exact(model, starts, starts.flip(-1))
    assert (result.regions.tolist(), result.r1.tolist(), result.r2.tolist()) == ([3], [1], [2])
    torch.testing.assert_close(result.chi, torch.tensor([0.5]))


def test_float32_model_gives_the_float64_result() -> None:
    model = relu_mlp().double()
    starts, ends = random_pairs((2,), 3.0, seed=10)
    reference = exact(model, starts.double(), ends.double())
    single = exact(model.float(), starts, ends)
    assert torch.equal(single.regions, reference.regions)
    assert torch.equal(single.layer_r1, reference.layer_r1)
    assert torch.equal(single.layer_r2, reference.layer_r2)
    assert torch.equal(single.r1, reference.r1)


def test_small_batches_give_the_same_result() -> None:
    model = conv2d_net()
    starts, ends = random_pairs((1, 8, 8), 1.0, seed=11)
    reference = exact(model, starts, ends)
    small = exact(model, starts, ends, batch_size=2)  # fewer points per pass than paths
    assert torch.equal(small.regions, reference.regions)
    assert torch.equal(small.layer_r1, reference.layer_r1)
    assert torch.equal(small.layer_r2, reference.layer_r2)
    assert torch.equal(small.r1, reference.r1)


def test_reversed_path_crosses_the_same_regions() -> None:
    model = Residual()
    starts, ends = random_pairs((3,), 3.0, seed=12, count=6)
    forward, backward = exact(model, starts, ends), exact(model, ends, starts)
    assert torch.equal(forward.regions, backward.regions)
    assert torch.equal(forward.r2, backward.r2)
    assert torch.equal(forward.chi == 0, backward.chi == 0)


@pytest.mark.parametrize("smooth", [nn.GELU, nn.Tanh])
def test_smooth_activation_raises_naming_the_layer(smooth: type[nn.Module]) -> None:
    model = nn.Sequential(OrderedDict(fc1=nn.Linear(2, 4), act=smooth(), fc2=nn.Linear(4, 4), relu=nn.ReLU()))
    starts, ends = random_pairs((2,), 1.0, seed=13)
    with pytest.raises(ValueError, match=rf"'act' \({smooth.__name__}\).*smooth"):
        exact(model, starts, ends)
    with pytest.raises(ValueError, match="'act'"):  # not measured, but it bends the measured layer's input
        exact(model, starts, ends, layers=["relu"])
    assert model.training  # flags restored after the error


def test_many_smooth_layers_are_named_briefly() -> None:
    model = nn.Sequential(*(layer for _ in range(8) for layer in (nn.Linear(2, 2), nn.GELU())))
    with pytest.raises(
        ValueError, match=r"'1' \(GELU\), '3' \(GELU\), '5' \(GELU\), '7' \(GELU\), '9' \(GELU\) and 3 more are"
    ):
        path_folding(model, torch.randn(1, 2), torch.randn(1, 2), exact=True)


def test_smooth_activation_after_the_measured_layers_is_allowed() -> None:
    model = nn.Sequential(OrderedDict(fc1=nn.Linear(2, 6), relu=nn.ReLU(), fc2=nn.Linear(6, 4), act=nn.Tanh()))
    starts, ends = random_pairs((2,), 3.0, seed=14)
    result = exact(model, starts, ends, layers=["relu"])
    assert_same_walk(result, path_folding(model, starts, ends, steps=DENSE_STEPS, layers=["relu"]))


class Hidden(nn.Module):
    def __init__(self, operation: str) -> None:
        super().__init__()
        self.operation = operation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.abs() if self.operation == "abs" else F.layer_norm(x, x.shape[1:])


@pytest.mark.parametrize("operation", ["abs", "layer_norm"])
def test_hidden_non_linearity_raises_naming_the_next_layer(operation: str) -> None:
    torch.manual_seed(15)
    model = nn.Sequential(
        OrderedDict(
            fc1=nn.Linear(2, 8),
            relu1=nn.ReLU(),
            fc2=nn.Linear(8, 8),
            hidden=Hidden(operation),
            fc3=nn.Linear(8, 8),
            relu2=nn.ReLU(),
        )
    )
    starts, ends = random_pairs((2,), 3.0, seed=16)
    with pytest.raises(ValueError, match="'relu2' is not piecewise linear"):
        exact(model, starts, ends)


def test_exact_ignores_autocast_and_rejects_distances() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
    starts, ends = torch.randn(2, 4, 3) * 3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = exact(model, starts, ends)
    assert torch.equal(under_autocast.chi, exact(model, starts, ends).chi)
    with pytest.raises(ValueError, match="return_distances"):
        path_folding(model, starts, ends, exact=True, return_distances=True)


def test_max_pool_called_directly_on_torch() -> None:
    class DirectPool(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(1, 3, 3, padding=1)
            self.head = nn.Linear(3 * 4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.head(torch.max_pool1d(self.conv(x), 2).flatten(1)))

    torch.manual_seed(3)
    model = DirectPool().double()
    starts, ends = torch.randn(2, 3, 1, 8, dtype=torch.float64) * 2
    assert_same_walk(exact(model, starts, ends), path_folding(model, starts, ends, steps=DENSE_STEPS))


def test_tally_streams_packed_patterns_by_hand() -> None:
    # Two layers of one word each; patterns as (layer A, layer B) words. Path 0: (0,0) (1,0) | (3,1) (1,1);
    # path 1: (1,1) | (1,1) (0,1); "|" splits the two calls, so each path's first point of the second call follows
    # the last one streamed before it. Path 0 from its start: A 0,1,2,1 and B 0,0,1,1 (whole 0,1,3,2); steps: A
    # 1,1,1 and B 0,1,0 (3 changes). Path 1 from its start: A 0,0,1, B 0; steps: A 0,1 (1 change).
    def words(*pairs: tuple[int, int]) -> torch.Tensor:
        return torch.tensor(pairs, dtype=torch.int64)

    tally = _Tally(words((0, 0), (1, 1)), widths=[1, 1])
    tally.add(torch.tensor([0, 0, 1]), words((0, 0), (1, 0), (1, 1)))
    tally.add(torch.tensor([0, 0, 1, 1]), words((3, 1), (1, 1), (1, 1), (0, 1)))
    assert tally.layer_r1.tolist() == [[2, 1], [1, 0]]
    assert tally.layer_r2.tolist() == [[3, 1], [1, 0]]
    assert tally.r1.tolist() == [3, 1]
    assert tally.changes.tolist() == [3, 1]


def test_crossings_by_hand() -> None:
    # Rows of (gap, slope) pairs; zero is reached at tau = -gap / slope.
    #   row 0: 1 - 2 tau (ahead 0.5), -2 + tau (ahead 2), 0.5 + tau (behind -0.5): ahead 0.5, behind -0.5;
    #   row 1: 2 - tau (ahead 2), 0 + 0 tau (at zero, not moving: never crosses), 1 (not moving): ahead 2;
    #   row 2: 0 + 3 tau: on a boundary, ahead = behind = 0.
    gap = torch.tensor([[1.0, -2.0, 0.5], [2.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    slope = torch.tensor([[-2.0, 1.0, 1.0], [-1.0, 0.0, 0.0], [3.0, 1.0, -1.0]])
    ahead, behind = _crossings(slope / gap)
    assert ahead.dtype == torch.float64
    assert ahead.tolist() == [0.5, 2.0, 0.0]
    assert behind.tolist() == [-0.5, float("-inf"), 0.0]


class ConvolutionCount(TorchDispatchMode):
    """Counts the convolutions that reach the dispatcher."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket is torch.ops.aten.convolution
        return func(*args, **(kwargs or {}))


def eval_batch_norm(channels: int, affine: bool = True) -> nn.Module:
    norm = nn.BatchNorm2d(channels, affine=affine)
    with torch.no_grad():
        norm.running_mean.uniform_(-1.0, 1.0)
        norm.running_var.uniform_(0.5, 2.0)
        if affine:
            norm.weight.uniform_(-1.5, 1.5)
            norm.bias.uniform_(-1.0, 1.0)
    return norm.eval()


AFFINE_MAPS = {
    "linear": (lambda: nn.Linear(5, 4), (3, 5)),
    "linear-3d-input": (lambda: nn.Linear(5, 4, bias=False), (3, 2, 5)),
    "conv1d": (lambda: nn.Conv1d(2, 3, 3, padding=1), (3, 2, 7)),
    "conv2d-strided-no-bias": (lambda: nn.Conv2d(2, 3, 3, stride=2, bias=False), (3, 2, 7, 7)),
    "conv3d": (lambda: nn.Conv3d(1, 2, 2), (3, 1, 3, 3, 3)),
    "conv-transpose2d": (lambda: nn.ConvTranspose2d(2, 3, 2, stride=2), (3, 2, 4, 4)),
    "batch-norm-eval": (lambda: eval_batch_norm(2), (3, 2, 4, 4)),
    "batch-norm-eval-no-affine": (lambda: eval_batch_norm(2, affine=False), (3, 2, 4, 4)),
    "batch-norm-batch-statistics": (lambda: nn.BatchNorm2d(2, track_running_stats=False).eval(), (3, 2, 4, 4)),
    "batch-norm-training": (lambda: eval_batch_norm(2).train(), (3, 2, 4, 4)),
    "functional-bias-keyword": (
        lambda: lambda x: F.conv1d(x, torch.ones(3, 2, 2, dtype=x.dtype), bias=torch.arange(3.0, dtype=x.dtype)),
        (3, 2, 5),
    ),
}


def no_layers() -> _Probe:
    """A probe of a pass without activation layers (and so without max pooling to watch)."""
    return _Probe([], [], -1, torch.device("cpu"), torch.float64)


@pytest.mark.parametrize("name", AFFINE_MAPS)
def test_traversal_tangents_equal_forward_mode_ad(name: str) -> None:
    build, shape = AFFINE_MAPS[name]
    torch.manual_seed(12)
    function = build()
    x, direction = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    if isinstance(function, nn.Module):
        function.double()
    with torch.no_grad(), fwAD.dual_level():
        expected = fwAD.unpack_dual(function(fwAD.make_dual(x, direction)))  # PyTorch's forward-mode AD
        with _TraversalOps(probe=no_layers()):
            value, tangent = fwAD.unpack_dual(function(fwAD.make_dual(x, direction)))
    torch.testing.assert_close(value, expected.primal)
    torch.testing.assert_close(tangent, expected.tangent)


def test_traversal_runs_each_convolution_once_on_the_points_and_once_on_their_tangents() -> None:
    # PyTorch's forward-mode formula runs a third convolution, of the points with a zero weight tangent.
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU()).eval()
    x = torch.randn(2, 1, 8, 8)
    counter = ConvolutionCount()
    with torch.no_grad(), fwAD.dual_level(), _TraversalOps(probe=no_layers()), counter:
        model(fwAD.make_dual(x, torch.randn_like(x)))
    assert counter.count == 4


def test_the_points_first_affine_map_and_its_tangent_come_from_the_segments() -> None:
    generator = torch.Generator().manual_seed(3)
    starts, ends = torch.randn(3, 5, generator=generator, dtype=torch.float64), torch.randn(3, 5, generator=generator)
    ends = ends.double()
    weight, bias = torch.randn(4, 5, generator=generator).double(), torch.randn(4, generator=generator).double()
    index = torch.tensor([0, 0, 2, 1])
    line = Segments(starts, ends, torch.tensor([0.0, 0.5, 1.0, 0.25], dtype=torch.float64), index=index)
    probe = no_layers()
    probe.reset(4, line)
    with torch.no_grad(), fwAD.dual_level():
        dual = fwAD.make_dual(line.points, (ends - starts)[index])
        expected = fwAD.unpack_dual(F.linear(dual, weight, bias))  # PyTorch's forward-mode AD on every point
        with _TraversalOps(probe):
            value, tangent = fwAD.unpack_dual(F.linear(dual, weight, bias))
    assert probe.line is None  # taken: from the segments
    torch.testing.assert_close(value, expected.primal)
    torch.testing.assert_close(tangent, expected.tangent)
