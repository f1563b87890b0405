"""How many CPU threads a decode step runs on, chosen by measuring the steps themselves.

A decode step is a few hundred small parallel regions. When other processes hold the cores, every region
waits for a scheduler time slice before its second thread runs (however its threads wait: openmp.py): on
this 2-core machine with two other busy processes, 2 threads decoded at 1.3 tok/s where 1 thread did
15.6 (docs/benchmarks.md, "Busy machine"). No thread count is right for every
moment, so `ThreadTuner` tries them: it runs the steps at the most threads, now and then a few steps at
fewer, and keeps the fastest. Probes back off while the choice holds (each costs a few slow steps on a
quiet machine) and come back early when steps in a row take far longer than the current estimate (the
machine got busy; one slow step is noise). Prefill keeps the most threads: its regions are large enough
that a late thread costs little, but for its small experts (experts/dispatch.py), which run on one
thread unless the steps found the machine quiet.

`--cpu-threads N` fixes N threads (no tuner); the default lets the tuner choose between torch's count and
fewer.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from ..experts.dispatch import small_experts_on_one_thread

PROBE_STEPS = 2  # steps a probe runs at another count
FIRST_PROBE = 4  # steps before the first probe (a busy machine's 2-thread steps are ~3x slower)
BACKOFF = 4  # the gap between probes grows this much each time the choice holds
MAX_INTERVAL = 256  # the longest gap between probes while the choice holds
SLOW_STEP = 2.0  # SLOW_RUN steps in a row this many times the estimate: probe now
SLOW_RUN = 2  # one slow step is noise (a page fault, a collection, a neighbour's burst): not the machine
SETTLED = 3  # step times an estimate needs before a slow step counts against it
KEEP = 8  # recent step times kept per count


def candidates(most: int) -> list[int]:
    """Thread counts worth trying: the most, half of it, one (distinct, largest first)."""
    return sorted({most, max(1, most // 2), 1}, reverse=True)


class ThreadTuner:
    """Chooses the decode thread count among `candidates(most)` by the step times it measures."""

    def __init__(
        self,
        most: int,
        *,
        clock: Callable[[], float] = time.perf_counter,
        set_threads: Callable[[int], None] = torch.set_num_threads,
    ) -> None:
        self.counts = candidates(most)
        self.most, self.current = most, most
        self._clock, self._set = clock, set_threads
        self._times: dict[int, deque[float]] = {n: deque(maxlen=KEEP) for n in self.counts}
        self._interval = FIRST_PROBE
        self._until_probe = FIRST_PROBE
        self._probe: list[int] = []  # counts still to probe, in order
        self._left = 0  # steps left in the current probe
        self._chosen = most
        self._slow = 0  # slow steps in a row
        self._compared = False  # a probe has compared the counts (the choice is measured, not assumed)

    def estimate(self, n: int) -> float | None:
        """The median of the recent step times at n threads (None before any)."""
        t = self._times[n]
        return statistics.median(t) if t else None

    @contextmanager
    def step(self) -> Iterator[None]:
        """One decode step: run at the current count, timed."""
        self._set(self.current)
        t = self._clock()
        yield
        self._record(self._clock() - t)

    def for_prefill(self) -> None:
        """A prefill runs at the most threads; its small experts on one unless the decode steps found
        the machine quiet (the most threads chosen by a probe: before one it is not known)."""
        self._set(self.most)
        quiet = self._compared and self._chosen == self.most
        small_experts_on_one_thread(not quiet or self.most == 1)

    # ---- the choice ---------------------------------------------------------------------------------

    def _record(self, seconds: float) -> None:
        n = self.current
        est = self.estimate(n)
        settled = len(self._times[n]) >= SETTLED
        slow = not self._probe and settled and seconds > SLOW_STEP * est
        self._slow = self._slow + 1 if slow else 0
        if self._slow >= SLOW_RUN:
            self._until_probe, self._slow = 0, 0  # the machine changed: look again now, against these steps
            self._interval = FIRST_PROBE
            recent = list(self._times[n])[-(SLOW_RUN - 1) :]
            self._times[n].clear()
            self._times[n].extend(recent)
        self._times[n].append(seconds)
        if self._probe:
            self._probe_step()
        else:
            self._until_probe -= 1
            if self._until_probe <= 0 and len(self.counts) > 1:
                self._probe = [c for c in self.counts if c != self._chosen]
                self._switch(self._probe[0], steps=PROBE_STEPS)

    def _probe_step(self) -> None:
        self._left -= 1
        if self._left > 0:
            return
        self._probe.pop(0)
        if self._probe:
            self._switch(self._probe[0], steps=PROBE_STEPS)
            return
        best = min(self.counts, key=lambda c: self.estimate(c) or float("inf"))
        self._compared = True
        self._interval = min(MAX_INTERVAL, self._interval * BACKOFF) if best == self._chosen else FIRST_PROBE
        self._chosen, self._until_probe = best, self._interval
        self._times[self._chosen].clear()  # its estimate from now on: the machine as it is now
        self._switch(best, steps=0)

    def _switch(self, n: int, steps: int) -> None:
        self.current, self._left = n, steps
        if steps and self._times[n]:
            self._times[n].clear()  # a probe measures the machine as it is now
