"""Speed and memory of `path_folding`, as ratios against baselines run in the same process.

Run: python benchmarks/bench_path_folding.py [--quick] [--compile] [--threads N]

- overhead: path_folding time / the fastest plain forward of the same points (all in one batch, or batches of 64 or
  256), min/median/max over interleaved repeats, each function timed alike (in a shuffled order, each timed call right
  after an untimed call of itself: ``common.repeat_times``); then in a fixed order, with path_folding always right after
  the plain forwards; and the minor page faults of a call of each (pages taken anew from the system);
- speed-up over the published approach (one batched forward per path) and over one forward per point;
- the cost of the finiteness check: path_folding / path_folding with the check switched off (min/median/max over
  rounds, each the best of 3 interleaved calls);
- with --compile: path_folding(compile=True) and eager path_folding over the fastest plain forward, eager or compiled
  (``torch.compile(model)``; each plain forward in one batch and in batches of 64 and 256), min/median/max over
  interleaved repeats, and the compile times (first call minus a steady call; inductor caches compiled graphs on
  disk, so a second run reports far less: TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 measures a cold compile).
Peak memory: benchmarks/bench_memory.py.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from common import (
    best_times,
    cnn,
    fold_over_forward,
    minor_faults,
    mlp,
    parse_with_threads,
    plain_forwards,
    repeat_times,
)
from torch import nn

from lightning_spacefold import fold_measure, path_folding
from lightning_spacefold.capture import capture_activations, evaluation_mode
from lightning_spacefold.finite import FiniteCheck
from lightning_spacefold.folding import segment_points


def per_path_loop(model: nn.Module, starts: torch.Tensor, ends: torch.Tensor, steps: int) -> torch.Tensor:
    """The published approach: one batched forward per path, patterns kept, then the measure."""
    t = torch.arange(steps + 1, dtype=torch.float64) / steps
    chis = []
    with evaluation_mode(model), capture_activations(model, lambda _position, z, _rule: z > 0) as capture:
        for start, end in zip(starts, ends, strict=True):
            capture.reset()
            model(segment_points(start[None], end[None], t))
            chis.append(fold_measure(torch.cat([bits.flatten(1) for bits in capture.values], dim=1)))
    return torch.stack(chis)


def per_point_loop(model: nn.Module, starts: torch.Tensor, ends: torch.Tensor, steps: int) -> torch.Tensor:
    """The naive approach: one forward per point."""
    t = torch.arange(steps + 1, dtype=torch.float64) / steps
    chis = []
    with evaluation_mode(model), capture_activations(model, lambda _position, z, _rule: z > 0) as capture:
        for start, end in zip(starts, ends, strict=True):
            patterns = []
            for t_i in t:
                capture.reset()
                model(segment_points(start[None], end[None], t_i[None]))
                patterns.append(torch.cat([bits.flatten(1) for bits in capture.values], dim=1))
            chis.append(fold_measure(torch.cat(patterns)))
    return torch.stack(chis)


def compare(name: str, model: nn.Module, starts: torch.Tensor, ends: torch.Tensor, steps: int, repeats: int) -> None:
    ratios, ours, forwards = fold_over_forward(model, starts, ends, steps, repeats)
    spread = f"min {min(ratios):.2f}x, median {statistics.median(ratios):.2f}x, max {max(ratios):.2f}x"
    fastest = min(forwards, key=forwards.__getitem__)
    print(
        f"{name}: path_folding / fastest plain forward ({fastest}) = {spread} over {repeats} repeats, each after itself"
    )
    # The same in a fixed order, where the call always runs right after the plain forwards (and each of them after
    # another plain forward).
    points = segment_points(starts, ends, torch.arange(steps + 1, dtype=torch.float64) / steps)
    fold = lambda: path_folding(model, starts, ends, steps=steps)  # noqa: E731
    plains = plain_forwards(model, points)
    times = repeat_times([fold, *plains.values()], repeats, fixed_order=True)
    after = [row[0] / min(row[1:]) for row in times]
    print(
        f"{name}: path_folding right after the plain forwards / fastest plain forward = min {min(after):.2f}x, median "
        f"{statistics.median(after):.2f}x, max {max(after):.2f}x over {repeats} repeats in a fixed order"
    )
    print(
        f"{name}: minor page faults a call (median of 5): path_folding {minor_faults(fold)}, fastest plain forward "
        f"{minor_faults(plains[fastest])}"
    )
    per_path, ours_again = best_times(
        [lambda: per_path_loop(model, starts, ends, steps), lambda: path_folding(model, starts, ends, steps=steps)],
        repeats,
    )
    print(f"{name}: speed-up over one forward per path = {per_path / ours_again:.1f}x (target >= 1.7x)")
    (per_point,) = best_times([lambda: per_point_loop(model, starts, ends, steps)], 1)
    print(f"{name}: speed-up over one forward per point = {per_point / ours:.0f}x (target >= 30x)")
    reference = per_path_loop(model, starts, ends, steps)
    assert torch.equal(path_folding(model, starts, ends, steps=steps).chi, reference), "results differ"


@contextmanager
def finite_check_off() -> Iterator[None]:
    """path_folding without its finiteness check: the check's reductions replaced by no-ops."""
    saved = FiniteCheck.add, FiniteCheck.end_pass, FiniteCheck.check
    FiniteCheck.add = FiniteCheck.end_pass = FiniteCheck.check = lambda *args: None
    try:
        yield
    finally:
        FiniteCheck.add, FiniteCheck.end_pass, FiniteCheck.check = saved


