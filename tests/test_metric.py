"""Tests for lightning_spacefold.metric.SpaceFolding (the torchmetrics Metric)."""

from __future__ import annotations

import importlib.util
import math
import socket
import statistics
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.wrappers import MetricTracker

import lightning_spacefold.metric as metric_module
from lightning_spacefold.folding import path_folding
from lightning_spacefold.metric import SpaceFolding
from lightning_spacefold.result import FoldingResult

matplotlib.use("Agg")

EXAMPLE = Path(__file__).parents[1] / "examples" / "centroid_vs_all_pairs.py"
NUM_CLASSES = 3


def make_result(
    chi: list[float],
    layer_chi: list[list[float]],
    names: list[str] | None = None,
    chi_max: list[float] | None = None,
    layer_chi_max: list[list[float]] | None = None,
) -> FoldingResult:
    """A hand-made result; only the fields the metric reads carry meaning (the maxima default to chi)."""
    chi_tensor, layer_tensor = torch.tensor(chi), torch.tensor(layer_chi)
    zeros = torch.zeros(len(chi), dtype=torch.long)
    return FoldingResult(
        chi=chi_tensor,
        r1=zeros,
        r2=zeros,
        layer_chi=layer_tensor,
        layer_r1=torch.zeros_like(layer_tensor, dtype=torch.long),
        layer_r2=torch.zeros_like(layer_tensor, dtype=torch.long),
        layer_names=names if names is not None else [f"layer{i}" for i in range(layer_tensor.shape[1])],
        steps=8,
        chi_max=chi_tensor if chi_max is None else torch.tensor(chi_max),
        layer_chi_max=layer_tensor if layer_chi_max is None else torch.tensor(layer_chi_max),
    )


