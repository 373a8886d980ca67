"""A measurement lets glibc's heap keep the memory of its forward passes (lightning_spacefold.heap)."""

from __future__ import annotations

import ctypes
import json
import os
import platform
import subprocess
import sys

import pytest

from lightning_spacefold.heap import HEAP_BLOCK_BYTES

# In a fresh process: the MiB glibc holds in memory maps while an activation is alive (``mallinfo2``'s ``hblkhd``,
# glibc 2.33 or later), of 12 MiB before a small measurement on CPU and of 14 MiB after it. Freeing the first raises
# glibc's mmap threshold to 12 MiB; only the measurement can raise it over 14 MiB.
SCRIPT = """
import ctypes, json, sys, torch
from torch import nn
from lightning_spacefold import path_folding, path_patterns

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost"
    )]

mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = MallInfo2

def mapped_mib_with_an_activation(mib):
    mapped = mallinfo2().hblkhd
    activation = torch.ones(mib * 2**18)
    return (mallinfo2().hblkhd - mapped) / 2**20

before = mapped_mib_with_an_activation(12)
model, starts, ends = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), torch.zeros(2, 4), torch.ones(2, 4)
{
    "sampled": lambda: path_folding(model, starts, ends, steps=4),
    "exact": lambda: path_folding(model, starts, ends, exact=True),
    "patterns": lambda: path_patterns(model, starts, ends, steps=4),
}[sys.argv[1]]()
print(json.dumps({"before": before, "after": mapped_mib_with_an_activation(14)}))
"""


@pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc" or not hasattr(ctypes.CDLL(None), "mallinfo2"),
    reason="the thresholds and mallinfo2 are glibc's (2.33 or later)",
)
@pytest.mark.parametrize("measurement", ["sampled", "exact", "patterns"])
def test_measurement_raises_glibc_mmap_threshold_over_an_activation(measurement: str) -> None:
    assert 14 * 2**20 < HEAP_BLOCK_BYTES < 32 * 2**20  # under glibc's cap, or the threshold would not move
    environment = {name: value for name, value in os.environ.items() if not name.startswith("MALLOC_")}
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, measurement], env=environment, capture_output=True, text=True, check=True
    )
    mapped = json.loads(result.stdout)
    # Before: an activation gets a memory map of its own, given back when it is freed (its pages faulted in again
    # next time). After: it comes from the heap, which keeps it.
    assert mapped["before"] >= 12, mapped
    assert mapped["after"] == 0, mapped
