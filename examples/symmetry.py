"""Symmetry made visible: a network trained on data whose label is invariant under a reflection folds the paths that
cross the mirror; the same network trained on data without that symmetry does not (specification, section 4).

The plane (always run): points uniform in [-1, 1]^2 in three balanced classes (boundaries at the 1/3 and 2/3
quantiles of a distance).

- ``rings``: the distance to the origin, so the label is invariant under both mirrors, ``x1 -> -x1`` and
  ``x2 -> -x2``;
- ``off-centre rings`` (the control): the distance to (1, 0), invariant under ``x2 -> -x2`` only.

The same ReLU MLP (three hidden layers of 16 units) learns each task with several seeds. Paths from a validation
point to its mirror image under each reflection cross that mirror; their exact folding (whole network and per
layer) is compared with random validation pairs. ``plane.png`` draws, for seed 0 of each task, the input plane
coloured by activation pattern (all layers, then the last hidden layer alone, where mirror images that share a
pattern share a colour, drawn by ``lightning_spacefold.plots.regions``), the class boundaries, and a few mirror paths
with their exact chi on the layers of the panel.

With ``--dataset digits|mnist1d|mnist``: the examples' MLP (three hidden layers of 32 units) trained on the dataset with
the mirror image of every training input added under the same label (digits: flipped left to right; MNIST-1D: the
sequence reversed), against the same MLP trained on the plain data for twice the epochs (the same number of steps).
Paths from each validation input to its mirror image, and random validation pairs, measured exactly per layer.

Writes ``plane.md``, ``plane.csv`` and ``plane.png``, and ``<dataset>.md`` and ``<dataset>.csv``, into ``--out``
(default ``docs/symmetry``); ± is the std over seeds.

Run: python examples/symmetry.py [--dataset digits|mnist1d|mnist] [--seeds 5] [--quick]
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).parent))
from digits import (
    DATASET_NAMES,
    add_dataset_argument,
    grouped,
    load_split,
    plus_minus,
    spread_of,
    table_start,
    train_mlp,
    write_results,
)

from lightning_spacefold import find_layers, path_folding, plots
from lightning_spacefold.sampling import random_pairs

CENTRES = {"rings": (0.0, 0.0), "off-centre rings": (1.0, 0.0)}
MIRRORS: dict[str, Callable[[Tensor], Tensor]] = {
    "x1 -> -x1": lambda points: points * torch.tensor([-1.0, 1.0]),
    "x2 -> -x2": lambda points: points * torch.tensor([1.0, -1.0]),
}
# Paths drawn in the figure: from (x1, x2) to its image under x1 -> -x1, and one under x2 -> -x2.
DRAWN = ((-0.9, 0.15), (-0.7, -0.55), (-0.35, 0.8), (0.5, -0.85))


@dataclass(frozen=True)
class Row:
    """Folding of one kind of path through one trained network."""

    task: str
    seed: int
    accuracy: float
    mirrored_accuracy: float
    paths: str
    count: int
    chi_mean: float
    folded_share: float
    layer_chi: tuple[float, ...]


def plane_task(task: str, count: int, seed: int, edges: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``count`` uniform points, their labels and the two class edges (quantiles of the training distances)."""
    points = torch.rand(count, 2, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    distance = (points - torch.tensor(CENTRES[task])).norm(dim=1)
    edges = torch.quantile(distance, torch.tensor([1 / 3, 2 / 3])) if edges is None else edges
    return points, torch.bucketize(distance, edges), edges


def measure(network: tuple[str, int, float, float], name: str, model: nn.Module, starts: Tensor, ends: Tensor) -> Row:
    """Exact folding of the paths; ``network`` is the task, seed, accuracy and accuracy on mirror images."""
    result = path_folding(model, starts, ends, exact=True)
    return Row(
        *network,
        paths=name,
        count=len(starts),
        chi_mean=result.chi.mean().item(),
        folded_share=result.chi.gt(0).float().mean().item(),
        layer_chi=tuple(round(value, 6) for value in result.layer_chi.mean(0).tolist()),
    )


def accuracy_of(model: nn.Module, inputs: Tensor, labels: Tensor) -> float:
    with torch.no_grad():
        return (model(inputs).argmax(-1) == labels).float().mean().item()


def plane(seeds: int, epochs: int, count: int) -> tuple[list[Row], dict[str, nn.Module]]:
    """Train each plane task per seed; fold mirror paths and random pairs. Also returns the seed-0 networks."""
    rows, drawn = [], {}
    for task in CENTRES:
        for seed in range(seeds):
            x_train, y_train, edges = plane_task(task, count, seed=1000 + seed)
            x_val, y_val, _ = plane_task(task, count // 2, seed=2000 + seed, edges=edges)
            model = train_mlp(x_train, y_train, depth=3, width=16, epochs=epochs, seed=seed, num_classes=3)
            network = (task, seed, accuracy_of(model, x_val, y_val), float("nan"))
            for mirror, reflect in MIRRORS.items():
                rows.append(measure(network, f"across {mirror}", model, x_val, reflect(x_val)))
            pairs = random_pairs(x_val, len(x_val), generator=seed)
            rows.append(measure(network, "random pairs", model, pairs.starts, pairs.ends))
            drawn.setdefault(task, model)
    return rows, drawn


def mirror_of(dataset: str) -> Callable[[Tensor], Tensor]:
    """The dataset's reflection: images flipped left to right (digits 8x8, MNIST 28x28), MNIST-1D sequences reversed."""
    sides = {"digits": 8, "mnist": 28}
    if dataset in sides:
        side = sides[dataset]
        return lambda inputs: inputs.unflatten(1, (side, side)).flip(-1).flatten(1)
    return lambda inputs: inputs.flip(-1)


def mirrored_dataset(dataset: str, seeds: int, epochs: int, quick: bool) -> list[Row]:
    """The dataset with mirror images under the same label, against the plain dataset (as many steps)."""
    x_train, y_train, x_val, y_val = load_split(dataset)
    if quick:
        x_train, y_train, x_val, y_val = x_train[:300], y_train[:300], x_val[:60], y_val[:60]
    reflect = mirror_of(dataset)
    tasks = {
        "mirror images, same label": (torch.cat([x_train, reflect(x_train)]), torch.cat([y_train, y_train]), epochs),
        "plain data (control)": (x_train, y_train, 2 * epochs),
    }
    rows = []
    for task, (inputs, labels, task_epochs) in tasks.items():
        for seed in range(seeds):
            model = train_mlp(inputs, labels, depth=3, width=32, epochs=task_epochs, seed=seed)
            network = (task, seed, accuracy_of(model, x_val, y_val), accuracy_of(model, reflect(x_val), y_val))
            rows.append(measure(network, "input -> its mirror image", model, x_val, reflect(x_val)))
            pairs = random_pairs(x_val, len(x_val), generator=seed)
            rows.append(measure(network, "random pairs", model, pairs.starts, pairs.ends))
    return rows


def markdown(rows: list[Row], header: str) -> str:
    layers = max(len(row.layer_chi) for row in rows)
    columns = ["task", "val. accuracy", "on mirrored val. inputs", "paths", "mean chi", "folded paths"]
    lines = table_start(header, columns + [f"chi of layer {index + 1}" for index in range(layers)])
    for (task, paths), group in grouped(rows, lambda row: (row.task, row.paths)).items():
        mirrored = "" if math.isnan(group[0].mirrored_accuracy) else spread_of(group, "mirrored_accuracy", 3)
        per_layer = [plus_minus([row.layer_chi[index] for row in group]) for index in range(layers)]
        lines.append(
            f"| {task} | {spread_of(group, 'accuracy', 3)} | {mirrored} | {paths} | {spread_of(group, 'chi_mean')} "
            f"| {spread_of(group, 'folded_share', 3)} | " + " | ".join(per_layer) + " |"
        )
    return "\n".join(lines) + "\n"


def figure(models: dict[str, nn.Module], resolution: int) -> Figure:
    """Per task: regions of all layers and of the last hidden layer, class boundaries, mirror paths and their chi."""
    fig = Figure(figsize=(10, 10), layout="constrained")
    grid = torch.stack(
        torch.meshgrid(torch.linspace(1, -1, resolution), torch.linspace(-1, 1, resolution), indexing="ij")[::-1], -1
    )
    starts = torch.tensor(DRAWN)
    ends = torch.cat([MIRRORS["x1 -> -x1"](starts[:-1]), MIRRORS["x2 -> -x2"](starts[-1:])])
    plane = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # x0, x1, x2: plane coordinates = input coordinates
    drawing = {"resolution": resolution, "span": (-1, 1), "paths": (starts, ends)}
    for row, (task, model) in enumerate(models.items()):
        with torch.no_grad():
            classes = model(grid.reshape(-1, 2)).argmax(-1).view(resolution, resolution)
        last = [find_layers(model, starts[:1])[-1].name]
        for column, (layers, title) in enumerate([(None, "all layers"), (last, "last hidden layer")]):
            axes = fig.add_subplot(2, 2, 2 * row + column + 1)
            heading = f"{task}: {{patterns}} patterns of {title}"
            plots.regions(model, *plane, layers=layers, title=heading, axes=axes, **drawing)
            axes.contour(
                grid[..., 0].numpy(), grid[..., 1].numpy(), classes.numpy(), levels=[0.5, 1.5], colors="black",
                linewidths=1.2,
            )  # fmt: skip
            axes.axvline(0, color="white", linestyle=":", linewidth=1)
    fig.suptitle(
        "Activation regions (colours), class boundaries (black) and mirror paths with their exact chi on those layers"
    )
    return fig


def main(argv: list[str] | None = None) -> dict[str, list[Row]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_argument(parser)
    parser.add_argument("--seeds", type=int, default=5, help="networks per task")
    parser.add_argument("--epochs", type=int, default=100, help="epochs on the plane")
    parser.add_argument("--dataset-epochs", type=int, default=30, help="epochs on the dataset with mirror images")
    parser.add_argument("--points", type=int, default=2000, help="training points on the plane")
    parser.add_argument("--resolution", type=int, default=300, help="grid points per side of the figure")
    parser.add_argument("--no-plane", action="store_true", help="only the dataset part")
    parser.add_argument("--out", type=Path, default=Path("docs/symmetry"))
    parser.add_argument("--quick", action="store_true", help="1 seed, few epochs and points, a coarse figure")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.dataset_epochs, args.points, args.resolution = 1, 5, 1, 300, 40
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    if not args.no_plane:
        rows, models = plane(args.seeds, args.epochs, args.points)
        header = (
            f"The plane: {args.points} training and {args.points // 2} validation points uniform in [-1, 1]^2, three "
            f"balanced classes by the distance to (0, 0) (rings) or to (1, 0) (off-centre rings); ReLU MLP 2-16x3-3, "
            f"{args.epochs} epochs, {args.seeds} seed(s). Exact folding of the paths from every validation point to "
            "its mirror image, and of as many random validation pairs (± = std over seeds)."
        )
        write_results(args.out, "plane", markdown(rows, header), rows)
        figure(models, args.resolution).savefig(args.out / "plane.png", dpi=100)
        results["plane"] = rows
    rows = mirrored_dataset(args.dataset, args.seeds, args.dataset_epochs, args.quick)
    header = (
        f"{DATASET_NAMES[args.dataset]}: ReLU MLP with 3 hidden layers of 32 units, trained on the data with every "
        f"mirror image added under the same label ({args.dataset_epochs} epochs) or on the plain data "
        f"({2 * args.dataset_epochs} epochs, as many steps); {args.seeds} seed(s). Exact folding of the paths from "
        "every validation input to its mirror image, and of as many random validation pairs (± = std over seeds)."
    )
    write_results(args.out, args.dataset, markdown(rows, header), rows)
    results[args.dataset] = rows
    return results


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
