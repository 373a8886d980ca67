"""The figures of results: what they show, read back from the drawn artists."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from torch import nn

from lightning_spacefold import FoldingResult, path_folding, plots


def folding_net() -> nn.Module:
    """``a = relu(x)``, ``b = relu(x - 1)``, then ``c = relu(a - 2 b - 0.5)``: on when ``0.5 < x < 1.5``."""
    model = nn.Sequential(nn.Linear(1, 2), nn.ReLU(), nn.Linear(2, 1), nn.ReLU())
    nn.utils.vector_to_parameters(torch.tensor([1.0, 1.0, 0.0, -1.0, 1.0, -2.0, -0.5]), model.parameters())
    return model


def measured() -> FoldingResult:
    # Path 0, x = 0.25 .. 1.75: patterns (a, b, c) 100, 101, 111, 110. Path 1, x = 0.25 .. 0.75: 100, 100, 101, 101.
    starts, ends = torch.tensor([[0.25], [0.25]]), torch.tensor([[1.75], [0.75]])
    return path_folding(folding_net(), starts, ends, steps=3, return_distances=True)


def test_walks_draws_each_paths_distance_from_the_start_and_length_walked() -> None:
    figure = plots.walks(measured())
    assert isinstance(figure, Figure)
    lines = figure.axes[0].lines
    assert [line.get_ydata().tolist() for line in lines] == [[0, 1, 2, 1], [0, 1, 2, 3], [0, 0, 1, 1], [0, 0, 1, 1]]
    assert [line.get_linestyle() for line in lines] == ["-", "--", "-", "--"]
    np.testing.assert_allclose(lines[0].get_xdata(), [0, 1 / 3, 2 / 3, 1])  # t_i = i / steps
    assert [text.get_text() for text in figure.axes[0].get_legend().get_texts()] == [
        "path 0: chi = 0.333",
        "path 1: chi = 0.000",
    ]


def test_walks_draws_the_chosen_paths_under_their_own_numbers() -> None:
    figure = plots.walks(measured(), paths=[1])
    assert [line.get_ydata().tolist() for line in figure.axes[0].lines] == [[0, 0, 1, 1], [0, 0, 1, 1]]
    assert [text.get_text() for text in figure.axes[0].get_legend().get_texts()] == ["path 1: chi = 0.000"]


def test_walks_needs_the_distances_and_valid_paths() -> None:
    starts, ends = torch.tensor([[0.25]]), torch.tensor([[1.75]])
    for result in (
        path_folding(folding_net(), starts, ends, steps=3),
        path_folding(folding_net(), starts, ends, exact=True),
    ):
        with pytest.raises(ValueError, match=r"return_distances=True"):
            plots.walks(result)
    for paths in ([], [2], [-1], [0.5]):
        with pytest.raises(ValueError, match=r"in \[0, 2\)"):
            plots.walks(measured(), paths=paths)
    with pytest.raises(TypeError, match="FoldingResult"):
        plots.walks(torch.zeros(3))


def test_layers_draws_the_mean_chi_of_each_layer() -> None:
    # Layer '1' (a, b) never folds; layer '3' (c) folds on path 0 (on, then off: chi 1/2) and not on path 1.
    figure = plots.layers(measured())
    axes = figure.axes[0]
    assert [bar.get_height() for bar in axes.patches] == [0.0, 0.25]
    assert [label.get_text() for label in axes.get_xticklabels()] == ["1", "3"]


def class_pair_cells(figure: Figure) -> list[list[float]]:
    return np.ma.filled(figure.axes[0].images[0].get_array(), np.nan).tolist()


def test_class_pairs_draws_the_mean_chi_of_each_ordered_class_pair() -> None:
    chi = torch.tensor([0.25, 0.5, 0.125, 0.75, 1 / 3])
    labels_a, labels_b = torch.tensor([0, 0, 2, 1, 0]), torch.tensor([1, 1, 0, 1, 0])
    nan = float("nan")
    expected = [[1 / 3, 0.375, nan, nan], [nan, 0.75, nan, nan], [0.125, nan, nan, nan], [nan, nan, nan, nan]]
    np.testing.assert_allclose(class_pair_cells(plots.class_pairs(chi, labels_a, labels_b, num_classes=4)), expected)
    # By default as many classes as the largest label needs; a FoldingResult gives its chi.
    result = path_folding(folding_net(), torch.tensor([[0.25], [0.25]]), torch.tensor([[1.75], [0.75]]), steps=3)
    np.testing.assert_allclose(
        class_pair_cells(plots.class_pairs(result, torch.tensor([1, 1]), torch.tensor([0, 1]))),
        [[nan, nan], [1 / 3, 0.0]],
        rtol=1e-6,
    )


def test_class_pairs_rejects_bad_labels() -> None:
    chi = torch.tensor([0.1, 0.2])
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        plots.class_pairs(chi, torch.tensor([0, 2]), torch.tensor([1, 1]), num_classes=2)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        plots.class_pairs(chi, torch.tensor([0, -1]), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="one class per path"):
        plots.class_pairs(chi, torch.tensor([0]), torch.tensor([1, 1]))
    with pytest.raises(TypeError, match="integer tensor"):
        plots.class_pairs(chi, torch.tensor([0.0, 1.0]), torch.tensor([1, 1]))
    with pytest.raises(TypeError, match="floating-point"):
        plots.class_pairs(torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([1, 1]))


def three_lines() -> nn.Module:
    """Three ReLU units cutting the plane along ``x = 0.0537``, ``y = -0.0461``, ``x + y = 0.5123``: 7 regions.

    The odd offsets keep every grid point of the tests well off the lines.
    """
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    weights = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, -0.0537, 0.0461, -0.5123, 1.0, 1.0, 1.0, 0.0]
    nn.utils.vector_to_parameters(torch.tensor(weights), model.parameters())
    return model


def grid_inputs(x0: torch.Tensor, x1: torch.Tensor, x2: torch.Tensor, span: tuple[float, float], resolution: int):
    """The inputs at the pixels of the regions' image (first row at the top), in float64."""
    a = torch.linspace(*span, resolution, dtype=torch.float64)
    b = torch.linspace(span[1], span[0], resolution, dtype=torch.float64)
    x0, x1, x2 = x0.double(), x1.double(), x2.double()
    return x0 + a[None, :, None] * (x1 - x0) + b[:, None, None] * (x2 - x0)  # [rows, columns, 2]


