"""How well the differentiable surrogate soft_folding ranks paths like the exact folding, and what it costs.

Trains a ReLU MLP (three hidden layers of 32 units) on scikit-learn's digits, MNIST-1D or MNIST, then compares, on
random pairs of test inputs, ``soft_folding`` (16 steps, several temperatures) with ``path_folding`` (256 steps):
Pearson and Spearman correlations over the pairs, the ROC AUC of the surrogate for telling the paths that fold (exact
chi > 0) from those that do not, and the time of one surrogate forward and backward pass against one exact
measurement. Most paths of the small digits network do not fold at all, so Spearman's correlation is dominated by
their ties; the AUC and Pearson's correlation say more. Prints a markdown table.

    python examples/soft_folding_quality.py            # 30 epochs, 200 pairs
    python examples/soft_folding_quality.py --dataset mnist1d
    python examples/soft_folding_quality.py --quick    # smoke run, a few seconds
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import roc_auc_score
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).parent))
from digits import DATASET_NAMES, add_dataset_argument, load_split

from lightning_spacefold import path_folding
from lightning_spacefold.regularization import soft_folding

TEMPERATURES = (0.03, 0.1, 0.3, 1.0)
SOFT_STEPS = 16
HARD_STEPS = 256


@dataclass(frozen=True)
class Row:
    temperature: float
    pearson: float
    spearman: float
    auc: float
    soft_mean: float
    soft_seconds: float


def mlp(input_dim: int) -> nn.Module:
    widths = (input_dim, 32, 32, 32)
    hidden = [layer for a, b in itertools.pairwise(widths) for layer in (nn.Linear(a, b), nn.ReLU())]
    return nn.Sequential(*hidden, nn.Linear(widths[-1], 10))


def train(model: nn.Module, x: Tensor, y: Tensor, epochs: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(x), generator=generator).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    model.eval()


def best_time(function: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        function()
        times.append(time.perf_counter() - begin)
    return min(times)


def main(argv: Sequence[str] | None = None) -> tuple[list[Row], float, float]:
    """Run the comparison; return the table rows, the mean exact chi and the exact measurement's time."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_argument(parser)
    parser.add_argument("--quick", action="store_true", help="3 epochs and 40 pairs: a smoke run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 gives stable timings)")
    args = parser.parse_args(argv)
    epochs, num_pairs, repeats = (3, 40, 1) if args.quick else (30, 200, 5)
    torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    x_train, y_train, x_test, y_test = load_split(args.dataset, args.seed)
    model = mlp(x_train.shape[1])
    train(model, x_train, y_train, epochs, args.seed)
    with torch.no_grad():
        accuracy = (model(x_test).argmax(-1) == y_test).float().mean().item()

    generator = torch.Generator().manual_seed(args.seed + 1)
    first = torch.randint(len(x_test), (num_pairs,), generator=generator)
    # A shift in 1 .. n-1 makes every pair two different images.
    second = (first + torch.randint(1, len(x_test), (num_pairs,), generator=generator)) % len(x_test)
    starts, ends = x_test[first], x_test[second]

    hard = path_folding(model, starts, ends, steps=HARD_STEPS).chi
    folds = hard > 0
    hard_seconds = best_time(lambda: path_folding(model, starts, ends, steps=HARD_STEPS), repeats)

    rows = []
    for temperature in TEMPERATURES:

        def forward_backward(temperature: float = temperature) -> Tensor:
            model.zero_grad()
            soft = soft_folding(model, starts, ends, steps=SOFT_STEPS, temperature=temperature)
            soft.mean().backward()
            return soft.detach()

        soft = forward_backward()
        rows.append(
            Row(
                temperature,
                float(pearsonr(soft, hard).statistic),
                float(spearmanr(soft, hard).statistic),
                float(roc_auc_score(folds, soft)) if 0 < folds.sum() < num_pairs else float("nan"),
                soft.mean().item(),
                best_time(forward_backward, repeats),
            )
        )

    print(
        f"MLP {x_train.shape[1]}-32-32-32-10 on {DATASET_NAMES[args.dataset]}, {epochs} epochs, test accuracy "
        f"{accuracy:.3f}; {num_pairs} random test pairs; "
        f"exact chi (path_folding, {HARD_STEPS} steps): mean {hard.mean():.3f}, "
        f"{folds.float().mean():.0%} of paths fold, {hard_seconds * 1e3:.0f} ms.\n"
    )
    print(
        f"| temperature | Pearson | Spearman | AUC (chi > 0) | mean soft chi | soft fwd+bwd ({SOFT_STEPS} steps) "
        "| soft / exact time |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row.temperature:g} | {row.pearson:.3f} | {row.spearman:.3f} | {row.auc:.3f} | {row.soft_mean:.3f} | "
            f"{row.soft_seconds * 1e3:.1f} ms | {row.soft_seconds / hard_seconds:.3f} |"
        )
    return rows, hard.mean().item(), hard_seconds


if __name__ == "__main__":
    main()
