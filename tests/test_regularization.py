"""soft_folding against the exact measure and hand-built networks, its gradients, and the penalty's schedules."""

from __future__ import annotations

import importlib.util
import itertools
import math
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_spacefold import path_folding, register_activation
from lightning_spacefold.regularization import folding_penalty, regularization_weight, soft_folding

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "soft_folding_quality.py"


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """The networks are tiny: one thread is faster than two fighting over a shared machine's cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mlp(seed: int = 0, widths: tuple[int, ...] = (4, 16, 16), outputs: int = 3) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(widths[-1], outputs))


def pairs(num_paths: int, dim: int = 4, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return 2 * torch.randn(num_paths, dim, generator=generator), 2 * torch.randn(num_paths, dim, generator=generator)


def zigzag(delta: float) -> nn.Sequential:
    """On the segment x = 0 .. 1, layer "3" has a unit swinging between about -0.8 delta and 1.2 delta, crossing zero
    at x = 0.1, 0.4, 0.6 and 0.9, and a unit 10 x - 4.7 crossing once: its hard chi is 1 - 2 / 5 for any delta > 0.
    """
    model = nn.Sequential(nn.Linear(1, 4), nn.ReLU(), nn.Linear(4, 2), nn.ReLU(), nn.Linear(2, 1))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].bias.copy_(torch.tensor([0.0, -0.25, -0.5, -0.75]))  # hinges at 0, 1/4, 1/2, 3/4
        triangle = torch.tensor([1.0, -2.0, 2.0, -2.0])  # a triangle wave between 0 and 1/4
        model[2].weight.copy_(torch.stack([delta / 0.125 * triangle, torch.tensor([10.0, 0.0, 0.0, 0.0])]))
        model[2].bias.copy_(torch.tensor([-0.1 / 0.125 * delta, -4.7]))
    return model


SEGMENT = (torch.zeros(1, 1), torch.ones(1, 1))


# --- the gradient ---------------------------------------------------------------------------------------------------


def test_penalty_gradient_is_task_gradient_plus_weighted_surrogate_gradient() -> None:
    model = mlp().double()
    starts, ends = (x.double() for x in pairs(8))
    inputs, targets = torch.randn(16, 4, dtype=torch.float64), torch.randint(3, (16,))
    params = list(model.parameters())
    weight = 0.7

    def task() -> torch.Tensor:
        return F.cross_entropy(model(inputs), targets)

    total = torch.autograd.grad(task() + folding_penalty(model, starts, ends, weight), params)
    task_grads = torch.autograd.grad(task(), params)
    surrogate = torch.autograd.grad(-soft_folding(model, starts, ends).mean(), params, allow_unused=True)
    assert surrogate[-1] is None and surrogate[-2] is None  # the output layer comes after every activation
    for name, got, plain, extra in zip(
        [name for name, _ in model.named_parameters()], total, task_grads, surrogate, strict=True
    ):
        expected = plain if extra is None else plain + weight * extra
        torch.testing.assert_close(got, expected, msg=name)
    assert any(extra is not None and extra.abs().sum() > 0 for extra in surrogate)


def test_gradients_reach_every_parameter_before_the_last_activation() -> None:
    model = nn.Sequential(
        nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.GELU(),
        nn.Linear(8, 2),
    )  # fmt: skip
    model.train()
    soft_folding(model, *pairs(16), temperature=0.3).mean().backward()
    for name, parameter in model.named_parameters():
        if name.startswith("7."):
            assert parameter.grad is None, name
        else:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_one_batched_forward_over_all_points() -> None:
    model = mlp()
    batches: list[int] = []
    model.register_forward_pre_hook(lambda _module, args: batches.append(len(args[0])))
    soft_folding(model, *pairs(5), steps=7)
    # One forward over all points, after the discovery of the layers on the first path's two ends.
    assert batches == [2, 5 * 8]


# --- agreement with the exact measure, flat paths, hovering ---------------------------------------------------------


def test_low_temperature_approaches_the_hard_chi() -> None:
    model = mlp()
    starts, ends = pairs(64)
    hard = path_folding(model, starts, ends, steps=16).chi
    assert (hard > 0).sum() >= 10  # the comparison needs folding paths
    soft = soft_folding(model, starts, ends, steps=16, temperature=1e-3).detach()
    assert (soft - hard).abs().mean() < 0.02
    # A higher temperature is further from the hard chi.
    assert (soft_folding(model, starts, ends, steps=16, temperature=0.3).detach() - hard).abs().mean() > 0.03


def test_path_inside_one_region_gives_zero_at_every_temperature() -> None:
    model = mlp().double()  # float64: the soft bits' steps along a short path are far above rounding
    starts, _ = (x.double() for x in pairs(16))
    ends = starts + 1e-3 * torch.randn(starts.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert path_folding(model, starts, ends, steps=256).r2.sum() == 0
    for temperature in (1e-3, 0.1, 1.0, 10.0):
        chi = soft_folding(model, starts, ends, temperature=temperature)
        assert chi.dtype == torch.float64 and chi.abs().max() < 1e-9
    starts = pairs(16)[0]
    assert soft_folding(mlp(), starts, starts).abs().max() == 0  # a path of length zero, float32


def test_single_hidden_layer_is_flat_at_every_temperature() -> None:
    """Pre-activations of the first layer are affine along a segment: every soft bit is monotone, chi_soft = 0."""
    model = mlp(widths=(4, 32))
    starts, ends = pairs(32)
    assert path_folding(model, starts, ends, steps=16).r2.min() > 0  # the paths cross regions...
    for temperature in (1e-3, 0.1, 1.0):
        assert soft_folding(model, starts, ends, temperature=temperature).abs().max() < 1e-5  # ...without folding


def test_unit_sitting_at_zero_adds_nothing() -> None:
    """The independent-coupling distance s (1 - s') + s' (1 - s) would count a unit held at z = 0 as half a flip at
    every step; the surrogate's distance does not."""
    model = mlp(widths=(4, 32))
    with torch.no_grad():
        model[0].weight[:16] = 0.0
        model[0].bias[:16] = 0.0
    starts, ends = pairs(8)
    assert soft_folding(model, starts, ends).abs().max() < 1e-5
    z = model[0](torch.lerp(starts[:, None], ends[:, None], torch.linspace(0, 1, 17)[:, None]))
    s = torch.sigmoid(z / (0.1 * z.std(dim=(1, 2), keepdim=True)))
    independent = lambda a, b: (a * (1 - b) + b * (1 - a)).sum(-1)  # noqa: E731
    naive = 1 - independent(s[:, :1], s).amax(-1) / independent(s[:, 1:], s[:, :-1]).sum(-1)
    assert naive.min() > 0.5


def test_shallow_crossings_count_less_than_crossings_with_a_margin() -> None:
    """The hard chi of the zig-zag net is the same for every swing size; the surrogate rewards only wide swings."""
    wide, shallow = zigzag(5.0), zigzag(0.01)
    for model in (wide, shallow):
        result = path_folding(model, *SEGMENT, steps=16, layers=["3"])
        assert result.r2.item() == 5 and result.r1.item() == 2
    assert soft_folding(wide, *SEGMENT, layers=["3"]).item() > 0.5
    assert soft_folding(shallow, *SEGMENT, layers=["3"]).item() < 0.1


def test_each_path_is_independent_of_the_rest_of_the_batch() -> None:
    model = mlp()
    starts, ends = pairs(12)
    torch.testing.assert_close(soft_folding(model, starts, ends)[:3], soft_folding(model, starts[:3], ends[:3]))


def test_in_place_and_functional_activations() -> None:
    class Functional(nn.Module):
        def __init__(self, inplace: bool) -> None:
            super().__init__()
            self.first, self.second = nn.Linear(4, 16), nn.Linear(16, 16)
            self.relu = nn.ReLU(inplace=inplace)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.leaky_relu(self.second(self.relu(self.first(x)))).sum(-1)

    starts, ends = pairs(8)
    torch.manual_seed(0)
    plain = Functional(inplace=False)
    inplace = Functional(inplace=True)
    inplace.load_state_dict(plain.state_dict())
    values = [soft_folding(model, starts, ends) for model in (plain, inplace)]
    torch.testing.assert_close(values[0], values[1])
    assert values[0].max() > 0
    grads = [
        torch.autograd.grad(value.sum(), model.first.weight)[0]
        for value, model in zip(values, (plain, inplace), strict=True)
    ]
    torch.testing.assert_close(grads[0], grads[1])


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    temperature=st.floats(1e-3, 3.0),
    steps=st.integers(1, 24),
    smooth_max=st.floats(0.5, 50.0),
)
def test_soft_chi_lies_in_unit_interval(seed: int, temperature: float, steps: int, smooth_max: float) -> None:
    model = mlp(seed, widths=(3, 8, 8, 8))
    chi = soft_folding(model, *pairs(6, dim=3, seed=seed), steps=steps, temperature=temperature, smooth_max=smooth_max)
    assert chi.shape == (6,) and chi.dtype == torch.float32
    assert bool(((chi >= 0) & (chi < 1)).all())


