"""Train a small MLP on scikit-learn's digits, MNIST-1D or MNIST (no download) and measure how it folds test segments.

Run: python examples/measure_trained_mlp.py [--dataset digits|mnist1d|mnist] [--epochs 30] [--pairs 256] [--steps 64]
[--figure docs/example_paths.png]

With ``--figure`` it also draws the Hamming distance from the start along the four most folded paths.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from digits import add_dataset_argument, load_split, train_mlp

from lightning_spacefold import fold_measure, path_folding, path_patterns
from lightning_spacefold.figures import distance_figure
from lightning_spacefold.measure import step_distances


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_argument(parser)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--figure", type=Path, help="save the walks of the four most folded paths to this PNG")
    args = parser.parse_args(argv)

    x_train, y_train, x_test, y_test = load_split(args.dataset, args.seed)
    model = train_mlp(x_train, y_train, depth=2, width=32, epochs=args.epochs, seed=args.seed)
    with torch.no_grad():
        accuracy = (model(x_test).argmax(-1) == y_test).float().mean().item()

    generator = torch.Generator().manual_seed(args.seed)
    starts, ends = x_test[torch.randint(len(x_test), (2, args.pairs), generator=generator)]
    begin = time.perf_counter()
    result = path_folding(model, starts, ends, steps=args.steps)
    seconds = time.perf_counter() - begin

    print(f"test accuracy {accuracy:.3f}; {args.pairs} random test pairs, {args.steps} steps, {seconds:.2f} s")
    print("| layer | mean chi | folded paths |")
    print("|---|---|---|")
    rows = [("whole network", result.chi), *zip(result.layer_names, result.layer_chi.T, strict=True)]
    for name, chi in rows:
        print(f"| {name} | {chi.mean().item():.4f} | {chi.gt(0).float().mean().item():.0%} |")
    if args.figure is not None:
        most = result.chi.argsort(descending=True)[:4]
        patterns = path_patterns(model, starts[most], ends[most], steps=args.steps)
        from_start, from_previous = step_distances(patterns, patterns[:, 0])
        args.figure.parent.mkdir(parents=True, exist_ok=True)
        figure = distance_figure(from_start, from_previous.cumsum(-1), fold_measure(patterns))
        figure.savefig(args.figure, dpi=110)
    return {"accuracy": accuracy, "folding": result.chi.mean().item()}


if __name__ == "__main__":
    main()
