"""The C heap's threshold for giving large blocks back to the OS, fixed at start (a leaf: imports
nothing of the package).

glibc serves blocks from 128 KiB up with mmap and returns them on free, but after each such free it
raises that threshold to the freed size (up to 32 MiB): from then on, blocks of that size come from the
heap arenas, and freed ones stay in the process. Expert and resident dequantisation make and free
blocks of a few MiB on every call of a prefill, so the resident set crept tens of MiB above the memory
plan (measured: an int4 run under --cpu-mem 0.35 GiB peaked at 0.38 GiB; with the threshold fixed,
0.36). Fixing it (mallopt M_MMAP_THRESHOLD) keeps the dynamic rise off, as MALLOC_MMAP_THRESHOLD_ does.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
THRESHOLD = 128 << 10  # glibc's default, kept fixed


def fix_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold unless the environment set it; True when done (False off glibc)."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD))
    except (OSError, AttributeError):  # not glibc: nothing to fix
        return False