# --- optimisation ---------------------------------------------------------------------------------------------------


def test_maximising_the_surrogate_raises_the_exact_folding() -> None:
    model = mlp(widths=(2, 16, 16), outputs=2)
    starts, ends = pairs(32, dim=2)
    before = path_folding(model, starts, ends, steps=256).chi.mean().item()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        optimizer.zero_grad()
        folding_penalty(model, starts, ends, 1.0).backward()
        optimizer.step()
    after = path_folding(model, starts, ends, steps=256).chi.mean().item()
    assert after > before + 0.2


# --- modes and BatchNorm --------------------------------------------------------------------------------------------


def test_batchnorm_running_statistics_and_modes_are_kept() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    model.train()
    model(torch.randn(32, 4))  # running statistics away from their initial values
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    starts, ends = pairs(8)
    train_mode = soft_folding(model, starts, ends)
    train_mode.mean().backward()
    for name, buffer in model.named_buffers():
        torch.testing.assert_close(buffer, buffers[name], rtol=0, atol=0, msg=name)
    assert all(module.training for module in model.modules())
    assert model[1].weight.grad.abs().sum() > 0
    model.eval()  # the surrogate followed the running statistics, as the eval-mode network does
    torch.testing.assert_close(train_mode, soft_folding(model, starts, ends))
    assert not any(module.training for module in model.modules())


