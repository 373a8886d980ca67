"""Keep a measurement's activations in the C heap between its forward passes (CPU, glibc).

glibc serves a block larger than its mmap threshold from a new memory map, and gives the free top of its heap back
to the system once it exceeds twice that threshold. The threshold starts at 128 KiB and rises to the size of the
largest mapped block freed so far, up to 32 MiB. In a process that has not yet freed a large block (a fresh
script, a notebook), a measurement's activations, megabytes each, keep freeing the heap's top and growing it again
layer after layer, and every page that comes back costs a page fault: on the benchmark MLP up to 3,088 a call (the
median of one process) and a quarter of its time (``benchmarks/bench_path_folding.py``). Freeing one untouched
block of :data:`HEAP_BLOCK_BYTES` raises the threshold as a training run's own large tensors do, so the heap keeps
the passes' memory for reuse, as much as one pass needs. With other allocators, or glibc's thresholds set by the
user (``MALLOC_*`` environment variables or ``mallopt``), it is one short-lived allocation and changes nothing.
"""

from __future__ import annotations

import torch

__all__ = ["HEAP_BLOCK_BYTES", "keep_heap"]

HEAP_BLOCK_BYTES = 16 * 2**20
"""Size of the block :func:`keep_heap` frees: twice the largest activation of an eager pass at the CPU batch budget
(8 MiB), and under glibc's 32 MiB cap on the threshold it raises. Passes grown for a model's large weights may hold
larger activations, which glibc still maps and unmaps one by one."""


def keep_heap(device: torch.device) -> None:
    """Let the heap keep a measurement's memory between its forward passes; call it before them.

    On CPU, frees one untouched block of :data:`HEAP_BLOCK_BYTES` (a memory map and its removal; no page is touched),
    which raises glibc's mmap and trim thresholds to that block's size where they were lower (module docstring).

    Args:
        device: The device the measurement runs on; nothing happens on other devices than the CPU.
    """
    if device.type == "cpu":
        torch.empty(HEAP_BLOCK_BYTES, dtype=torch.uint8)
