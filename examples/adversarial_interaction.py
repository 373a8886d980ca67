"""Interaction along clean -> adversarial segments against clean -> clean segments, on digits, MNIST-1D or MNIST MLPs.

Trains the examples' ReLU MLP with three hidden layers of 32 units on scikit-learn's digits, MNIST-1D or MNIST, attacks
every correctly classified validation input with FGSM and with PGD (L-infinity ball of radius epsilon times the
range of the training inputs, inputs clamped to that range: [0, 1] for digits), and samples the patterns at
``--steps`` steps along each segment from a clean input to its adversarial version, and along as many segments
between random pairs of validation inputs. The interaction ``I(k) = chi(whole) - chi(pi_0..pi_k) -
chi(pi_k..pi_last)`` (specification, section 2) is computed at every interior point; the table reports, per path
kind, the mean non-zero ``I`` and ``|I|`` (``I`` takes both signs), the share of points and of paths with
``I != 0``, and the mean chi, each as mean ± std over ``--seeds`` networks. Writes ``adversarial.md`` and
``adversarial.csv`` (one row per network and path kind) into ``--out`` (default ``docs/adversarial/<dataset>``).

Run: python examples/adversarial_interaction.py [--dataset digits|mnist1d|mnist] [--seeds 5] [--epsilons 0.1 0.2]
[--attacks fgsm pgd] [--steps 64]
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
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

from lightning_spacefold import fold_measure, interaction_profile, path_patterns
from lightning_spacefold.sampling import random_pairs

# I is a difference of float32 ratios: a mathematically zero interaction comes out within rounding of 0.
ZERO = 1e-5


def fgsm(
    model: nn.Module, inputs: Tensor, labels: Tensor, epsilon: float, bounds: tuple[float, float] = (0.0, 1.0)
) -> Tensor:
    """One signed-gradient step of size ``epsilon`` up the cross-entropy, clamped to the valid range ``bounds``."""
    return pgd(model, inputs, labels, epsilon, steps=1, step_size=epsilon, bounds=bounds)


def pgd(
    model: nn.Module,
    inputs: Tensor,
    labels: Tensor,
    epsilon: float,
    steps: int,
    step_size: float,
    bounds: tuple[float, float] = (0.0, 1.0),
) -> Tensor:
    """Projected gradient ascent on the cross-entropy in the L-infinity ball of radius ``epsilon``, within bounds."""
    adversarial = inputs.clone()
    for _ in range(steps):
        adversarial.requires_grad_(True)
        loss = nn.functional.cross_entropy(model(adversarial), labels, reduction="sum")
        (gradient,) = torch.autograd.grad(loss, adversarial)
        with torch.no_grad():
            adversarial = adversarial + step_size * gradient.sign()
            adversarial = torch.minimum(torch.maximum(adversarial, inputs - epsilon), inputs + epsilon)
            adversarial = adversarial.clamp(*bounds)
    return adversarial.detach()


@dataclass(frozen=True)
class Row:
    """Interaction statistics of one kind of path, through one network."""

    seed: int
    accuracy: float
    paths: str
    count: int
    attack_success: float
    chi_mean: float
    nonzero_points: float
    nonzero_paths: float
    nonzero_mean: float
    nonzero_abs_mean: float


def interaction_row(
    network: tuple[int, float], name: str, model: nn.Module, starts: Tensor, ends: Tensor, steps: int, success: float
) -> Row:
    """The row of one path kind; ``network`` is the seed and validation accuracy of ``model``."""
    patterns = path_patterns(model, starts, ends, steps=steps)
    interior = interaction_profile(patterns)[:, 1:-1]  # zero at both ends by construction
    nonzero = interior.abs() > ZERO
    values = interior[nonzero] if bool(nonzero.any()) else interior.new_zeros(1)
    return Row(
        *network,
        paths=name,
        count=len(starts),
        attack_success=success,
        chi_mean=fold_measure(patterns).mean().item(),
        nonzero_points=nonzero.float().mean().item(),
        nonzero_paths=nonzero.any(-1).float().mean().item(),
        nonzero_mean=values.mean().item(),
        nonzero_abs_mean=values.abs().mean().item(),
    )


def attack_one(args: argparse.Namespace, seed: int, data: tuple[Tensor, Tensor, Tensor, Tensor]) -> list[Row]:
    """Train the network of ``seed``, attack its correctly classified validation inputs, one row per path kind."""
    x_train, y_train, x_val, y_val = data
    bounds = (x_train.min().item(), x_train.max().item())
    scale = bounds[1] - bounds[0]
    model = train_mlp(x_train, y_train, depth=3, width=32, epochs=args.epochs, seed=seed)
    with torch.no_grad():
        correct = model(x_val).argmax(-1) == y_val
    network = (seed, correct.float().mean().item())
    # Attack only inputs the model gets right, so that success means the attack changed the decision.
    inputs, labels = x_val[correct], y_val[correct]
    if args.quick:
        inputs, labels = inputs[:40], labels[:40]

    clean = random_pairs(inputs, len(inputs), generator=seed)
    rows = [interaction_row(network, "clean -> clean", model, clean.starts, clean.ends, args.steps, float("nan"))]
    for attack in args.attacks:
        for epsilon in args.epsilons:
            radius = epsilon * scale
            if attack == "fgsm":
                adversarial = fgsm(model, inputs, labels, radius, bounds)
            else:
                adversarial = pgd(model, inputs, labels, radius, args.pgd_steps, 2.5 * radius / args.pgd_steps, bounds)
            with torch.no_grad():
                fooled = model(adversarial).argmax(-1) != labels
            success = fooled.float().mean().item()
            name = f"clean -> {attack.upper()} eps={epsilon:g}"
            rows.append(interaction_row(network, name, model, inputs, adversarial, args.steps, success))
            if bool(fooled.any()):
                rows.append(
                    interaction_row(
                        network, f"{name}, fooled only", model, inputs[fooled], adversarial[fooled], args.steps, 1.0
                    )
                )
    return rows


def markdown(rows: list[Row], header: str) -> str:
    """One line per path kind: mean ± std over the networks that have it."""
    columns = ["paths", "count", "attack success", "mean chi", "points with I != 0", "paths with I != 0"]
    lines = table_start(header, [*columns, "mean non-zero I", "mean non-zero abs(I)"])
    for name, group in grouped(rows, lambda row: row.paths).items():
        cell = functools.partial(spread_of, group)
        success = "" if math.isnan(group[0].attack_success) else cell("attack_success", 3)
        lines.append(
            f"| {name} | {cell('count', 0)} | {success} | {cell('chi_mean')} | {cell('nonzero_points', 3)} "
            f"| {cell('nonzero_paths', 3)} | {cell('nonzero_mean')} | {cell('nonzero_abs_mean')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_argument(parser)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[0.1, 0.2], help="radii, times the input range")
    parser.add_argument("--attacks", choices=["fgsm", "pgd"], nargs="+", default=["fgsm", "pgd"])
    parser.add_argument("--pgd-steps", type=int, default=10, help="PGD iterations, step size 2.5 epsilon / steps")
    parser.add_argument("--steps", type=int, default=64, help="steps along each segment")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=5, help="networks (seeds 0, 1, ...)")
    parser.add_argument("--out", type=Path, help="output folder (default: docs/adversarial/<dataset>)")
    parser.add_argument(
        "--quick", action="store_true", help="1 network, FGSM at one epsilon, 3 epochs, 40 inputs, 16 steps"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.attacks, args.epsilons, args.epochs, args.steps, args.seeds = ["fgsm"], args.epsilons[:1], 3, 16, 1
    out = args.out or Path("docs/adversarial") / args.dataset

    data = load_split(args.dataset)
    rows = [row for seed in range(args.seeds) for row in attack_one(args, seed, data)]
    accuracy = [row.accuracy for row in rows if row.paths == "clean -> clean"]
    header = (
        f"{DATASET_NAMES[args.dataset]}, ReLU MLP {data[0][0].numel()}-32x3-10 ({args.epochs} epochs, validation "
        f"accuracy {plus_minus(accuracy, 3)}), {args.seeds} network seed(s); all correctly classified validation "
        f"inputs, epsilon times the input range {data[0].max() - data[0].min():.2f}, {args.steps} steps per segment; "
        "I over interior points; ± = std over networks."
    )
    write_results(out, "adversarial", markdown(rows, header), rows)
    return {"accuracy": accuracy[0], "rows": [asdict(row) for row in rows]}


if __name__ == "__main__":
    # The models are tiny: one thread is as fast, and spares the 100x slowdown of OpenMP threads spinning against
    # other processes on a busy machine.
    torch.set_num_threads(1)
    main()