# --- schedules ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("step", "schedule", "until", "expected"),
    [
        (0, "constant", 1.0, 2.0),
        (99, "constant", 1.0, 2.0),
        (150, "constant", 1.0, 2.0),  # past the run's estimated length
        (49, "constant", 0.5, 2.0),
        (50, "constant", 0.5, 0.0),
        (0, "linear", 1.0, 2.0),
        (50, "linear", 1.0, 1.0),
        (25, "linear", 0.5, 1.0),
        (40, "linear", 0.8, 1.0),
        (10, "linear", 0.5, 1.6),
        (50, "linear", 0.5, 0.0),
        (100, "linear", 1.0, 0.0),
        (120, "linear", 1.0, 0.0),
        (0, "cosine", 1.0, 2.0),
        (50, "cosine", 1.0, 1.0),
        (25, "cosine", 0.5, 1.0),
        (25, "cosine", 1.0, 1.0 + math.sqrt(0.5)),
        (100, "cosine", 1.0, 0.0),
        (70, "cosine", 0.5, 0.0),
    ],
)
def test_schedules(step: int, schedule: str, until: float, expected: float) -> None:
    assert regularization_weight(step, 100, 2.0, schedule, until) == pytest.approx(expected, abs=1e-12)


# --- bad arguments --------------------------------------------------------------------------------------------------


