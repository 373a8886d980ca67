"""A short CUDA check of what CI cannot run (no GPU there): results on the GPU equal those on the CPU.

Run on a machine with a GPU: python benchmarks/cuda_check.py. Exits non-zero on the first mismatch. After the checks
it measures the zoo's fold/forward ratio on the GPU (``bench_zoo.run``; networks whose package is missing are
skipped: ``pip install -e ".[zoo]"`` for all) and prints its table.
"""

from __future__ import annotations

import torch
from bench_zoo import run as run_zoo
from torch import nn

from lightning_spacefold import path_folding
from lightning_spacefold.sampling import all_pairs, centroid_pairs, class_pairs, kmeans, random_pairs


def check(name: str, condition: bool) -> None:
    print(f"{'PASS' if condition else 'FAIL'} {name}")
    if not condition:
        raise SystemExit(1)


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run this on a machine with a GPU")
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 14 * 14, 32),
        nn.GELU(),
        nn.Linear(32, 10),
    ).double()
    starts, ends = torch.rand(32, 1, 28, 28, dtype=torch.float64), torch.rand(32, 1, 28, 28, dtype=torch.float64)
    on_cpu = path_folding(model, starts, ends, steps=128)
    on_gpu = path_folding(model.cuda(), starts.cuda(), ends.cuda(), steps=128)
    check("float64 path_folding on CUDA equals CPU", torch.equal(on_gpu.chi.cpu(), on_cpu.chi))
    check("results stay on the inputs' device", on_gpu.chi.is_cuda and on_gpu.layer_r1.is_cuda)
    model = model.float()
    for dtype in (torch.float32, torch.bfloat16):
        result = path_folding(model.to(dtype), starts.cuda().to(dtype), ends.cuda().to(dtype), steps=128)
        close = (result.chi.cpu() - on_cpu.chi).abs().mean().item()
        check(f"{dtype} path_folding runs, mean |chi - float64 chi| = {close:.4f} < 0.05", close < 0.05)
    model = model.float()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        result = path_folding(model, starts.cuda().float(), ends.cuda().float(), steps=128)
    check("path_folding under CUDA autocast runs", result.chi.isfinite().all().item())

    points, labels = torch.randn(60, 5), torch.arange(3).repeat_interleave(20)
    for sample in (
        lambda x, y: random_pairs(x, 20, labels=y, generator=0),
        lambda x, y: class_pairs(x, y, 20, generator=0),
        lambda x, y: all_pairs(x, labels=y),
    ):
        cpu_pairs, gpu_pairs = sample(points, labels), sample(points.cuda(), labels.cuda())
        same = torch.equal(gpu_pairs.starts.cpu(), cpu_pairs.starts) and torch.equal(
            gpu_pairs.ends.cpu(), cpu_pairs.ends
        )
        check("sampling on CUDA equals CPU", same and gpu_pairs.start_labels.is_cuda)
    cpu_pairs, gpu_pairs = centroid_pairs(points, labels, 2), centroid_pairs(points.cuda(), labels.cuda(), 2)
    check("centroid pairs on CUDA", torch.allclose(gpu_pairs.starts.cpu(), cpu_pairs.starts, atol=1e-4))
    check(
        "kmeans with a CUDA generator",
        kmeans(points.cuda(), 3, generator=torch.Generator("cuda").manual_seed(0))[0].is_cuda,
    )

    print()
    run_zoo(device="cuda", paths=64, exact=False)  # all networks, 64 paths x 33 points, 5 repeats


if __name__ == "__main__":
    main()
