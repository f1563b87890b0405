"""Expert providers: hand the MoE layers the routed experts they ask for.

`UncachedExperts` reads every requested expert from the checkpoint each time (the page cache is the
only cache): the simplest correct provider, the reference for the tiered one.

`TieredExperts` keeps experts in fixed slots allocated once: a RAM tier (pinned when a GPU is present;
the compute tier on a CPU-only run) and, on CUDA, a GPU tier in front of it; the checkpoint on disk is
behind both. Slots are per layer, as in mixtral-offloading and llama.cpp's expert cache: every layer runs
once per token, so a global pool would only let prefill of one layer flush the others, and per-layer
pools make the memory of each tier a fixed, plannable number; they also let a prefetch for layer l+1 run
while layer l computes without ever touching a slot layer l uses.

Contract with the caller (the MoE layer): `get` returns a `Lookup` (experts/lookup.py) whose weights stay
valid until the next `get` for that layer. When one call needs more experts than the layer has slots (a
long prefill chunk with few slots), its experts stream through the slots in file order (`Streamed`); a
weight taken from it is then valid until the next lookup in that mapping (dispatch uses each expert's
weights before asking for the next one).

This module decides where experts go (slots, hits and misses, a decode step's late misses, prefetch
accounting); the tiers move the bytes, one way: GPU tier (gpu_tier.py) -> RAM tier (ram_tier.py) ->
checkpoint.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence

import torch

from ..errors import BudgetError
from .formats import Expert
from .gpu_tier import GpuTier
from .lookup import Lookup, OnCpu, Placed, Streamed
from .policy import POLICIES, FreqLRUPolicy, LRUPolicy
from .prefetch import Prefetcher
from .ram_tier import HostBuffers, RamTier
from .slots import SlotTier
from .store import ExpertStore

__all__ = ["POLICIES", "FreqLRUPolicy", "LRUPolicy", "TieredExperts", "UncachedExperts"]


# ---- the reference provider ------------------------------------------------------------------


class UncachedExperts:
    """Reads every requested expert into a fresh buffer each time (the page cache is the only cache)."""

    lookahead = False

    def __init__(self, store: ExpertStore, device: torch.device, dtype: torch.dtype) -> None:
        self.store, self.device, self.dtype = store.for_compute(device, dtype), device, dtype
        self.bytes_read = 0

    def get(self, layer: int, experts: list[int], *, one_token: bool = False) -> Lookup:
        out: dict[int, Expert] = {}
        for e in experts:
            out[e] = self.store.read_expert(layer, e, self.device)
            self.bytes_read += self.store.expert_nbytes
        return Lookup(out)

    def hint(self, layer: int, experts: list[int]) -> None:
        pass

    def static_slots(self, layer: int) -> Lookup | None:
        return None

    def stats(self) -> dict:
        return {"bytes_read": self.bytes_read}


# ---- the tiered provider ---------------------------------------------------------------------


class TieredExperts:
    """ExpertProvider over fixed per-layer slots: GPU tier (CUDA only) -> RAM tier -> checkpoint.

    cpu_slots / gpu_slots are slots per layer (capped at the number of experts). All slot memory is
    allocated here, once; reads and copies reuse it. `hint` starts reads for a layer that is about to
    run; a wrong or cancelled hint only costs bandwidth and cache space, never a different output.
    Prefetch is acted on only in layers whose measured recall is at least `min_recall`.

    `prefetch` (default: on with CUDA only, when the GPU tier cannot hold every expert): on a CPU-only
    run the prefetch thread's reads compete with the compute for the same cores and memory bandwidth; measured slower with a warm page cache and no
    faster when misses hit the disk (docs/offloading.md). `lookahead` tells the model whether to send
    hints at all (MoE computes them from the next layer's router).
    """

    def __init__(
        self,
        store: ExpertStore,
        device: torch.device | str,
        dtype: torch.dtype,
        *,
        cpu_slots: int,
        gpu_slots: int = 0,
        policy: str | Callable[[], LRUPolicy] = "lru",
        prefetch: bool | None = None,
        min_recall: float = 0.5,
        pin: bool | None = None,
        pinned_bytes: int | None = None,
    ) -> None:
        self.device, self.dtype = torch.device(device), dtype
        self.store = store = store.for_compute(self.device, dtype)
        cfg = store.cfg
        self.n_layers, self.n_experts = cfg.num_hidden_layers, cfg.num_experts
        on_gpu = self.device.type == "cuda"
        if prefetch is None:  # and with every expert in a GPU slot there is nothing to fetch ahead
            prefetch = on_gpu and gpu_slots < self.n_experts
        if cpu_slots < 1 or (on_gpu and gpu_slots < 1):
            raise BudgetError(
                f"expert slots per layer must be at least 1 (got cpu {cpu_slots}, gpu {gpu_slots})",
                "raise --cpu-experts / --gpu-experts or the memory budget",
            )
        make_policy = POLICIES[policy] if isinstance(policy, str) else policy
        self._prefetched: list[set[int]] = [set() for _ in range(self.n_layers)]  # hinted in, not yet used
        fmt = store.format
        self.slot_nbytes = fmt.slot_nbytes
        self._host = HostBuffers(on_gpu if pin is None else pin, pinned_bytes)
        self.ram = SlotTier(
            "ram", fmt, self.n_layers, min(cpu_slots, self.n_experts), make_policy, self._host
        )
        self._ram = RamTier(self.ram, store, background=prefetch)
        self.gpu: SlotTier | None = None
        if on_gpu:
            n_gpu = min(gpu_slots, self.n_experts)
            self.gpu = SlotTier("gpu", fmt, self.n_layers, n_gpu, make_policy, self._alloc_gpu)
            self._gpu = GpuTier(self.gpu, self._ram, self.device, self.slot_nbytes)
        self._locks = [threading.Lock() for _ in range(self.n_layers)]
        self.prefetch, self.min_recall = prefetch, min_recall
        self._prefetcher = Prefetcher(self._read_ahead) if prefetch else None
        self._hints: dict[int, set[int]] = {}
        self._recall = [[0, 0] for _ in range(self.n_layers)]  # per layer: [hinted and asked, asked]
        self._static: list[Lookup | None] = [None] * self.n_layers
        # CUDA runs: a decode step's GPU misses are computed by the CPU from their RAM slots (and copied
        # to the GPU in the background for later tokens) instead of waiting for the copy; the engine sets
        # it from rates measured at load (experts/rates.py)
        self.compute_in_place = False
        self.top_k = cfg.num_experts_per_tok
        self.reset_stats()

    @property
    def pinned_bytes(self) -> int:
        """RAM slot bytes page-locked (the rest, past the cap, is pageable)."""
        return self._host.pinned_bytes

    def _alloc_gpu(self, nbytes: int) -> torch.Tensor:
        """One layer's GPU slot buffer (a method so a test can stand a CPU buffer in for it)."""
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    # ---- the provider protocol -----------------------------------------------------------------

    def get(self, layer: int, experts: list[int], *, one_token: bool = False) -> Lookup:
        """one_token: a decode step's lookup (GPU misses may then be computed in place by the CPU)."""
        if self._prefetcher:
            self._prefetcher.cancel(layer)
        need = sorted(set(experts))
        hinted = self._hints.pop(layer, None)
        if hinted is not None:
            self._recall[layer][0] += len(hinted.intersection(need))
            self._recall[layer][1] += len(need)
        with self._locks[layer]:
            if one_token and self._late(layer, need):
                return self._acquire_late(layer, need)
            return self._acquire(self.gpu or self.ram, layer, need)

    def _late(self, layer: int, need: list[int]) -> bool:
        """A decode step on a CUDA run with GPU misses that fit both tiers: hand out the hits now, the
        misses once the hits' compute is queued (Lookup.place_misses)."""
        if self.gpu is None:
            return False
        gpu, ram = self.gpu.pools[layer], self.ram.pools[layer]
        return len(need) <= min(gpu.capacity, ram.capacity) and any(e not in gpu.where for e in need)

    def _acquire_late(self, layer: int, need: list[int]) -> Lookup:
        """The GPU hits now; the misses when the caller has queued the hits' compute and calls
        `place_misses`: their disk reads and copies then overlap that compute. With compute_in_place the
        misses stay in RAM slots for the CPU (and are copied to the GPU in the background for the tokens
        after), else they are copied into GPU slots first."""
        self.gpu.pools[layer].in_use = set(need)  # the misses' GPU slots never evict a hit
        hits, misses = self._look_up(self.gpu, layer, need)
        queued = torch.cuda.Event()  # what the side stream must wait for: everything before the hits
        queued.record(torch.cuda.current_stream(self.device))
        place = functools.partial(self._place_late, layer, misses, need, queued)
        return self._handed_out(
            self.gpu, layer, hits, misses=misses, place=place, misses_on_cpu=self.compute_in_place
        )

    def _place_late(self, layer: int, misses: list[int], need: list[int], queued) -> Placed:
        with self._locks[layer]:
            if self.compute_in_place:
                self._ram.acquire(layer, misses)
                self._gpu.promote(layer, misses, need, after=queued)
                self.experts_on_cpu += len(misses)
                cpu_slot = {e: self.ram.pools[layer].where[e] for e in misses}
                on_cpu = {e: OnCpu(self.ram.experts[layer][s]) for e, s in cpu_slot.items()}
                return Placed(on_cpu, cpu_slot=cpu_slot, cpu_stack=self.ram.stacks[layer])
            gpu_pool = self.gpu.pools[layer]
            slots = [gpu_pool.take(gpu_pool.in_use) for _ in misses]  # in_use: this step's experts
            self._gpu.fill(layer, misses, slots, after=queued)
            placed = self._handed_out(self.gpu, layer, misses)
            return Placed(dict(placed), slot=placed.slot)

    def static_slots(self, layer: int) -> Lookup | None:
        """The layer's experts as a static Lookup when its compute tier holds every expert (nothing can be
        evicted then, so the map is fixed): the expert -> slot map a tensor on the compute device; None
        otherwise. A decode step's lookup through it counts as top-k hits."""
        st = self._static[layer]
        if st is None:
            tier = self.gpu or self.ram
            pool, stack = tier.pools[layer], tier.stacks[layer]
            if stack is None or len(pool.where) < self.n_experts:
                return None
            with self._locks[layer]:
                experts = {e: self._view(tier, layer, s) for e, s in pool.where.items()}
            where = [pool.where[e] for e in range(self.n_experts)]
            identity = where == list(range(self.n_experts))
            slot_of = None if identity else torch.tensor(where, device=self.device)
            st = self._static[layer] = Lookup(experts, stack, pool.where, static=True, slot_of=slot_of)
        (self.gpu or self.ram).hits += self.top_k
        return st

    @property
    def lookahead(self) -> bool:
        """Whether hints are wanted now (the model skips computing them otherwise)."""
        return self.prefetch

    def hint(self, layer: int, experts: list[int]) -> None:
        if not 0 <= layer < self.n_layers:
            return
        want = list(dict.fromkeys(int(e) for e in experts))
        self._hints[layer] = set(want)
        self.prefetch_hinted += len(want)
        if not self._prefetch_pays(layer):
            return
        if self.gpu is not None:
            with self._locks[layer]:
                copied, want = self._gpu.prefetch(layer, want)
                self._prefetched[layer].update(copied)
        if want and self._prefetcher:
            self._prefetcher.submit(layer, want)

    # ---- stats ---------------------------------------------------------------------------------

    def stats(self) -> dict:
        asked = sum(r[1] for r in self._recall)
        ram = self._ram
        out = {
            "ram_slots_per_layer": self.ram.pools[0].capacity,
            "ram_hits": self.ram.hits,
            "ram_misses": self.ram.misses,
            "ram_hit_rate": _rate(self.ram.hits, self.ram.misses),
            "bytes_read": ram.bytes_read + ram.bytes_read_prefetch,
            "experts_read": ram.experts_read + ram.prefetch_read,
            "prefetch_hinted": self.prefetch_hinted,
            "prefetch_read": ram.prefetch_read,
            "prefetch_used": self.prefetch_used,
            "prefetch_recall": round(sum(r[0] for r in self._recall) / asked, 4) if asked else None,
            # preadv runs the page cache served whole / that waited for the disk (RWF_NOWAIT; Linux)
            "read_runs_cached": self.store.runs_cached - self._runs0[0],
            "read_runs_from_disk": self.store.runs_from_disk - self._runs0[1],
        }
        if self.gpu is not None:
            out |= {
                "pinned_bytes": self.pinned_bytes,
                "gpu_slots_per_layer": self.gpu.pools[0].capacity,
                "gpu_hits": self.gpu.hits,
                "gpu_misses": self.gpu.misses,
                "gpu_hit_rate": _rate(self.gpu.hits, self.gpu.misses),
                "bytes_to_gpu": self._gpu.bytes_to_gpu,
                "experts_on_cpu": self.experts_on_cpu,
            }
        return out

    def reset_stats(self) -> None:
        for tier in (self.ram, self.gpu):
            if tier is not None:
                tier.hits = tier.misses = 0
        if self.gpu is not None:
            self._gpu.bytes_to_gpu = 0
        self._ram.reset_stats()
        self.prefetch_used = self.prefetch_hinted = 0
        self.experts_on_cpu = 0  # decode-step experts the CPU computed in place (compute_in_place)
        self._recall = [[0, 0] for _ in range(self.n_layers)]
        self._runs0 = (self.store.runs_cached, self.store.runs_from_disk)  # the store is shared: a baseline

    # ---- housekeeping --------------------------------------------------------------------------

    def preload(
        self, layers: Sequence[int] | None = None, on_progress: Callable[[int, int], None] | None = None
    ) -> None:
        """Fill the free slots of each layer with experts 0, 1, ... in file order: the GPU tier's when
        there is one (through the RAM tier, in chunks it can hold), else the RAM tier's (one grouped read
        per layer). on_progress(done_bytes, total_bytes)."""
        layers = list(layers if layers is not None else range(self.n_layers))
        tier = self.gpu or self.ram
        total = sum(len(tier.pools[i].free) for i in layers) * self.slot_nbytes
        done = 0
        for layer in layers:
            with self._locks[layer]:
                pool = tier.pools[layer]
                todo = [e for e in range(self.n_experts) if e not in pool.where][: len(pool.free)]
                self._fill(tier, layer, todo, [pool.free.pop() for _ in todo])
            done += len(todo) * self.slot_nbytes
            if on_progress:
                on_progress(done, total)

    def get_ram(self, layer: int, experts: list[int]) -> None:
        """Put experts (at most the layer's RAM slots) in the RAM tier's slots of `layer`, reading them
        from disk where missing."""
        with self._locks[layer]:
            self._ram.acquire(layer, experts)

    def release_ram(self, nbytes: int) -> int:
        """Give about `nbytes` of the RAM tier's slots back to the OS for a while (the last slots of every
        layer; one stays): an image's decoding takes the room (multimodal.room_for_images). Their experts
        are read again when next wanted. Returns the bytes given back (0: cannot); regrow_ram() ends it."""
        n = -(-nbytes // (self.ram.stride * self.n_layers))
        for lock in self._locks:
            lock.acquire()
        try:
            self._static = [None] * self.n_layers  # a layer may no longer hold every expert
            released = self.ram.release(n)
            for layer, pool in enumerate(self.ram.pools if self.gpu is None else ()):
                self._prefetched[layer] &= pool.where.keys()  # hinted into RAM slots now released
            return released
        finally:
            for lock in self._locks:
                lock.release()

    def regrow_ram(self) -> None:
        """The slots release_ram gave back, in use again (empty)."""
        for lock in self._locks:
            lock.acquire()
        try:
            self.ram.regrow()
        finally:
            for lock in self._locks:
                lock.release()

    def wait_prefetch(self) -> None:
        """Block until the prefetch thread is idle (tests, benchmarks)."""
        if self._prefetcher:
            self._prefetcher.wait_idle()

    def resident(self, layer: int, tier: str = "ram") -> list[int]:
        """Experts held by one layer's tier, least recently used first."""
        t = self.ram if tier == "ram" else self.gpu
        return t.pools[layer].policy.order() if t is not None else []

    def close(self) -> None:
        if self._prefetcher:
            self._prefetcher.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    # ---- acquiring a layer's experts (the caller holds the layer lock) ---------------------------

    def _acquire(self, tier: SlotTier, layer: int, need: list[int]) -> Lookup:
        """All of `need` in the compute tier's slots of `layer`."""
        pool = tier.pools[layer]
        pool.in_use = set(need)
        if len(need) > pool.capacity:
            return Lookup(Streamed(need, functools.partial(self._stream_one, tier, layer)))
        _, misses = self._look_up(tier, layer, need)
        slots = [pool.take(pool.in_use) for _ in misses]  # never None: capacity >= len(need)
        self._fill(tier, layer, misses, slots)
        return self._handed_out(tier, layer, need)

    def _look_up(self, tier: SlotTier, layer: int, need: list[int]) -> tuple[list[int], list[int]]:
        """(hits, misses) of `need` in the compute tier's pool of `layer`: counted, the hits touched."""
        hits, misses = tier.look_up(layer, need)
        self._count_used(layer, hits)
        return hits, misses

    def _handed_out(self, tier: SlotTier, layer: int, experts: list[int], **late) -> Lookup:
        """Experts resident in the tier's slots of `layer` as callables, with the layer's stack (late: a
        decode step's misses and how to place them)."""
        where = {e: tier.pools[layer].where[e] for e in experts}
        views = {e: self._view(tier, layer, s) for e, s in where.items()}
        return Lookup(views, tier.stacks[layer], where, **late)

    def _stream_one(self, tier: SlotTier, layer: int, e: int, call: Streamed) -> Expert:
        """One lookup of an over-capacity call: read e plus the call's next missing experts into the
        slots that hold nothing the call still needs (ascending order assumed; any order stays correct)."""
        with self._locks[layer]:
            pool = tier.pools[layer]
            if e in pool.where:
                if e not in call.loaded_here:
                    tier.count(1, 0)
                    self._count_used(layer, [e])
                pool.policy.touch(e)
                return self._view(tier, layer, pool.where[e])
            later = call.need[call.pos[e] + 1 :]
            keep = set(later) | {e}
            s = pool.take(keep)
            if s is None:  # every slot holds an expert still to come: drop the one needed last
                s = pool.evict(max((x for x in pool.where if x in keep), key=call.pos.__getitem__))
            batch, slots = [e], [s]
            for x in later:
                if x in pool.where:
                    continue
                s = pool.take(keep)
                if s is None:
                    break
                batch.append(x)
                slots.append(s)
            tier.count(0, len(batch))
            call.loaded_here.update(batch[1:])
            call.loaded_here.discard(e)
            self._fill(tier, layer, batch, slots)
            return self._view(tier, layer, pool.where[e])

    def _count_used(self, layer: int, hits: list[int]) -> None:
        """Prefetch usefulness, judged at the compute tier: hits that a hint brought in."""
        used = self._prefetched[layer].intersection(hits)
        self.prefetch_used += len(used)
        self._prefetched[layer] -= used

    def _view(self, tier: SlotTier, layer: int, s: int) -> Expert:
        if tier is self.gpu:
            self._gpu.wait_ready(layer, s)  # the copy into this slot ran on the side stream
        return tier.experts[layer][s]

    def _fill(self, tier: SlotTier, layer: int, experts: list[int], slots: list[int]) -> None:
        if experts:
            (self._gpu.fill if tier is self.gpu else self._ram.fill)(layer, experts, slots)

    # ---- prefetch ------------------------------------------------------------------------------

    def _prefetch_pays(self, layer: int) -> bool:
        """Act on hints in this layer until enough of them were checked, then only at good recall."""
        if not self.lookahead:
            return False
        hit, asked = self._recall[layer]
        return asked < 64 or hit >= self.min_recall * asked

    def _read_ahead(self, layer: int, experts: list[int], cancel: threading.Event) -> None:
        """The prefetch thread's job: read hinted experts into free or evictable RAM slots, one per lock
        hold."""
        hinted = set(experts)
        for e in experts:
            if cancel.is_set():
                return
            with self._locks[layer]:
                pool = self.ram.pools[layer]
                if cancel.is_set():
                    return
                if e in pool.where:
                    continue
                s = pool.take(pool.in_use | hinted)
                if s is None:
                    return
                self._ram.fill(layer, [e], [s], background=True)
                if self.gpu is None:
                    self._prefetched[layer].add(e)


def _rate(hits: int, misses: int) -> float | None:
    return round(hits / (hits + misses), 4) if hits + misses else None
