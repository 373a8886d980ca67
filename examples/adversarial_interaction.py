"""Interaction along clean -> adversarial segments against clean -> clean segments, on a digits MLP.

Trains the examples' 64-32x3-10 ReLU MLP on scikit-learn's digits, attacks every correctly classified validation
digit with FGSM and with PGD (L-infinity ball of radius epsilon, inputs clamped to [0, 1]), and samples the
patterns at ``--steps`` steps along each segment from a clean digit to its adversarial version, and along as many
segments between random pairs of validation digits. The interaction ``I(k) = chi(whole) - chi(pi_0..pi_k) -
chi(pi_k..pi_last)`` (specification, section 2) is computed at every interior point; the table reports, per path
kind, the mean non-zero ``I`` and ``|I|`` (``I`` takes both signs), the share of points and of paths with
``I != 0``, and the mean chi. Writes ``adversarial.md`` into ``--out``.

Run: python examples/adversarial_interaction.py [--epsilons 0.1 0.2] [--attacks fgsm pgd] [--steps 64]
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).parent))
from digits import digits_split, train_mlp

from lightning_spacefold import fold_measure, interaction_profile, path_patterns
from lightning_spacefold.sampling import random_pairs

# I is a difference of float32 ratios: a mathematically zero interaction comes out within rounding of 0.
ZERO = 1e-5


def fgsm(model: nn.Module, inputs: Tensor, labels: Tensor, epsilon: float) -> Tensor:
    """One signed-gradient step of size ``epsilon`` up the cross-entropy, clamped to the valid range [0, 1]."""
    return pgd(model, inputs, labels, epsilon, steps=1, step_size=epsilon)


def pgd(model: nn.Module, inputs: Tensor, labels: Tensor, epsilon: float, steps: int, step_size: float) -> Tensor:
    """Projected gradient ascent on the cross-entropy in the L-infinity ball of radius ``epsilon``, within [0, 1]."""
    adversarial = inputs.clone()
    for _ in range(steps):
        adversarial.requires_grad_(True)
        loss = nn.functional.cross_entropy(model(adversarial), labels, reduction="sum")
        (gradient,) = torch.autograd.grad(loss, adversarial)
        with torch.no_grad():
            adversarial = adversarial + step_size * gradient.sign()
            adversarial = torch.minimum(torch.maximum(adversarial, inputs - epsilon), inputs + epsilon).clamp(0, 1)
    return adversarial.detach()


@dataclass(frozen=True)
class Row:
    """Interaction statistics of one kind of path."""

    paths: str
    count: int
    attack_success: float
    chi_mean: float
    nonzero_points: float
    nonzero_paths: float
    nonzero_mean: float
    nonzero_abs_mean: float


def interaction_row(name: str, model: nn.Module, starts: Tensor, ends: Tensor, steps: int, success: float) -> Row:
    patterns = path_patterns(model, starts, ends, steps=steps)
    interior = interaction_profile(patterns)[:, 1:-1]  # zero at both ends by construction
    nonzero = interior.abs() > ZERO
    values = interior[nonzero] if bool(nonzero.any()) else interior.new_zeros(1)
    return Row(
        paths=name,
        count=len(starts),
        attack_success=success,
        chi_mean=fold_measure(patterns).mean().item(),
        nonzero_points=nonzero.float().mean().item(),
        nonzero_paths=nonzero.any(-1).float().mean().item(),
        nonzero_mean=values.mean().item(),
        nonzero_abs_mean=values.abs().mean().item(),
    )


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[0.1, 0.2], help="L-infinity radii")
    parser.add_argument("--attacks", choices=["fgsm", "pgd"], nargs="+", default=["fgsm", "pgd"])
    parser.add_argument("--pgd-steps", type=int, default=10, help="PGD iterations, step size 2.5 epsilon / steps")
    parser.add_argument("--steps", type=int, default=64, help="steps along each segment")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("docs/adversarial"))
    parser.add_argument("--quick", action="store_true", help="FGSM at one epsilon, 3 epochs, 40 digits, 16 steps")
    args = parser.parse_args(argv)
    if args.quick:
        args.attacks, args.epsilons, args.epochs, args.steps = ["fgsm"], args.epsilons[:1], 3, 16

    x_train, y_train, x_val, y_val = digits_split()
    model = train_mlp(x_train, y_train, depth=3, width=32, epochs=args.epochs, seed=args.seed)
    with torch.no_grad():
        correct = model(x_val).argmax(-1) == y_val
    accuracy = correct.float().mean().item()
    # Attack only digits the model gets right, so that success means the attack changed the decision.
    inputs, labels = x_val[correct], y_val[correct]
    if args.quick:
        inputs, labels = inputs[:40], labels[:40]

    clean = random_pairs(inputs, len(inputs), generator=args.seed)
    rows = [interaction_row("clean -> clean", model, clean.starts, clean.ends, args.steps, float("nan"))]
    for attack in args.attacks:
        for epsilon in args.epsilons:
            if attack == "fgsm":
                adversarial = fgsm(model, inputs, labels, epsilon)
            else:
                adversarial = pgd(model, inputs, labels, epsilon, args.pgd_steps, 2.5 * epsilon / args.pgd_steps)
            with torch.no_grad():
                fooled = model(adversarial).argmax(-1) != labels
            success = fooled.float().mean().item()
            name = f"clean -> {attack.upper()} eps={epsilon:g}"
            rows.append(interaction_row(name, model, inputs, adversarial, args.steps, success))
            if bool(fooled.any()):
                rows.append(
                    interaction_row(f"{name}, fooled only", model, inputs[fooled], adversarial[fooled], args.steps, 1.0)
                )

    lines = [
        f"Digits, 64-32x3-10 ReLU MLP ({args.epochs} epochs, validation accuracy {accuracy:.3f}); "
        f"{len(inputs)} correctly classified validation digits, {args.steps} steps per segment; "
        "I over interior points.",
        "",
        "| paths | count | attack success | mean chi | points with I != 0 | paths with I != 0 | mean non-zero I "
        "| mean non-zero abs(I) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        success = "" if math.isnan(row.attack_success) else f"{row.attack_success:.1%}"
        lines.append(
            f"| {row.paths} | {row.count} | {success} | {row.chi_mean:.4f} | {row.nonzero_points:.2%} "
            f"| {row.nonzero_paths:.1%} | {row.nonzero_mean:.4f} | {row.nonzero_abs_mean:.4f} |"
        )
    table = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "adversarial.md").write_text(table)
    print(table)
    return {"accuracy": accuracy, "rows": [asdict(row) for row in rows]}


if __name__ == "__main__":
    # The models are tiny: one thread is as fast, and spares the 100x slowdown of OpenMP threads spinning against
    # other processes on a busy machine.
    torch.set_num_threads(1)
    main()
