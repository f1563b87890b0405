"""How torch's OpenMP threads wait, set before torch loads (a leaf: imports nothing of the package, and
not torch: libgomp reads its environment once, when it is loaded).

torch's CPU wheels use GNU OpenMP, whose threads spin at the end of every parallel region (300,000 polls,
milliseconds) before they sleep. A decode step is hundreds of small parallel regions; when another
process holds one of the cores, the thread that lost it arrives late at every barrier while its partner
spins on the other core: on a 2-core machine with one busy process beside it, 2 threads decoded 15x
slower than 1 (docs/benchmarks.md, "Busy machine"). Sleeping at once (OMP_WAIT_POLICY=PASSIVE) stops that
spinning but costs a wake-up per region, which on a quiet virtual machine cost a third of the decode speed
(the llama.cpp bench model at 2 threads: 34 against 50 tok/s). So the threads poll briefly
(GOMP_SPINCOUNT=SPIN: regions of one step follow each other within that) and then sleep, and a busy
machine is left to the decode thread tuner (runtime/threads.py), which moves to fewer threads when the
second one waits for a core.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

# Variables through which a user (or a launcher) already chose how OpenMP threads wait: left alone.
CHOSEN = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
SPIN = "50000"  # polls before a thread sleeps (torch's default 300,000); 5,000-200,000 measured alike


def set_openmp_wait(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Ask OpenMP threads to poll briefly, then sleep, unless the environment chose already; True if it
    was set here. Takes effect only when called before torch is first imported."""
    if any(k in environ for k in CHOSEN):
        return False
    environ["GOMP_SPINCOUNT"] = SPIN
    return True
