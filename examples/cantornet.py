"""Folding of the hand-built CantorNet (representation A) along the segment (0, 3/4) -> (1, 3/4).

One recursion is two ReLU layers on the input (x, y):

- ``Linear(2, 3)`` with weights ``[[3, 0], [-3, 0], [0, 1]]`` and bias ``[-2, 1, 0]`` gives
  ``(relu(3x - 2), relu(1 - 3x), relu(y))``;
- ``Linear(3, 2)`` with weights ``[[1, 1, 0], [0, 0, 1]]`` and bias 0 adds the first two:
  ``x -> A(x) = relu(3x - 2) + relu(1 - 3x) = max(1 - 3x, 0, 3x - 2)`` on [0, 1] (the two ReLUs are never active
  together), and ``y -> y`` for ``y >= 0``.

``A`` is not the tent ``1 - |3x - 2|``: it is a V with a flat bottom that maps [0, 1/3] onto [1, 0] (reversed),
collapses the middle third [1/3, 2/3] to 0 and maps [2/3, 1] onto [0, 1], the Cantor construction's fold.
``k`` recursions compute ``A^k(x)``; the top unit ``relu(y - (1 + A^k(x)) / 2)`` (weights ``[-1/2, 1]``, bias
``-1/2``) is active iff ``A^k(x) < 2y - 1``, i.e. ``A^k(x) < 1/2`` on the segment ``y = 3/4``.

For depths 1 to 5 this script samples the segment at 10 steps (11 points, as in the papers' figures), plots the
running folding of the prefix ``pi_0 .. pi_i`` for ``i = 1 .. 10`` and compares it with the exact folding and region
count of the whole segment (``path_folding(..., exact=True)``). Writes ``cantornet.png`` and ``cantornet.md`` into
``--out``.

Run: python examples/cantornet.py [--depths 5] [--out docs/cantornet]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from lightning_spacefold import fold_measure, path_folding, path_patterns

SEGMENT = ((0.0, 0.75), (1.0, 0.75))
STEPS = 10


def cantornet(depth: int) -> nn.Sequential:
    """CantorNet, representation A, with ``depth`` recursions, in float64 (exact traversal then has no tolerance)."""

    def linear(weight: list[list[float]], bias: list[float]) -> nn.Linear:
        layer = nn.Linear(len(weight[0]), len(weight), dtype=torch.float64)
        with torch.no_grad():
            layer.weight.copy_(torch.tensor(weight))
            layer.bias.copy_(torch.tensor(bias))
        return layer

    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [
            linear([[3, 0], [-3, 0], [0, 1]], [-2, 1, 0]),
            nn.ReLU(),
            linear([[1, 1, 0], [0, 0, 1]], [0, 0]),
            nn.ReLU(),
        ]
    return nn.Sequential(*layers, linear([[-0.5, 1]], [-0.5]), nn.ReLU())


def running_folding(patterns: Tensor) -> Tensor:
    """chi of every prefix ``pi_0 .. pi_i``, ``i = 1 .. N - 1``, of paths ``[P, N, M]``: ``[P, N - 1]``.

    Each prefix is padded to N points by repeating its last pattern, which leaves chi unchanged, so all prefixes
    are one batched call.
    """
    n = patterns.shape[-2]
    prefix = torch.arange(n).clamp(max=torch.arange(1, n).unsqueeze(-1))  # [N - 1, N]
    return fold_measure(patterns[:, prefix])


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", type=int, default=5, help="recursion depths 1 .. this")
    parser.add_argument("--steps", type=int, default=None, help="sample this many steps instead of exact traversal")
    parser.add_argument("--out", type=Path, default=Path("docs/cantornet"))
    parser.add_argument("--quick", action="store_true", help="depths 1 and 2 only")
    args = parser.parse_args(argv)
    depths = range(1, (2 if args.quick else args.depths) + 1)

    start, end = (torch.tensor([point], dtype=torch.float64) for point in SEGMENT)
    sampling = {"exact": True} if args.steps is None else {"steps": args.steps}
    running, exact_chi, regions = {}, {}, {}
    for depth in depths:
        model = cantornet(depth)
        running[depth] = running_folding(path_patterns(model, start, end, steps=STEPS))[0].tolist()
        result = path_folding(model, start, end, **sampling)
        exact_chi[depth] = result.chi.item()
        regions[depth] = None if result.regions is None else int(result.regions.item())

    reference = "exact" if args.steps is None else f"{args.steps} steps"
    lines = [
        f"CantorNet (representation A), segment (0, 3/4) -> (1, 3/4); running chi of pi_0..pi_i at {STEPS} steps, "
        f"and the whole segment's chi and region count ({reference}).",
        "",
        "| depth | " + " | ".join(f"i={i}" for i in range(1, STEPS + 1)) + f" | chi ({reference}) | regions |",
        "|---|" + "---|" * (STEPS + 2),
    ]
    for depth in depths:
        values = " | ".join(f"{value:.3f}" for value in running[depth])
        count = "n/a" if regions[depth] is None else str(regions[depth])
        lines.append(f"| {depth} | {values} | {exact_chi[depth]:.4f} | {count} |")
    table = "\n".join(lines) + "\n"

    fig = Figure(figsize=(6.5, 4), layout="constrained")
    axes = fig.add_subplot()
    for depth in depths:
        color = f"C{depth - 1}"
        axes.plot(range(1, STEPS + 1), running[depth], marker="o", color=color, label=f"depth {depth}")
        axes.axhline(exact_chi[depth], color=color, linestyle=":", linewidth=1.5)
    axes.set_xlabel(f"step i along the segment ({STEPS} steps)")
    axes.set_ylabel("chi of pi_0 .. pi_i")
    axes.set_xticks(range(1, STEPS + 1))
    axes.set_ylim(-0.02, 1)
    axes.set_title(f"CantorNet, y = 3/4: running chi; dotted: whole segment ({reference})", fontsize="medium")
    axes.legend(fontsize="small", loc="lower right")

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cantornet.md").write_text(table)
    fig.savefig(args.out / "cantornet.png", dpi=120)
    print(table)
    return {"running": running, "chi": exact_chi, "regions": regions}


if __name__ == "__main__":
    # The models are tiny: one thread is as fast, and spares the 100x slowdown of OpenMP threads spinning against
    # other processes on a busy machine.
    torch.set_num_threads(1)
    main()
