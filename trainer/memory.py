"""Host memory for CPU training: let malloc keep what a step frees for the next step.

A CPU training step allocates and frees the same activations, gradients and casts, up to tens of MB each, every
step. Left to its defaults, glibc's malloc hands much of that memory back to the kernel when it is freed (it trims
the top of its heap once more than 128 KB are free there, and unmaps a block that was big enough to get its own
mapping), so the next step's blocks are fresh pages again, and the kernel zero-fills each 4 KB page at its first
touch: tens of thousands of page faults a step for a small model (bench/RESULTS.md). jemalloc and tcmalloc, the
allocators PyTorch's CPU performance guide recommends preloading, keep freed memory by design; glibc does when told
to. Two of its settings suffice:
  M_MMAP_MAX 0: every block comes from the heap, where a freed block is reused, and none from a mapping of its own,
      which is returned at once (raising M_MMAP_THRESHOLD instead stops at glibc's ceiling of 32 MB, below the
      logits and their gradient in a step of the benchmarks' config S: 52 MB each);
  M_TOP_PAD 512 MB: the heap grows and shrinks in 512 MB of slack, so a step's freed memory stays for the next.
The process's peak memory is what the step needs either way: malloc keeps at most the slack beyond it.
"""
from __future__ import annotations

import ctypes
import os

M_TOP_PAD, M_MMAP_MAX = -2, -4  # mallopt's parameter numbers (glibc's malloc.h)
TOP_PAD = 512 << 20


def is_glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") is not None  # e.g. "glibc 2.36"
    except (ValueError, OSError):  # macOS, Windows, musl: no such name
        return False


def keep_freed_memory() -> bool:
    """Set glibc's malloc to keep freed memory for reuse (see the module docstring), for the rest of this process.
    False, changing nothing, where the C library is not glibc."""
    if not is_glibc():
        return False
    libc = ctypes.CDLL("libc.so.6")
    return bool(libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TOP_PAD, TOP_PAD))
