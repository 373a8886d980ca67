"""The examples that reproduce the papers: each runs in --quick mode, plus hand-checked pieces of each."""

from __future__ import annotations

import csv
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

from lightning_spacefold import path_folding, path_patterns

EXAMPLES = Path(__file__).parent.parent / "examples"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """As the examples do when run as scripts: on a busy machine, OpenMP threads spin and tiny models crawl."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cantornet() -> ModuleType:
    return load("cantornet")


@pytest.fixture(scope="module")
def adversarial() -> ModuleType:
    return load("adversarial_interaction")


@pytest.mark.parametrize(("dataset", "chance"), [("digits", 0.5), ("mnist1d", 0.15)])
def test_depth_sweep_quick(tmp_path: Path, dataset: str, chance: float) -> None:
    results = load("depth_sweep").main(["--quick", "--dataset", dataset, "--out", str(tmp_path)])
    shallow, deep = results["rows"]
    assert (shallow["depth"], shallow["width"], deep["depth"], deep["width"]) == (1, 32, 3, 20)
    # One hidden layer: every unit's pre-activation is affine along a segment and flips at most once, so no path folds.
    assert shallow["chi_mean"] == 0.0 and shallow["folded_share"] == 0.0
    assert 0.0 <= deep["chi_mean"] < 1.0 and 0.0 <= deep["folded_share"] <= 1.0
    for row in results["rows"]:
        assert row["regions_mean"] >= 1.0  # exact traversal counts the regions; at least the start's
        assert chance < row["val_accuracy"] <= 1.0
    with open(tmp_path / "depth_sweep.csv") as file:
        assert len(list(csv.DictReader(file))) == 2
    assert "| 3 x 20 |" in (tmp_path / "depth_sweep.md").read_text()
    assert (tmp_path / "depth_sweep.png").stat().st_size > 10_000


def test_cantornet_first_recursion_computes_the_cantor_fold(cantornet: ModuleType) -> None:
    x = torch.linspace(0, 1, 301, dtype=torch.float64)
    points = torch.stack([x, torch.full_like(x, 0.75)], dim=1)
    folded = cantornet.cantornet(1)[:4](points)
    # A(x) = max(1 - 3x, 0, 3x - 2): [0, 1/3] -> [1, 0], [1/3, 2/3] -> 0, [2/3, 1] -> [0, 1]; y passes through.
    expected = torch.stack([torch.maximum(torch.maximum(1 - 3 * x, torch.zeros_like(x)), 3 * x - 2), points[:, 1]], 1)
    torch.testing.assert_close(folded, expected)
    assert torch.equal(cantornet.cantornet(3)(points) > 0, cantornet.cantornet(3)[:12](points)[:, :1] < 0.5)


def test_cantornet_depth_one_by_hand(cantornet: ModuleType) -> None:
    # Along y = 3/4, with A = A(x), the bits are [3x-2 > 0, 1-3x > 0, y > 0 | A > 0, y > 0 | A < 1/2]:
    #   [0, 1/6]    A = 1 - 3x >= 1/2   a = 011 11 0
    #   (1/6, 1/3)  A = 1 - 3x in (0, 1/2)  b = 011 11 1
    #   [1/3, 2/3]  A = 0               c = 001 01 1
    #   (2/3, 5/6)  A = 3x - 2 in (0, 1/2)  d = 101 11 1
    #   [5/6, 1]    A = 3x - 2 >= 1/2   e = 101 11 0
    # Five regions; distances from a: b 1, c 3, d 3, e 2, so r1 = 3; steps a-b 1, b-c 2, c-d 2, d-e 1, so r2 = 6 and
    # chi = 1 - 3/6 = 1/2.
    a, b, c, d, e = ([int(bit) for bit in word] for word in ("011110", "011111", "001011", "101111", "101110"))
    model = cantornet.cantornet(1)
    start, end = (torch.tensor([point], dtype=torch.float64) for point in cantornet.SEGMENT)
    exact = path_folding(model, start, end, exact=True)
    assert exact.regions.tolist() == [5] and (exact.r1.item(), exact.r2.item()) == (3, 6)
    assert exact.chi.item() == pytest.approx(0.5)
    # At t = 0, 0.1, ..., 1 the points fall in a a b b c c c d d e e: the running chi of pi_0..pi_i is 0 until c
    # (a shortest walk so far), 1 - 3/5 at d and 1 - 3/6 at e.
    patterns = path_patterns(model, start, end, steps=10)
    assert patterns[0].int().tolist() == [a, a, b, b, c, c, c, d, d, e, e]
    running = cantornet.running_folding(patterns)[0]
    torch.testing.assert_close(running, torch.tensor([0, 0, 0, 0, 0, 0, 0.4, 0.4, 0.5, 0.5]))


@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5])
def test_cantornet_regions_and_folding_at_every_depth(cantornet: ModuleType, depth: int) -> None:
    # Each recursion maps the segment onto two copies of the previous walk (A folds [0, 1/3] and [2/3, 1] onto
    # [0, 1]) joined through the collapsed middle third: regions 2 * R + 1 from R = 5 at depth 1, i.e. 3 * 2^k - 1;
    # walk length 2 * r2 + 4 from 6, i.e. 5 * 2^k - 4; and the farthest pattern two bits farther per recursion,
    # r1 = 2k + 1. The reproductions page's table: chi = 1 - (2k + 1) / (5 * 2^k - 4) = 0.5, 0.6875, 0.8056, 0.8816,
    # 0.9295.
    model = cantornet.cantornet(depth)
    start, end = (torch.tensor([point], dtype=torch.float64) for point in cantornet.SEGMENT)
    exact = path_folding(model, start, end, exact=True)
    assert exact.regions.item() == 3 * 2**depth - 1
    assert (exact.r1.item(), exact.r2.item()) == (2 * depth + 1, 5 * 2**depth - 4)
    assert exact.chi.item() == pytest.approx(1 - (2 * depth + 1) / (5 * 2**depth - 4))
    # Ten steps see every region up to depth 2 and miss some from depth 3 on: the table's 0.750, 0.812, 0.825.
    sampled = path_folding(model, start, end, steps=10)
    expected = {1: (3, 6), 2: (5, 16), 3: (6, 24), 4: (6, 32), 5: (7, 40)}[depth]
    assert (sampled.r1.item(), sampled.r2.item()) == expected


def test_cantornet_quick(cantornet: ModuleType, tmp_path: Path) -> None:
    results = cantornet.main(["--quick", "--out", str(tmp_path)])
    assert results["regions"][1] == 5 and results["chi"][1] == pytest.approx(0.5)
    assert results["running"][1][-1] == pytest.approx(0.5)  # 10 steps already see every region of depth 1
    # Depth 2 folds the segment again: more regions, more folding; 10 steps miss some of them.
    assert results["regions"][2] > 5 and results["chi"][2] > results["chi"][1]
    assert results["running"][2][-1] <= results["chi"][2]
    assert "| 2 |" in (tmp_path / "cantornet.md").read_text()
    assert (tmp_path / "cantornet.png").stat().st_size > 10_000


def test_fgsm_and_pgd_increase_the_loss(adversarial: ModuleType) -> None:
    x_train, y_train, x_val, y_val = adversarial.load_split("digits")
    model = adversarial.train_mlp(x_train, y_train, depth=2, width=32, epochs=2, seed=0)
    inputs, labels = x_val[:100], y_val[:100]
    loss = lambda x: nn.functional.cross_entropy(model(x), labels).item()  # noqa: E731
    fgsm = adversarial.fgsm(model, inputs, labels, 0.05)
    pgd = adversarial.pgd(model, inputs, labels, 0.05, steps=5, step_size=0.025)
    for attacked in (fgsm, pgd):
        assert (attacked - inputs).abs().max() <= 0.05 + 1e-6
        assert attacked.min() >= 0 and attacked.max() <= 1
    assert loss(inputs) < loss(fgsm) <= loss(pgd)


def test_adversarial_interaction_quick(adversarial: ModuleType, tmp_path: Path) -> None:
    results = adversarial.main(["--quick", "--out", str(tmp_path)])
    rows = {row["paths"]: row for row in results["rows"]}
    assert 0.5 < results["accuracy"] <= 1.0
    clean, attacked = rows["clean -> clean"], rows["clean -> FGSM eps=0.1"]
    assert clean["count"] == attacked["count"] == 40
    assert 0.0 < attacked["attack_success"] <= 1.0
    for row in rows.values():
        assert 0.0 <= row["nonzero_points"] <= row["nonzero_paths"] <= 1.0
        assert 0.0 <= row["chi_mean"] < 1.0
        assert abs(row["nonzero_mean"]) <= row["nonzero_abs_mean"] < 1.0
    assert "| clean -> FGSM eps=0.1 |" in (tmp_path / "adversarial.md").read_text()


def test_adversarial_interaction_on_mnist1d_stays_in_the_data_range(adversarial: ModuleType, tmp_path: Path) -> None:
    results = adversarial.main(["--quick", "--dataset", "mnist1d", "--out", str(tmp_path)])
    rows = {row["paths"]: row for row in results["rows"]}
    assert rows["clean -> clean"]["count"] == rows["clean -> FGSM eps=0.1"]["count"] == 40
    assert 0.0 < rows["clean -> FGSM eps=0.1"]["attack_success"] <= 1.0
    header = (tmp_path / "adversarial.md").read_text().splitlines()[0]
    assert header.startswith("MNIST-1D, ReLU MLP 40-32x3-10") and "1 network seed(s)" in header
    assert len((tmp_path / "adversarial.csv").read_text().splitlines()) == 1 + len(rows)
    # Standardised MNIST-1D is not in [0, 1]: the attack's radius and clamp follow the training inputs' range.
    x_train, y_train, x_val, y_val = adversarial.load_split("mnist1d")
    model = adversarial.train_mlp(x_train, y_train, depth=1, width=16, epochs=1, seed=0)
    bounds = (x_train.min().item(), x_train.max().item())
    attacked = adversarial.pgd(model, x_val[:50], y_val[:50], 0.5, steps=3, step_size=0.2, bounds=bounds)
    assert (attacked - x_val[:50]).abs().max() <= 0.5 + 1e-5
    assert bounds[0] <= attacked.min() and attacked.max() <= bounds[1] and bounds[0] < -1 and bounds[1] > 1


def test_bounds_on_the_specification_example() -> None:
    bounds = load("bounds_and_metric").bounds
    # (0000, 1100, 0011): r1 = 2, L = 6, D = 2, chi = 2/3 = 1 - D/L (the upper bound); reversed, r1 = 4 and
    # chi_rev = 1/3, so abs(chi - chi_rev) = 1/3 = D/L: both bounds are reached.
    patterns = torch.tensor([[[0, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1]]], dtype=torch.bool)
    found = bounds(patterns)
    assert found["moving_paths"] == 1
    assert found["lower_bound_broken"] == found["upper_bound_broken"] == found["gap_bound_broken"] == 0
    assert found["upper_slack"] == pytest.approx(0.0, abs=1e-6)
    assert found["gap_mean"] == pytest.approx(1 / 3) and found["d_over_l_mean"] == pytest.approx(1 / 3)
    assert found["gap_over_bound"] == pytest.approx(1.0) and found["asymmetric_share"] == 1.0


def test_bounds_and_metric_quick(tmp_path: Path) -> None:
    networks = load("bounds_and_metric").main(["--quick", "--dataset", "mnist1d", "--out", str(tmp_path)])
    assert [network.width for network in networks] == [8, 32]
    for network in networks:
        assert network.lower_bound_broken == network.upper_bound_broken == network.gap_bound_broken == 0
        assert network.triples == 10 * 9 // 2 * 8
        assert 0 <= network.triangle_violations <= network.triples and network.gap_mean <= network.d_over_l_mean
    assert "| 3 x 32 |" in (tmp_path / "bounds.md").read_text()
    assert len((tmp_path / "bounds.csv").read_text().splitlines()) == 3


def test_symmetry_tasks_and_mirrors() -> None:
    symmetry = load("symmetry")
    for task, invariant in (("rings", ("x1 -> -x1", "x2 -> -x2")), ("off-centre rings", ("x2 -> -x2",))):
        points, labels, edges = symmetry.plane_task(task, 3000, seed=0)
        assert torch.bincount(labels).tolist() == [1000, 1000, 1000]
        for mirror, reflect in symmetry.MIRRORS.items():
            _, mirrored, _ = symmetry.plane_task(task, 3000, seed=0, edges=edges)
            distance = (reflect(points) - torch.tensor(symmetry.CENTRES[task])).norm(dim=1)
            same = torch.equal(torch.bucketize(distance, edges), mirrored)
            assert same == (mirror in invariant), (task, mirror)
    image = torch.arange(64.0).unsqueeze(0)
    flipped = symmetry.mirror_of("digits")(image)
    assert flipped[0, :8].tolist() == list(range(7, -1, -1)) and torch.equal(
        symmetry.mirror_of("digits")(flipped), image
    )
    assert symmetry.mirror_of("mnist1d")(torch.arange(40.0).unsqueeze(0))[0, 0] == 39


def test_symmetry_quick(tmp_path: Path) -> None:
    results = load("symmetry").main(["--quick", "--dataset", "mnist1d", "--out", str(tmp_path)])
    plane, mirrored = results["plane"], results["mnist1d"]
    assert {row.paths for row in plane} == {"across x1 -> -x1", "across x2 -> -x2", "random pairs"}
    for row in plane + mirrored:
        assert row.layer_chi[0] == 0.0  # along a segment every first-layer unit switches at most once
        assert 0.0 <= row.chi_mean < 1.0 and len(row.layer_chi) == 3
    assert {row.task for row in mirrored} == {"mirror images, same label", "plain data (control)"}
    assert (tmp_path / "plane.png").stat().st_size > 10_000
    assert "| rings |" in (tmp_path / "plane.md").read_text()
    assert "| plain data (control) |" in (tmp_path / "mnist1d.md").read_text()


def test_mirror_images_flip_each_image_left_to_right() -> None:
    symmetry = load("symmetry")
    for dataset, side in (("digits", 8), ("mnist", 28)):
        image = torch.zeros(1, side * side)
        image[0, 2 * side + 1] = 1.0  # row 2, column 1
        mirrored = symmetry.mirror_of(dataset)(image)
        assert mirrored[0].nonzero().flatten().tolist() == [2 * side + side - 2], dataset  # row 2, column side - 2
    assert symmetry.mirror_of("mnist1d")(torch.arange(4.0)[None]).tolist() == [[3.0, 2.0, 1.0, 0.0]]