def random_result(seed: int, num_paths: int, names: tuple[str, ...] = ("a", "b")) -> FoldingResult:
    """Chi values with about a third of zeros, as folding values look."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.rand(num_paths, len(names) + 1, generator=generator) * 0.9
    values[torch.rand(values.shape, generator=generator) < 0.35] = 0.0
    # Maxima over prefixes: above chi on folded paths, by amounts that differ from path to path.
    maxima = values + (values > 0) * torch.rand(values.shape, generator=generator) * 0.1
    return make_result(
        values[:, 0].tolist(), values[:, 1:].tolist(), list(names), maxima[:, 0].tolist(), maxima[:, 1:].tolist()
    )


def random_labels(seed: int, num_paths: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randint(NUM_CLASSES, (2, num_paths), generator=generator))


def small_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))


def model_paths(num_paths: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1)
    return tuple(torch.randn(2, num_paths, 2, generator=generator) * 3)


# --- statistics --------------------------------------------------------------------------------------------------


def test_statistics_of_a_hand_made_result() -> None:
    metric = SpaceFolding()
    layer_chi = [[0.0, 0.1], [0.5, 0.0], [0.25, 0.2], [0.0, 0.0], [0.75, 0.3]]
    chi_max = [0.0, 0.6, 0.5, 0.0, 0.8]
    layer_chi_max = [[0.0, 0.2], [0.5, 0.0], [0.5, 0.2], [0.0, 0.0], [0.75, 0.6]]
    result = make_result([0.0, 0.5, 0.25, 0.0, 0.75], layer_chi, ["features.1", "features.3"], chi_max, layer_chi_max)
    metric.update_from_result(result)
    values = metric.compute()
    assert list(values) == [
        "folding",
        "folding_median_nonzero",
        "folded_fraction",
        "folding_max",
        "folding_max_median_nonzero",
        "layer/features.1",
        "layer/features.3",
        "layer_max/features.1",
        "layer_max/features.3",
    ]
    assert values["folding"].item() == pytest.approx(0.3)
    assert values["folding_median_nonzero"].item() == pytest.approx(0.5)
    assert values["folded_fraction"].item() == pytest.approx(0.6)
    assert values["folding_max"].item() == pytest.approx(1.9 / 5)
    assert values["folding_max_median_nonzero"].item() == pytest.approx(0.6)
    assert values["layer/features.1"].item() == pytest.approx(0.3)
    assert values["layer/features.3"].item() == pytest.approx(0.12)
    assert values["layer_max/features.1"].item() == pytest.approx(1.75 / 5)
    assert values["layer_max/features.3"].item() == pytest.approx(0.2)


def test_median_of_an_even_count_is_the_mean_of_the_two_middle_values() -> None:
    chi = [0.0, 0.5, 0.25, 0.0, 0.75, 0.125]
    metric = SpaceFolding()
    metric.update_from_result(make_result(chi, [[0.0]] * 6))
    expected = statistics.median([value for value in chi if value > 0])
    assert expected == (0.25 + 0.5) / 2
    assert metric.compute()["folding_median_nonzero"].item() == pytest.approx(expected)


def test_no_folded_path_gives_zero_median_and_fraction() -> None:
    metric = SpaceFolding()
    metric.update_from_result(make_result([0.0, 0.0, 0.0], [[0.0], [0.0], [0.0]]))
    values = metric.compute()
    assert values["folding_median_nonzero"].item() == 0.0
    assert values["folded_fraction"].item() == 0.0
    assert values["folding"].item() == 0.0


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.one_of(st.just(0.0), st.floats(min_value=2**-10, max_value=1 - 2**-10, width=32)),
        min_size=1,
        max_size=40,
    ),
    st.integers(min_value=1, max_value=4),
)
def test_statistics_match_numpy_over_several_updates(chi: list[float], num_updates: int) -> None:
    metric = SpaceFolding()
    for part in np.array_split(np.arange(len(chi)), num_updates):
        if len(part) > 0:
            metric.update_from_result(make_result([chi[i] for i in part], [[chi[i], 0.5] for i in part]))
    values = metric.compute()
    nonzero = [value for value in chi if value > 0]
    expected_median = float(np.median(nonzero)) if nonzero else 0.0
    assert values["folding"].item() == pytest.approx(np.mean(chi), rel=1e-5, abs=1e-7)
    assert values["folding_median_nonzero"].item() == pytest.approx(expected_median, rel=1e-6)
    assert values["folded_fraction"].item() == pytest.approx(len(nonzero) / len(chi))
    assert values["layer/layer0"].item() == pytest.approx(np.mean(chi), rel=1e-5, abs=1e-7)
    assert values["layer/layer1"].item() == pytest.approx(0.5)


def test_class_pair_matrix() -> None:
    metric = SpaceFolding(num_classes=3)
    chi = [0.2, 0.4, 0.0, 0.6, 0.1]
    metric.update_from_result(make_result(chi[:3], [[0.0]] * 3), torch.tensor([0, 0, 1]), torch.tensor([1, 1, 2]))
    metric.update_from_result(make_result(chi[3:], [[0.0]] * 2), torch.tensor([1, 2]), torch.tensor([2, 2]))
    values = metric.compute()
    nan = math.nan
    expected = torch.tensor([[nan, 0.3, nan], [nan, nan, 0.3], [nan, nan, 0.1]])
    torch.testing.assert_close(values["class_pair_folding"], expected, equal_nan=True)
    assert values["class_pair_count"].tolist() == [[0, 2, 0], [0, 0, 2], [0, 0, 1]]
    assert values["folding"].item() == pytest.approx(0.26)


def test_update_with_a_model_equals_path_folding() -> None:
    model, (starts, ends) = small_mlp(), model_paths(40)
    metric = SpaceFolding(steps=32, batch_size=100)
    metric.update(model, starts[:25], ends[:25])
    metric.update(model, starts[25:], ends[25:])
    values = metric.compute()
    expected = path_folding(model, starts, ends, steps=32)
    assert expected.chi.gt(0).any(), "the paths must fold for the comparison to mean something"
    torch.testing.assert_close(values["folding"], expected.chi.mean())
    torch.testing.assert_close(values["folded_fraction"], expected.chi.gt(0).float().mean())
    for name, layer_mean in zip(expected.layer_names, expected.layer_chi.mean(0), strict=True):
        torch.testing.assert_close(values[f"layer/{name}"], layer_mean)


def test_settings_reach_path_folding() -> None:
    model, (starts, ends) = small_mlp(), model_paths(10)
    metric = SpaceFolding(steps=4, layers=["3"])
    metric.update(model, starts, ends)
    values = metric.compute()
    assert [key for key in values if key.startswith("layer/")] == ["layer/3"]
    expected = path_folding(model, starts, ends, steps=4, layers=["3"])
    torch.testing.assert_close(values["folding"], expected.chi.mean())


def test_exact_update_equals_exact_path_folding() -> None:
    model = small_mlp().double()
    starts, ends = (part.double() for part in model_paths(6))
    metric = SpaceFolding(exact=True)
    metric.update(model, starts, ends)
    expected = path_folding(model, starts, ends, exact=True)
    torch.testing.assert_close(metric.compute()["folding"], expected.chi.mean().to(metric.dtype))


def test_update_from_result_accumulates() -> None:
    metric = SpaceFolding()
    metric.update_from_result(make_result([0.5, 0.0], [[0.5], [0.0]]))
    assert metric.compute()["folding"].item() == pytest.approx(0.25)
    metric.update_from_result(make_result([0.25], [[0.25]]))
    assert metric.compute()["folding"].item() == pytest.approx(0.25)  # (0.5 + 0 + 0.25) / 3, not the cached value
    assert metric.update_count == 2


def test_forward_with_a_model() -> None:
    model, (starts, ends) = small_mlp(), model_paths(20)
    metric = SpaceFolding(steps=16)
    batch_value = metric(model, starts[:8], ends[:8])
    metric(model, starts[8:], ends[8:])
    torch.testing.assert_close(batch_value["folding"], path_folding(model, starts[:8], ends[:8], steps=16).chi.mean())
    torch.testing.assert_close(metric.compute()["folding"], path_folding(model, starts, ends, steps=16).chi.mean())


def test_compute_without_paths_raises() -> None:
    with (
        pytest.warns(UserWarning, match="called before the ``update``"),
        pytest.raises(RuntimeError, match="at least one"),
    ):
        SpaceFolding().compute()


def test_reset_forgets_paths_and_layer_names() -> None:
    metric = SpaceFolding()
    metric.update_from_result(make_result([0.5], [[0.5]], ["a"]))
    metric.reset()
    metric.update_from_result(make_result([0.0], [[0.0]], ["b"]))
    assert list(metric.compute()) == [
        "folding",
        "folding_median_nonzero",
        "folded_fraction",
        "folding_max",
        "folding_max_median_nonzero",
        "layer/b",
        "layer_max/b",
    ]


def test_merged_states_with_different_layers_are_rejected() -> None:
    first, second = SpaceFolding(), SpaceFolding()
    first.update_from_result(make_result([0.5], [[0.5]], ["a"]))
    second.update_from_result(make_result([0.5], [[0.5]], ["b"]))
    first.merge_state(second)
    with pytest.raises(ValueError, match="different layers"):
        first.compute()


def test_float64_states() -> None:
    metric = SpaceFolding().set_dtype(torch.float64)
    metric.update_from_result(make_result([0.5, 0.0], [[0.5], [0.0]], ["a"]))
    values = metric.compute()
    assert values["folding"].dtype == torch.float64
    assert values["folding_max"].dtype == torch.float64
    assert list(values)[-2:] == ["layer/a", "layer_max/a"]


# --- argument checks ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"steps": 0}, ValueError, "`steps` to be an integer >= 1"),
        ({"steps": 2.5}, ValueError, "`steps` to be an integer >= 1"),
        ({"steps": True}, ValueError, "`steps` to be an integer >= 1"),
        ({"exact": 1}, TypeError, "`exact` to be a bool"),
        ({"layers": "features.1"}, TypeError, "sequence of layer names"),
        ({"layers": [1]}, TypeError, "sequence of layer names"),
        ({"layers": []}, ValueError, "at least one layer"),
        ({"batch_size": 0}, ValueError, "`batch_size` to be None or an integer >= 1"),
        ({"num_classes": 0}, ValueError, "`num_classes` to be None or an integer >= 1"),
        ({"num_classes": 2.0}, ValueError, "`num_classes` to be None or an integer >= 1"),
    ],
)
def test_bad_constructor_arguments(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        SpaceFolding(**kwargs)


LABELS = torch.tensor([0, 1])


@pytest.mark.parametrize(
    ("num_classes", "labels", "error", "match"),
    [
        (3, (LABELS, None), ValueError, "both `start_labels` and `end_labels`, or neither"),
        (None, (None, LABELS), ValueError, "both `start_labels` and `end_labels`, or neither"),
        (None, (LABELS, LABELS), ValueError, "no `num_classes`"),
        (3, (None, None), ValueError, "every update needs `start_labels`"),
        (3, ([0, 1], LABELS), TypeError, "`start_labels` to be a torch.Tensor"),
        (3, (LABELS, LABELS.float()), TypeError, "`end_labels` to have an integer dtype"),
        (3, (LABELS, torch.tensor([0, 1, 2])), ValueError, r"`end_labels` of shape \[2\]"),
        (3, (LABELS[None], LABELS), ValueError, r"`start_labels` of shape \[2\]"),
        (3, (LABELS, torch.tensor([0, 3])), ValueError, r"`end_labels` in \[0, num_classes\) = \[0, 3\), got 3"),
        (3, (torch.tensor([-1, 0]), LABELS), ValueError, r"`start_labels` in \[0, num_classes\).*got -1"),
    ],
)
def test_bad_labels(
    monkeypatch: pytest.MonkeyPatch,
    num_classes: int | None,
    labels: tuple[Any, Any],
    error: type[Exception],
    match: str,
) -> None:
    result = make_result([0.5, 0.0], [[0.5], [0.0]])
    with pytest.raises(error, match=match):
        SpaceFolding(num_classes=num_classes).update_from_result(result, *labels)

    def no_measurement(*args: Any, **kwargs: Any) -> FoldingResult:
        raise AssertionError("labels must be checked before the paths are measured")

    monkeypatch.setattr(metric_module, "path_folding", no_measurement)
    with pytest.raises(error, match=match):
        SpaceFolding(num_classes=num_classes).update(small_mlp(), *model_paths(2), *labels)


def test_bad_results() -> None:
    metric = SpaceFolding()
    with pytest.raises(TypeError, match="`result` to be a FoldingResult"):
        metric.update_from_result(torch.zeros(3))
    with pytest.raises(ValueError, match="at least one path"):
        metric.update_from_result(make_result([], torch.zeros(0, 1).tolist(), ["a"]))
    with pytest.raises(ValueError, match=r"`result.layer_chi` of shape \[P, L\] = \[2, 2\]"):
        metric.update_from_result(make_result([0.5, 0.0], [[0.5], [0.0]], ["a", "b"]))
    assert metric.update_count == 0


def test_layers_must_stay_the_same() -> None:
    metric = SpaceFolding()
    metric.update_from_result(make_result([0.5], [[0.5, 0.0]], ["a", "b"]))
    with pytest.raises(ValueError, match=r"earlier updates measured \['a', 'b'\], this one \['a'\]"):
        metric.update_from_result(make_result([0.5], [[0.5]], ["a"]))
    model = small_mlp()
    metric = SpaceFolding(steps=4)
    metric.update(model, *model_paths(3))
    with pytest.raises(ValueError, match="earlier updates measured"):
        metric.update_from_result(path_folding(model, *model_paths(3), steps=4, layers=["1"]))


def test_bad_inputs_are_reported_by_path_folding() -> None:
    with pytest.raises(ValueError, match="same shape"):
        SpaceFolding().update(small_mlp(), torch.zeros(3, 2), torch.zeros(4, 2))


# --- torchmetrics integration ------------------------------------------------------------------------------------


def test_plot_single_value_and_sequence() -> None:
    import matplotlib.pyplot as plt

    metric = SpaceFolding(num_classes=NUM_CLASSES)
    values = []
    for seed in range(3):
        metric.update_from_result(random_result(seed, 6), *random_labels(seed, 6))
        values.append(metric.compute())
    for fig, ax in (metric.plot(), metric.plot(values), metric.plot(values[0]["folding"])):
        assert isinstance(fig, plt.Figure)
        assert ax.get_lines()
    labels = {line.get_label() for line in metric.plot(values)[1].get_lines()}
    assert {"folding", "folding_median_nonzero", "folded_fraction", "layer/a", "layer/b"} <= labels
    plt.close("all")


def test_metric_collection_with_prefix() -> None:
    model, (starts, ends) = small_mlp(), model_paths(12)
    collection = MetricCollection({"fold": SpaceFolding(steps=8)}, prefix="val/")
    collection.update(model, starts, ends)
    values = collection.compute()
    expected = path_folding(model, starts, ends, steps=8)
    assert set(values) == {
        "val/folding",
        "val/folding_median_nonzero",
        "val/folded_fraction",
        "val/folding_max",
        "val/folding_max_median_nonzero",
        *(f"val/layer/{name}" for name in expected.layer_names),
        *(f"val/layer_max/{name}" for name in expected.layer_names),
    }
    torch.testing.assert_close(values["val/folding"], expected.chi.mean())
    torch.testing.assert_close(values["val/folding_max"], expected.chi_max.mean())


def test_metric_tracker() -> None:
    # best_metric needs a collection and an explicit ``maximize`` for metrics that return a dict.
    model, (starts, ends) = small_mlp(), model_paths(30)
    tracker = MetricTracker(MetricCollection([SpaceFolding(steps=16)]), maximize=True)
    expected = []
    for epoch in range(3):
        part = slice(10 * epoch, 10 * epoch + 10)
        tracker.increment()
        tracker.update(model, starts[part], ends[part])
        expected.append(path_folding(model, starts[part], ends[part], steps=16).chi.mean())
    history = tracker.compute_all()
    torch.testing.assert_close(history["folding"], torch.stack(expected))
    best, step = tracker.best_metric(return_step=True)
    assert best["folding"] == pytest.approx(max(expected).item())
    assert step["folding"] == int(torch.stack(expected).argmax())


# --- distributed -------------------------------------------------------------------------------------------------

# Paths 0..10 of ``random_result(seed=0, 11)``, split over two processes as (start, stop) slices per update.
SCENARIOS = {
    "uneven": ([(0, 3), (3, 8)], [(8, 11)]),
    "rank 1 without update": ([(0, 4), (4, 11)], []),
}
DDP_PATHS = 11


def _ddp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size, timeout=timedelta(seconds=30)
    )
    try:
        everything, labels = random_result(0, DDP_PATHS), random_labels(0, DDP_PATHS)
        outputs: dict[str, Any] = {}
        for name, shares in SCENARIOS.items():
            metric = SpaceFolding(num_classes=NUM_CLASSES)
            for first, stop in shares[rank]:
                metric.update_from_result(_slice(everything, first, stop), labels[0][first:stop], labels[1][first:stop])
            outputs[name] = metric.compute()

        model, (starts, ends) = small_mlp(), model_paths(7)
        share = slice(0, 5) if rank == 0 else slice(5, 7)
        metric = SpaceFolding(steps=16)
        metric.update(model, starts[share], ends[share])
        outputs["model"] = metric.compute()

        # Checked in every process: a failure there fails the spawn, hence the test.
        metric = SpaceFolding()
        metric.update_from_result(random_result(rank, 2, names=("a", "b") if rank == 0 else ("a", "c")))
        with pytest.raises(ValueError, match=r'different layers.*\["a", "b"\] and \["a", "c"\]'):
            metric.compute()
        with (
            pytest.warns(UserWarning, match="before the ``update``"),
            pytest.raises(RuntimeError, match="at least one measured path"),
        ):
            SpaceFolding().compute()
        torch.save(outputs, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _slice(result: FoldingResult, first: int, stop: int) -> FoldingResult:
    return result.select(slice(first, stop))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ddp_equals_one_process_over_all_paths(tmp_path: Path) -> None:
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]

    reference = SpaceFolding(num_classes=NUM_CLASSES)
    reference.update_from_result(random_result(0, DDP_PATHS), *random_labels(0, DDP_PATHS))
    expected = reference.compute()
    assert expected["folding_median_nonzero"] > 0
    assert expected["class_pair_count"].sum() == DDP_PATHS
    model, (starts, ends) = small_mlp(), model_paths(7)
    reference_model = SpaceFolding(steps=16)
    reference_model.update(model, starts, ends)
    expected_model = reference_model.compute()

    for outputs in ranks:
        for name in SCENARIOS:
            assert list(outputs[name]) == list(expected), name
            for key, value in expected.items():
                torch.testing.assert_close(outputs[name][key], value, equal_nan=True, msg=f"{name}: {key}")
        assert list(outputs["model"]) == list(expected_model)
        for key, value in expected_model.items():
            torch.testing.assert_close(outputs["model"][key], value, msg=key)


# --- example -----------------------------------------------------------------------------------------------------


def test_centroid_example_quick(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location("centroid_vs_all_pairs", EXAMPLE)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    monkeypatch.syspath_prepend(str(EXAMPLE.parent))  # the example imports the examples' shared digits.py
    # Registered first, as importlib's recipe does: its dataclass looks its module up while being defined.
    monkeypatch.setitem(sys.modules, spec.name, example)
    spec.loader.exec_module(example)
    rows = example.main(["--quick", "--steps", "8"])
    assert [row.strategy for row in rows] == ["all pairs", "centroid pairs (k=2)", "random pairs (as many)"]
    assert rows[0].paths == 60 * 59
    assert rows[1].paths == rows[2].paths == 10 * 9 * 4 + 10 * 2
    for row in rows:
        assert all(0.0 <= value < 1.0 for value in row.folding)
    assert "| all pairs |" in capsys.readouterr().out


def test_centroid_example_over_networks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location("centroid_vs_all_pairs", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    monkeypatch.syspath_prepend(str(EXAMPLE.parent))
    monkeypatch.setitem(sys.modules, spec.name, example)
    spec.loader.exec_module(example)
    arguments = ["--quick", "--dataset", "mnist1d", "--steps", "8", "--model-seeds", "2", "--centroids", "1", "2"]
    rows = example.main([*arguments, "--out", str(tmp_path)])
    strategies = ["all pairs", "centroid pairs (k=1)", "random pairs (as many as k=1)", "centroid pairs (k=2)"]
    assert [row.strategy for row in rows[:4]] == strategies and len(rows) == 2 * 5
    assert [row.paths for row in rows[:5]] == [60 * 59, 10 * 9, 10 * 9, 10 * 9 * 4 + 10 * 2, 10 * 9 * 4 + 10 * 2]
    assert len((tmp_path / "centroids.csv").read_text().splitlines()) == 1 + 2 * 5
    table = (tmp_path / "centroids.md").read_text()
    assert table.startswith("MNIST-1D, MLP with 2 hidden layers") and "| centroid pairs (k=2) | 380 |" in table
