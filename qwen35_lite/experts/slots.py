"""Fixed expert slots: one tier's per-layer pools (which expert sits in which slot, the eviction order),
the slot buffers allocated once, the expert bound to each slot by its format, and hit/miss counters."""

from __future__ import annotations

from collections.abc import Callable, Container

import torch

from .formats import ALIGN, ExpertFormat
from .policy import LRUPolicy


class SlotPool:
    """The slots of one tier for one layer: which expert sits where, and the eviction order."""

    def __init__(self, slots: list[torch.Tensor], policy: LRUPolicy) -> None:
        self.slots = slots
        self.where: dict[int, int] = {}  # expert -> slot index
        self.free = list(range(len(slots)))[::-1]
        self.policy = policy
        self.in_use: set[int] = set()  # experts handed out by the last get: a prefetch never evicts them

    @property
    def capacity(self) -> int:
        return len(self.slots)

    def take(self, keep: Container[int]) -> int | None:
        """A free slot, or the slot of the policy's victim (evicted); None if every resident is kept."""
        if self.free:
            return self.free.pop()
        e = self.policy.victim(keep)
        return None if e is None else self.evict(e)

    def evict(self, e: int) -> int:
        self.policy.remove(e)
        return self.where.pop(e)

    def put(self, e: int, s: int) -> None:
        self.where[e] = s
        self.policy.touch(e)


class SlotTier:
    """Per-layer pools of one tier, the expert callable bound to every slot, and hit/miss counters."""

    def __init__(
        self,
        name: str,
        fmt: ExpertFormat,
        n_layers: int,
        n_slots: int,
        policy: Callable[[], LRUPolicy],
        alloc: Callable[[int], torch.Tensor],
    ) -> None:
        self.name = name
        nb = fmt.slot_nbytes
        stride = -(-nb // ALIGN) * ALIGN  # every slot starts aligned, so each part's dtype view is too
        self.buffers = [alloc(n_slots * stride) for _ in range(n_layers)]  # the only allocation, ever
        self.pools = [
            SlotPool([buf[i * stride : i * stride + nb] for i in range(n_slots)], policy())
            for buf in self.buffers
        ]
        self.experts = [[fmt.bind(s) for s in pool.slots] for pool in self.pools]
        self.stacks = [fmt.stack(buf, n_slots, stride) for buf in self.buffers]  # None: one by one
        self.hits = self.misses = 0

    def count(self, hits: int, misses: int) -> None:
        self.hits += hits
        self.misses += misses

    def look_up(self, layer: int, need: list[int]) -> tuple[list[int], list[int]]:
        """(hits, misses) of `need` in the pool of `layer`: counted, the hits touched."""
        pool = self.pools[layer]
        hits = [e for e in need if e in pool.where]
        misses = [e for e in need if e not in pool.where]
        self.count(len(hits), len(misses))
        for e in hits:
            pool.policy.touch(e)
        return hits, misses
