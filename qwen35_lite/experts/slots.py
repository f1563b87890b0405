"""Fixed expert slots: one tier's per-layer pools (which expert sits in which slot, the eviction order),
the slot buffers allocated once, the expert bound to each slot by its format, and hit/miss counters."""

from __future__ import annotations

import ctypes
import mmap
import sys
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
        self.withheld = 0  # the last slots, released for a while (SlotTier.release): none is handed out

    @property
    def capacity(self) -> int:
        return len(self.slots) - self.withheld

    def withhold(self, n: int) -> list[int]:
        """Take the last `n` slots out of use (their experts evicted); returns the experts evicted."""
        gone = []
        for s in range(self.capacity - n, self.capacity):
            if s in self.free:
                self.free.remove(s)
                continue
            e = next(e for e, slot in self.where.items() if slot == s)
            gone.append(e)
            self.evict(e)
        self.withheld += n
        return gone

    def restore(self) -> None:
        """Hand the withheld slots back, empty."""
        self.free += range(len(self.slots) - 1, self.capacity - 1, -1)
        self.withheld = 0

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
        self.stride = stride = -(-nb // ALIGN) * ALIGN  # every slot starts aligned (dtype views are too)
        self.buffers = [alloc(n_slots * stride) for _ in range(n_layers)]  # the only allocation, ever
        self.pools = [
            SlotPool([buf[i * stride : i * stride + nb] for i in range(n_slots)], policy())
            for buf in self.buffers
        ]
        self.experts = [[fmt.bind(s) for s in pool.slots] for pool in self.pools]
        self.stacks = [fmt.stack(buf, n_slots, stride) for buf in self.buffers]  # None: one by one
        self.hits = self.misses = 0
        self.pinned = any(b.is_pinned() for b in self.buffers if b.device.type == "cpu")

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

    def release(self, n: int) -> int:
        """Give the memory of the last `n` slots of every layer back to the OS for a while (an image's
        decoding needs it: multimodal.room_for_images); the experts in them are evicted (read again when
        next wanted: the same bytes, so the same tokens). Returns the bytes given back: 0 where pages
        cannot be given back (not Linux, or page-locked memory for a GPU: the CUDA driver owns those)."""
        if n < 1 or self.pinned or not sys.platform.startswith("linux"):
            return 0
        n = min(n, self.pools[0].capacity - 1)  # one slot stays: a lookup streams through it
        released = 0
        for pool, buf in zip(self.pools, self.buffers, strict=True):
            start = (pool.capacity - n) * self.stride
            pool.withhold(n)
            released += _drop_pages(buf, start)
        return released

    def regrow(self) -> None:
        """The released slots back in use (their pages faulted in again now, not in a decode step)."""
        for pool, buf in zip(self.pools, self.buffers, strict=True):
            if pool.withheld:
                buf[(pool.capacity) * self.stride :].fill_(0)
                pool.restore()

    @property
    def withheld(self) -> int:
        return self.pools[0].withheld if self.pools else 0


def _drop_pages(buf: torch.Tensor, start: int) -> int:
    """MADV_DONTNEED on the whole pages of buf[start:]: the OS takes them back (RssAnon drops), the
    mapping stays and reads as zeros until written. Returns the bytes dropped."""
    page = mmap.PAGESIZE
    lo = -(-(buf.data_ptr() + start) // page) * page
    hi = (buf.data_ptr() + buf.numel()) // page * page
    if hi <= lo:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), 4) != 0:  # 4: MADV_DONTNEED
        return 0
    return hi - lo
