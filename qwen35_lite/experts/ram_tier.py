"""The RAM tier of TieredExperts: its slot buffers (page-locked under a cap, `HostBuffers`), its slots
filled from the checkpoint by grouped reads (file order), the read counters, and the copies out of its
slots to the GPU still in flight (a read into a slot waits for them). The caller holds the layer's lock.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .slots import SlotTier
from .store import ExpertStore


class RamTier:
    def __init__(self, tier: SlotTier, store: ExpertStore, background: bool) -> None:
        """background: the prefetch thread reads too (it gets its own staging buffer)."""
        self.tier, self.store = tier, store
        staging = store.needs_staging()
        self._staging = torch.empty(store.raw_nbytes, dtype=torch.uint8) if staging else None
        self._staging_bg = (
            torch.empty(store.raw_nbytes, dtype=torch.uint8) if staging and background else None
        )
        # per layer and slot: the event of the last copy out of the slot (None: none in flight)
        self._busy: list[list[torch.cuda.Event | None]] = [[None] * p.capacity for p in tier.pools]
        self.reset_stats()

    def reset_stats(self) -> None:
        self.bytes_read = self.bytes_read_prefetch = 0
        self.experts_read = self.prefetch_read = 0

    def acquire(self, layer: int, need: list[int]) -> None:
        """Put `need` (at most the layer's slots) in the slots of `layer`, reading the misses; counted."""
        pool = self.tier.pools[layer]
        pool.in_use = set(need)
        _, misses = self.tier.look_up(layer, need)
        self.fill(layer, misses, [pool.take(pool.in_use) for _ in misses])  # never None: need fits

    def fill(self, layer: int, experts: list[int], slots: list[int], background: bool = False) -> None:
        """Read experts from the checkpoint into RAM slots (grouped, file order)."""
        if not experts:
            return
        pool = self.tier.pools[layer]
        self._wait_copies_out(layer, slots)
        staging = self._staging_bg if background else self._staging
        self.store.read_many(layer, experts, [pool.slots[s] for s in slots], staging)
        for e, s in zip(experts, slots):
            pool.put(e, s)
        n = len(experts) * self.store.expert_nbytes
        if background:
            self.bytes_read_prefetch += n
            self.prefetch_read += len(experts)
        else:
            self.bytes_read += n
            self.experts_read += len(experts)

    def copying_out(self, layer: int, s: int, done: torch.cuda.Event) -> None:
        """A copy out of slot s runs until `done` (the GPU tier's): a read into the slot waits for it."""
        self._busy[layer][s] = done

    def _wait_copies_out(self, layer: int, slots: Sequence[int]) -> None:
        """Block until no copy out of these slots is in flight (before a read overwrites them)."""
        for s in slots:
            ev = self._busy[layer][s]
            if ev is not None:
                ev.synchronize()
                self._busy[layer][s] = None


class HostBuffers:
    """Allocates the RAM tier's slot buffers, one per layer (SlotTier's `alloc`): page-locked while under
    `cap` bytes (the OS cannot page them out: too many starve the machine); a layer past it copies to the
    GPU from pageable memory, staged by the driver: slower, the same bytes. cap None: half the machine's
    memory, asked only when something is pinned."""

    def __init__(self, pin: bool, cap: int | None = None) -> None:
        self.pin = pin
        self.cap = (_default_pinned_cap() if pin else 0) if cap is None else cap
        self.pinned_bytes = 0

    def __call__(self, nbytes: int) -> torch.Tensor:
        pinned = self.pin and self.pinned_bytes + nbytes <= self.cap
        self.pinned_bytes += nbytes if pinned else 0
        # pages faulted in now: untouched pages would fault (and be zeroed) on the first read into each
        # slot, during decode; the plan counts these bytes as held
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned).fill_(0)


def _default_pinned_cap() -> int:
    """Half the machine's physical memory: page-locked memory cannot be swapped or reclaimed."""
    import psutil

    return psutil.virtual_memory().total // 2