class Square(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x


register_activation(Square, bits=lambda z: z.abs() > 1)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"model": "net"}, TypeError, "torch.nn.Module"),
        ({"starts": [[0.0] * 4]}, TypeError, "`starts` must be a torch.Tensor"),
        ({"starts": torch.zeros(2, 4, dtype=torch.long)}, TypeError, "floating point"),
        ({"ends": torch.zeros(3, 4)}, ValueError, "same shape"),
        ({"starts": torch.zeros(0, 4), "ends": torch.zeros(0, 4)}, ValueError, "at least one path"),
        ({"starts": torch.full((2, 4), math.nan)}, ValueError, "finite"),
        ({"steps": 0}, ValueError, "`steps` must be an integer >= 1"),
        ({"steps": 2.5}, ValueError, "`steps` must be an integer >= 1"),
        ({"temperature": 0.0}, ValueError, "`temperature` must be > 0"),
        ({"temperature": -0.1}, ValueError, "`temperature` must be > 0"),
        ({"temperature": math.inf}, ValueError, "`temperature` must be finite"),
        ({"temperature": "0.1"}, TypeError, "`temperature` must be a real number"),
        ({"temperature": True}, TypeError, "`temperature` must be a real number"),
        ({"smooth_max": 0}, ValueError, "`smooth_max` must be > 0"),
        ({"smooth_max": math.nan}, ValueError, "`smooth_max` must be finite"),
        ({"eps": 0.0}, ValueError, "`eps` must be > 0"),
        ({"model": nn.Sequential(nn.Linear(4, 2))}, ValueError, "No supported activation"),
        ({"layers": ["9"]}, ValueError, "Unknown layer name"),
        ({"layers": []}, ValueError, "`layers` is empty"),
        ({"model": nn.Sequential(nn.Linear(4, 3), Square(), nn.Linear(3, 1))}, ValueError, "custom `bits` rule"),
    ],
)
def test_bad_arguments(kwargs: dict, error: type[Exception], match: str) -> None:
    arguments = {"model": mlp(), "starts": torch.zeros(2, 4), "ends": torch.ones(2, 4), **kwargs}
    with pytest.raises(error, match=match):
        soft_folding(arguments.pop("model"), arguments.pop("starts"), arguments.pop("ends"), **arguments)


def test_custom_rule_layer_can_be_left_out() -> None:
    model = nn.Sequential(nn.Linear(4, 3), Square(), nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 1))
    assert soft_folding(model, *pairs(2), layers=["3"]).shape == (2,)


@pytest.mark.parametrize(
    ("weight", "error", "match"),
    [("1", TypeError, "`weight` must be a real number"), (math.nan, ValueError, "`weight` must be finite")],
)
def test_bad_penalty_weight(weight: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        folding_penalty(mlp(), *pairs(2), weight)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("arguments", "error", "match"),
    [
        (
            (0, 100, 1.0, "step"),
            ValueError,
            "Unknown schedule 'step'; the schedules are 'constant', 'linear', 'cosine'",
        ),
        ((-1, 100, 1.0), ValueError, "`step` must be >= 0"),
        ((1.0, 100, 1.0), TypeError, "`step` must be an integer"),
        ((0, 0, 1.0), ValueError, "`total_steps` must be >= 1"),
        ((0, 100, math.inf), ValueError, "`weight` must be finite"),
        ((0, 100, None), TypeError, "`weight` must be a real number"),
        ((0, 100, 1.0, "linear", 0.0), ValueError, r"`until` must be a fraction of the run in \(0, 1\]"),
        ((0, 100, 1.0, "linear", 1.5), ValueError, r"`until` must be a fraction of the run in \(0, 1\]"),
    ],
)
def test_bad_schedule_arguments(arguments: tuple, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        regularization_weight(*arguments)


# --- the example ----------------------------------------------------------------------------------------------------


def test_quality_example_quick_run(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location("soft_folding_quality", EXAMPLE)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, example)  # its dataclass looks its module up while being defined
    spec.loader.exec_module(example)
    rows, hard_mean, hard_seconds = example.main(["--quick"])
    assert [row.temperature for row in rows] == list(example.TEMPERATURES)
    assert all(math.isfinite(row.pearson) and math.isfinite(row.spearman) for row in rows)
    assert rows[0].pearson > 0 and 0 <= hard_mean < 1 and hard_seconds > 0
    assert "| temperature | Pearson | Spearman |" in capsys.readouterr().out


def test_constant_weight_with_an_unknown_run_length() -> None:
    import math

    assert regularization_weight(10, math.inf, 0.5) == 0.5
    with pytest.raises(ValueError, match="needs the run's length"):
        regularization_weight(10, math.inf, 0.5, "linear")
