"""Speed and memory of `path_folding`, as ratios against baselines run in the same process.

Run: python benchmarks/bench_path_folding.py [--quick]

- overhead: path_folding time / the fastest plain forward of the same points (all in one batch, or batches of 64 or
  256), min/median/max over interleaved repeats;
- speed-up over the published approach (one batched forward per path) and over one forward per point;
- peak memory of 2048 steps against 64 steps (each in a fresh subprocess, resident-set growth during the call);
- the cost of the finiteness check: path_folding / path_folding with the check switched off (min/median/max over
  rounds, each the best of 3 interleaved calls).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from common import best_times, cnn, fold_over_forward, mlp
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


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def peak_memory_child(steps: int) -> None:
    """Run in a fresh subprocess: print the peak resident-set growth during one path_folding call (KiB)."""
    torch.manual_seed(0)
    model = mlp()
    starts, ends = torch.rand(64, 1, 28, 28), torch.rand(64, 1, 28, 28)
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # reset the high-water mark VmHWM to the current resident set
    path_folding(model, starts, ends, steps=steps)
    print(json.dumps({"steps": steps, "growth_kib": _status_kib("VmHWM") - before}))


def peak_memory(steps: int) -> dict:
    # A fixed mmap threshold makes glibc return every large freed block at once, so that the resident set follows
    # the live tensors; with its default (dynamic) threshold, freed blocks are kept and the high-water mark of the
    # same call varied between 35 and 430 MiB from run to run.
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    command = [sys.executable, __file__, "--memory-child", str(steps)]
    output = subprocess.run(command, check=True, capture_output=True, text=True, env=environment).stdout
    return json.loads(output)


def compare(name: str, model: nn.Module, starts: torch.Tensor, ends: torch.Tensor, steps: int, repeats: int) -> None:
    ratios, ours, forwards = fold_over_forward(model, starts, ends, steps, repeats)
    spread = f"min {min(ratios):.2f}x, median {statistics.median(ratios):.2f}x, max {max(ratios):.2f}x"
    fastest = min(forwards, key=forwards.__getitem__)
    print(
        f"{name}: path_folding / fastest plain forward ({fastest}) = {spread} over {repeats} repeats (target <= 1.25x)"
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and pairs (a smoke run)")
    parser.add_argument("--finite-check", action="store_true", help="only the cost of the finiteness check")
    parser.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child is not None:
        peak_memory_child(args.memory_child)
        return
    torch.manual_seed(0)
    repeats = 2 if args.quick else 5
    pairs, steps = (16, 64) if args.quick else (64, 64)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {pairs} pairs x {steps} steps")
    networks = (("MLP 784-256x4-10", mlp()), ("CNN 1x28x28", cnn()))
    for name, model in networks:
        starts, ends = torch.rand(pairs, 1, 28, 28), torch.rand(pairs, 1, 28, 28)
        if not args.finite_check:
            compare(name, model, starts, ends, steps, repeats)
        finite_check_cost(name, model, starts, ends, 3 if args.quick else 9)
    if args.finite_check:
        return
    small, large = peak_memory(64), peak_memory(2048)
    ratio = max(large["growth_kib"], 1) / max(small["growth_kib"], 1)
    print(
        f"MLP peak memory growth: 64 steps {small['growth_kib'] / 1024:.1f} MiB, 2048 steps "
        f"{large['growth_kib'] / 1024:.1f} MiB, ratio {ratio:.2f}x (target <= 1.5x)"
    )


if __name__ == "__main__":
    main()
