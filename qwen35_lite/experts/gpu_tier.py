"""The CUDA tier of TieredExperts: fixed GPU slots per layer in front of the (pinned) RAM tier.

A miss is put in a RAM slot by the RAM tier (its collaborator, read from disk there where missing), then
copied with `non_blocking=True` on a side stream. Two kinds of event keep that correct: the event of the
last copy INTO a GPU slot (the compute stream waits on it before the slot's views are handed out), and
the event of the last copy OUT OF a RAM slot (handed to the RAM tier: a read from disk into that slot
waits on it). The side stream waits for the compute stream before overwriting a GPU slot that queued
kernels may still read. Chosen only when the device is CUDA; its bookkeeping is tested on the CPU with
stand-in streams and events.
"""

from __future__ import annotations

import torch

from .ram_tier import RamTier
from .slots import SlotTier


class GpuTier:
    def __init__(self, gpu: SlotTier, ram: RamTier, device: torch.device, slot_nbytes: int) -> None:
        """ram: where a miss comes from (it reads from disk what it does not hold)."""
        self.tier, self.ram, self.device = gpu, ram, device
        self.slot_nbytes = slot_nbytes
        self.stream = torch.cuda.Stream(device)
        self._ready: list[list[torch.cuda.Event | None]] = [[None] * p.capacity for p in gpu.pools]
        self.bytes_to_gpu = 0

    def wait_ready(self, layer: int, s: int) -> None:
        """Make the compute stream wait for the copy into GPU slot s (before its views are used)."""
        ev = self._ready[layer][s]
        if ev is not None:
            torch.cuda.current_stream(self.device).wait_event(ev)
            self._ready[layer][s] = None

    def fill(self, layer: int, experts: list[int], slots: list[int], after=None) -> None:
        """Copy experts into GPU slots from the RAM tier (reading them from disk first where missing),
        in chunks the RAM tier can hold at once. after: an event recorded on the compute stream before
        kernels that never read these slots (a decode step's hits): the copies wait for it only, not for
        those kernels."""
        ram_pool = self.ram.tier.pools[layer]
        # kernels already queued on the compute stream may still read the slots being overwritten
        self._wait_compute(after)
        step = ram_pool.capacity
        for i in range(0, len(experts), step):
            chunk, chunk_slots = experts[i : i + step], slots[i : i + step]
            self.ram.acquire(layer, chunk)
            for e, s in zip(chunk, chunk_slots):
                self.copy(layer, e, s)
        ram_pool.in_use = set()

    def copy(self, layer: int, e: int, s: int) -> None:
        """Start the copy of expert e from its RAM slot into GPU slot s on the side stream."""
        ram_pool = self.ram.tier.pools[layer]
        r = ram_pool.where[e]
        ev = torch.cuda.Event()
        with torch.cuda.stream(self.stream):
            self.tier.pools[layer].slots[s].copy_(ram_pool.slots[r], non_blocking=True)
            ev.record(self.stream)
        self._ready[layer][s] = ev
        self.ram.copying_out(layer, r, ev)
        self.tier.pools[layer].put(e, s)
        self.bytes_to_gpu += self.slot_nbytes

    def _wait_compute(self, after=None) -> None:
        if after is not None:
            self.stream.wait_event(after)
        else:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))

    def promote(self, layer: int, experts: list[int], keep: list[int], after=None) -> None:
        """Start copies of experts already in RAM slots into GPU slots, evicting none of `keep` (the
        step's experts); nothing waits for them here (a later lookup's views do). Stops when every
        GPU slot holds an expert to keep."""
        pool = self.tier.pools[layer]
        started = False
        for e in experts:
            s = pool.take(set(keep))
            if s is None:
                return
            if not started:  # queued kernels may still read the slot being overwritten
                self._wait_compute(after)
                started = True
            self.copy(layer, e, s)

    def prefetch(self, layer: int, experts: list[int]) -> tuple[list[int], list[int]]:
        """Start copies of hinted experts already in RAM (caller holds the layer lock); return (those
        copied, those that must come from disk first)."""
        copied, from_disk = [], []
        gpu_pool, ram_pool = self.tier.pools[layer], self.ram.tier.pools[layer]
        keep = gpu_pool.in_use | set(experts)
        started = False
        for e in experts:
            if e in gpu_pool.where:
                continue
            if e not in ram_pool.where:
                from_disk.append(e)
                continue
            s = gpu_pool.take(keep)
            if s is None:
                break
            if not started:
                self.stream.wait_stream(torch.cuda.current_stream(self.device))
                started = True
            self.copy(layer, e, s)
            copied.append(e)
        return copied, from_disk