def same_partition(ids: np.ndarray, expected: np.ndarray) -> bool:
    """Whether two labellings of the pixels split them into the same groups."""
    pairs = {
        (int(i), tuple(e)) for i, e in zip(ids.reshape(-1), expected.reshape(len(ids.reshape(-1)), -1), strict=True)
    }
    return len(pairs) == len(np.unique(ids)) == len({e for _, e in pairs})


def test_regions_colours_the_known_regions_of_a_skewed_plane() -> None:
    x0, x1, x2 = torch.tensor([-1.0, -1.0]), torch.tensor([1.0, -0.8]), torch.tensor([-0.7, 1.2])
    figure = plots.regions(three_lines(), x0, x1, x2, resolution=81, span=(0.0, 1.0))
    image = figure.axes[0].images[0]
    ids = np.asarray(image.get_array())
    assert ids.shape == (81, 81) and len(np.unique(ids)) == 7
    assert figure.axes[0].get_title() == "7 activation patterns"
    assert tuple(image.get_extent()) == (0.0, 1.0, 0.0, 1.0)
    points = grid_inputs(x0, x1, x2, (0.0, 1.0), 81)
    margins = torch.stack([points[..., 0] - 0.0537, points[..., 1] + 0.0461, points.sum(-1) - 0.5123], -1)
    assert margins.abs().min() > 1e-5  # no grid point on a line, where float32 and float64 could disagree
    assert same_partition(ids, (margins > 0).numpy())