def finite_check_cost(name: str, model: nn.Module, starts: torch.Tensor, ends: torch.Tensor, rounds: int) -> None:
    def unchecked() -> None:
        with finite_check_off():
            path_folding(model, starts, ends, steps=64)

    ratios = []
    for _ in range(rounds):
        checked, off = best_times([lambda: path_folding(model, starts, ends, steps=64), unchecked], 3)
        ratios.append(checked / off)
    print(
        f"{name}: finiteness check, path_folding / without the check = min {min(ratios):.3f}x, median "
        f"{statistics.median(ratios):.3f}x, max {max(ratios):.3f}x over {rounds} rounds (target <= 1.02x)"
    )


def compiled_over_forward(
    name: str, model: nn.Module, starts: torch.Tensor, ends: torch.Tensor, steps: int, repeats: int
) -> None:
    """compile=True against eager path_folding and the fastest plain forward, eager or compiled."""
    points = segment_points(starts, ends, torch.arange(steps + 1, dtype=torch.float64) / steps)
    compiled_model = torch.compile(model, dynamic=False)

    def first_call(function: Callable[[], object]) -> float:
        begin = time.perf_counter()
        function()
        first = time.perf_counter() - begin
        begin = time.perf_counter()
        function()
        return first - (time.perf_counter() - begin)

    plains = {
        f"{kind}, {label}": function
        for kind, run in (("eager", model), ("compiled", compiled_model))
        for label, function in plain_forwards(run, points).items()
    }
    sizes = [label for label in plains if label.startswith("eager")]
    compile_plain = sum(first_call(function) for label, function in plains.items() if label.startswith("compiled"))
    fused = lambda: path_folding(model, starts, ends, steps=steps, compile=True)  # noqa: E731
    compile_fold = first_call(fused)
    eager = path_folding(model, starts, ends, steps=steps)
    same = all(
        torch.equal(getattr(eager, f), getattr(fused(), f))
        for f in ("chi", "r1", "r2", "layer_r1", "layer_r2", "chi_max")
    )
    times = repeat_times([fused, lambda: path_folding(model, starts, ends, steps=steps), *plains.values()], repeats)
    labels = list(plains)
    eager_best = [min(row[2 : 2 + len(sizes)]) for row in times]
    all_best = [min(row[2:]) for row in times]
    fastest = labels[min(range(len(labels)), key=lambda i: min(row[2 + i] for row in times))]
    for what, column in (("compile=True", 0), ("eager", 1)):
        for base, best in (
            ("fastest eager plain forward", eager_best),
            ("fastest plain forward, eager or compiled", all_best),
        ):
            ratios = [row[column] / b for row, b in zip(times, best, strict=True)]
            print(
                f"{name}: path_folding {what} / {base} = min {min(ratios):.2f}x, median "
                f"{statistics.median(ratios):.2f}x, max {max(ratios):.2f}x over {repeats} repeats"
            )
    print(
        f"{name}: fastest plain forward overall: {fastest}; compile time: path_folding {compile_fold:.1f} s, plain "
        f"forwards {compile_plain:.1f} s (all {len(sizes)} batch sizes); results identical to eager: {same}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and pairs (a smoke run)")
    parser.add_argument("--finite-check", action="store_true", help="only the cost of the finiteness check")
    parser.add_argument("--compile", action="store_true", help="only compile=True against the plain forwards")
    args = parse_with_threads(parser)
    torch.manual_seed(0)
    repeats = 2 if args.quick else 15
    pairs, steps = (16, 64) if args.quick else (64, 64)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {pairs} pairs x {steps} steps")
    networks = (("MLP 784-256x4-10", mlp()), ("CNN 1x28x28", cnn()))
    for name, model in networks:
        starts, ends = torch.rand(pairs, 1, 28, 28), torch.rand(pairs, 1, 28, 28)
        if args.compile:
            compiled_over_forward(name, model.eval(), starts, ends, steps, 3 if args.quick else 9)
            continue
        if not args.finite_check:
            compare(name, model, starts, ends, steps, repeats)
        finite_check_cost(name, model, starts, ends, 3 if args.quick else 9)


if __name__ == "__main__":
    main()
