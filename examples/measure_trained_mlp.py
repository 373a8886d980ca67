"""Train a small MLP on scikit-learn's digits (no download) and measure how it folds the segments between test digits.

Run: python examples/measure_trained_mlp.py [--epochs 30] [--pairs 256] [--steps 64]
"""

from __future__ import annotations

import argparse
import time

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from lightning_spacefold import path_folding


def digits(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits scaled to [0, 1]: train and test inputs ``[N, 64]`` and labels."""
    inputs, labels = load_digits(return_X_y=True)
    split = train_test_split(inputs / 16.0, labels, test_size=0.25, random_state=seed, stratify=labels)
    x_train, x_test, y_train, y_test = (torch.as_tensor(part) for part in split)
    return x_train.float(), y_train.long(), x_test.float(), y_test.long()


def train(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, epochs: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(epochs):
        for batch in torch.randperm(len(inputs), generator=generator).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(inputs[batch]), labels[batch]).backward()
            optimizer.step()


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    x_train, y_train, x_test, y_test = digits(args.seed)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
    train(model, x_train, y_train, args.epochs, args.seed)
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
    return {"accuracy": accuracy, "folding": result.chi.mean().item()}


if __name__ == "__main__":
    main()
