"""How torch's OpenMP threads wait, set before torch loads (a leaf: imports nothing of the package, and
not torch: libgomp reads its environment once, when it is loaded).

torch's CPU wheels use GNU OpenMP, whose threads spin at the end of every parallel region (300,000 polls,
milliseconds) before they sleep. A decode step is hundreds of small parallel regions; when another
process holds one of the cores, the thread that lost it arrives late at every barrier while its partner
spins on the other core, so each region waits for a time slice of the scheduler: on a 2-core machine
with one busy process beside it, 2 threads decoded 15x slower than 1 (docs/benchmarks.md, "Busy
machine"). Passive waiting (the threads sleep at once) costs a wake-up per region on a quiet machine
and keeps a busy one near the speed of 1 thread.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

# Variables through which a user (or a launcher) already chose how OpenMP threads wait: left alone.
CHOSEN = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def wait_passively(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Ask OpenMP for passive waiting unless the environment chose already; True if it was set here.
    Takes effect only when called before torch is first imported."""
    if any(k in environ for k in CHOSEN):
        return False
    environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True
