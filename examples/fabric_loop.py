"""Measure folding inside your own training loop with Lightning Fabric, on scikit-learn's digits (no download).

Run: python examples/fabric_loop.py [--devices 2] [--epochs 20] [--every 25] [--pairs 256] [--steps 64]
[--out runs/fabric]; then ``tensorboard --logdir runs/fabric``.

An MLP trains in a plain Fabric loop. At the start, every ``--every`` optimizer steps and at the last step, each
process measures its share of the same validation pairs with the ``SpaceFolding`` metric, whose ``compute`` gathers
the paths of all processes, and the values go to TensorBoard through Fabric's logger (``spacefold/...``, at the
optimizer step). At the end the model is saved (``final.ckpt``) and process 0 measures all the pairs with
``path_folding`` and logs the per-layer figure (``spacefold/layers``, also saved as ``layers.png``). With
``--devices 2`` Fabric starts the second process by running the same command again.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from lightning.fabric import Fabric
from lightning.fabric.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))
from digits import load_split

from lightning_spacefold import SpaceFolding, path_folding, plots

NUM_CLASSES = 10


def make_model(width: int = 64, depth: int = 3) -> nn.Sequential:
    """A ReLU MLP for the 64 pixels of a digit: ``depth`` hidden layers of ``width`` units."""
    layers: list[nn.Module] = []
    for features in [64] + [width] * (depth - 1):
        layers += [nn.Linear(features, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, NUM_CLASSES))


def measurement_pairs(inputs: Tensor, labels: Tensor, count: int, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``count`` random pairs of the inputs: starts, ends and their labels, the same on every process.

    Args:
        inputs: ``[N, 64]`` validation inputs.
        labels: ``[N]`` their classes.
        count: Number of pairs.
        seed: Seed of a generator of their own (the training run's random state is not touched).
    """
    index = torch.randint(len(inputs), (2, count), generator=torch.Generator().manual_seed(seed))
    return inputs[index[0]], inputs[index[1]], labels[index[0]], labels[index[1]]


def measure(
    fabric: Fabric, model: nn.Module, metric: SpaceFolding, pairs: tuple[Tensor, Tensor, Tensor, Tensor]
) -> dict[str, Tensor]:
    """The folding of all pairs, each process measuring every ``world_size``-th pair; call it on every process.

    Args:
        fabric: The Fabric of the run.
        model: The network itself (not Fabric's wrapper): its forward passes then run no collective, so the
            processes may run different numbers of them (a sharded model would need the wrapper and equal shares).
        metric: The metric, on ``fabric.device``; reset after the values are computed.
        pairs: Starts, ends, start labels and end labels of all pairs.
    """
    share = slice(fabric.global_rank, None, fabric.world_size)
    starts, ends, start_labels, end_labels = (tensor[share].to(fabric.device) for tensor in pairs)
    if len(starts):  # a process without pairs still joins the synchronisation in compute
        # path_folding runs the model in eval mode without gradients and restores its training flags.
        metric.update(model, starts, ends, start_labels, end_labels)
    values = metric.compute()  # a collective: every process must call it
    metric.reset()
    return values


def scalars(values: dict[str, Tensor]) -> dict[str, float]:
    """The metric's scalar values under ``spacefold/`` (the class-pair matrices are left out)."""
    return {f"spacefold/{name}": value.item() for name, value in values.items() if value.ndim == 0}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=1, help="CPU processes")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--every", type=int, default=25, help="measure every this many optimizer steps")
    parser.add_argument("--pairs", type=int, default=256, help="validation pairs per measurement")
    parser.add_argument("--steps", type=int, default=64, help="segments per path")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/fabric"))
    args = parser.parse_args(argv)
    for name in ("devices", "epochs", "every", "pairs", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")

    logger = TensorBoardLogger(args.out, name="digits")
    fabric = Fabric(
        accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto", loggers=logger
    )
    fabric.launch()
    fabric.seed_everything(args.seed)

    x_train, y_train, x_val, y_val = load_split("digits", args.seed)
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model, optimizer = fabric.setup(model, optimizer)
    loader = fabric.setup_dataloaders(DataLoader(TensorDataset(x_train, y_train), batch_size=64, shuffle=True))
    pairs = measurement_pairs(x_val, y_val, args.pairs, args.seed)
    # On the process's device: torchmetrics gathers the states there, through the strategy's process group.
    metric = SpaceFolding(steps=args.steps, num_classes=NUM_CLASSES).to(fabric.device)

    last = args.epochs * len(loader)
    values = scalars(measure(fabric, model.module, metric, pairs))
    fabric.log_dict(values, step=0)  # every process may call it; Fabric's loggers write on process 0 only
    step = 0
    for _epoch in range(args.epochs):
        for inputs, labels in loader:
            loss = nn.functional.cross_entropy(model(inputs), labels)
            optimizer.zero_grad()
            fabric.backward(loss)
            optimizer.step()
            step += 1
            fabric.log("train/loss", loss.item(), step=step)
            if step % args.every == 0 or step == last:
                values = scalars(measure(fabric, model.module, metric, pairs))
                fabric.log_dict(values, step=step)

    fabric.save(args.out / "final.ckpt", {"model": model})
    if fabric.is_global_zero:
        # Process 0 alone, on the network itself: every pair, every layer.
        result = path_folding(model.module, pairs[0], pairs[1], steps=args.steps)
        figure = plots.layers(result)
        figure.savefig(Path(logger.log_dir) / "layers.png", dpi=100)
        logger.experiment.add_figure("spacefold/layers", figure, global_step=step)
        print(f"step {step}: " + ", ".join(f"{name} {value:.4f}" for name, value in values.items()))
        print(f"tensorboard --logdir {args.out}")
    logger.finalize("success")
    return values


if __name__ == "__main__":
    main()
