"""Keep freed tensor memory in the process on CPU instead of handing it back to the kernel.

    from engine.malloc import keep_freed_memory
    keep_freed_memory()      # once, before the first step (engine.train and engine.bench on CPU)

PyTorch's CPU allocator is plain malloc. glibc serves a block above M_MMAP_THRESHOLD (dynamic, at
most 32 MiB) with a fresh mmap and unmaps it on free, and trims the heap top above
M_TRIM_THRESHOLD, so every step faults in (and the kernel zero-fills) its large activations again:
one more pass over each of them, outside any GEMM. Counted with getrusage's minor faults on
`python -m engine.bench`'s shape (4096 tokens, D 256, E 8, top-2), one forward+backward:
22 MiB for the dense MLP, 30 MiB padded, 36 MiB grouped (the MoE layer has more [N*K, D]-sized
buffers; measured before relu²'s backward became one buffer, engine/activation.py); after
keep_freed_memory, ~0 for all three. The usual alternative is LD_PRELOAD of
jemalloc or tcmalloc (PyTorch's CPU performance guide); this needs no extra library.
Cost: the process's resident size stays at its peak (it is the peak that a run must fit anyway).
"""
from __future__ import annotations

import ctypes
import sys

# <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling on 64-bit (4 MiB * sizeof(long))


def keep_freed_memory() -> bool:
    """True when glibc took the settings; False elsewhere (not Linux/glibc: nothing changes)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))