def stripes(activation: type[nn.Module] = nn.ReLU) -> nn.Module:
    """The folding network along ``x`` of a plane: stripes at x = 0, 0.5, 1 and 1.5, five patterns."""
    model = nn.Sequential(nn.Linear(2, 2), activation(), nn.Linear(2, 1), activation())
    weights = [1.0, 0.0, 1.0, 0.0, 0.0, -1.0, 1.0, -2.0, -0.5]
    nn.utils.vector_to_parameters(torch.tensor(weights), model.parameters())
    return model


PLANE = torch.tensor([0.0, 0.0]), torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])


def test_regions_draws_each_path_with_its_exact_chi() -> None:
    starts, ends = torch.tensor([[0.25, 0.5], [0.25, -0.25]]), torch.tensor([[1.75, 0.5], [0.75, -0.25]])
    figure = plots.regions(stripes(), *PLANE, resolution=50, span=(-0.5, 2.0), paths=(starts, ends))
    axes = figure.axes[0]
    ids = np.asarray(axes.images[0].get_array())
    x = grid_inputs(*PLANE, (-0.5, 2.0), 50)[..., 0].numpy()
    assert same_partition(ids, np.stack([x > 0, x > 1, (x > 0.5) & (x < 1.5)], axis=-1))
    arrows = [text for text in axes.texts if text.get_text() == ""]
    np.testing.assert_allclose([(arrow.xyann, arrow.xy) for arrow in arrows], torch.stack([starts, ends], 1))
    assert [text.get_text() for text in axes.texts if text.get_text()] == ["chi=0.33", "chi=0.00"]
    # On the second layer alone (c: on, then off) the first path folds more, and the plane has two patterns.
    figure = plots.regions(stripes(), *PLANE, resolution=50, span=(-0.5, 2.0), paths=(starts, ends), layers=["3"])
    assert figure.axes[0].get_title() == "2 activation patterns"
    assert [text.get_text() for text in figure.axes[0].texts if text.get_text()] == ["chi=0.50", "chi=0.00"]


def test_regions_samples_the_chi_of_a_smooth_network() -> None:
    model = stripes(nn.Tanh)
    starts, ends = torch.tensor([[0.25, 0.5]]), torch.tensor([[1.75, 0.5]])
    figure = plots.regions(model, *PLANE, resolution=20, paths=(starts, ends), steps=64)
    sampled = path_folding(model, starts, ends, steps=64).chi.item()
    assert [text.get_text() for text in figure.axes[0].texts if text.get_text()] == [f"chi≈{sampled:.2f}"]


def test_regions_draws_into_given_axes() -> None:
    figure = Figure()
    axes = figure.add_subplot(1, 2, 2)
    assert plots.regions(stripes(), *PLANE, resolution=10, title="{patterns} here", axes=axes) is figure
    assert axes.get_title() == "4 here"  # the default span, -0.25 .. 1.25, ends before the stripe x > 1.5
    assert figure.axes == [axes] and len(axes.images) == 1


def test_regions_rejects_a_degenerate_plane_and_paths_off_it() -> None:
    x0, x1 = torch.tensor([0.0, 0.0]), torch.tensor([1.0, 1.0])
    with pytest.raises(ValueError, match="on one line"):
        plots.regions(stripes(), x0, x1, 2 * x1)
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU())
    plane = torch.tensor([0.0, 0.0, 0.0]), torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    paths = torch.tensor([[0.1, 0.2, 0.0]]), torch.tensor([[0.5, 0.5, 0.3]])
    with pytest.raises(ValueError, match="Path 0's end lies off the plane"):
        plots.regions(model, *plane, resolution=4, paths=paths)
    with pytest.raises(ValueError, match="resolution"):
        plots.regions(model, *plane, resolution=1)
    with pytest.raises(TypeError, match="floating-point"):
        plots.regions(model, torch.tensor([0, 0, 0]), *plane[1:])
