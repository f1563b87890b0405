"""Expert store reads into slots, and the tiered cache (experts/cache.py and its tiers): LRU order,
counters, slot reuse, prefetch safety, the lookups it hands out, the GPU tier's bookkeeping and a decode
step's split between GPU and CPU on stand-in CUDA streams."""

from __future__ import annotations

import gc
import random
import weakref

import pytest
import torch
from conftest import greedy
from safetensors.torch import save_file

from qwen35_lite.convert.synthetic import SyntheticSpec, write_checkpoint
from qwen35_lite.errors import BudgetError
from qwen35_lite.experts.cache import FreqLRUPolicy, LRUPolicy, TieredExperts, UncachedExperts
from qwen35_lite.experts.formats import Fp8BlockFormat, dequantize_block, e4m3_to_float, expert_format, ffn
from qwen35_lite.experts.lookup import Lookup, OnCpu, Placed
from qwen35_lite.experts.store import ExpertStore, evict_page_cache
from qwen35_lite.model.qwen35 import Qwen35Model
from qwen35_lite.weights.checkpoint import Checkpoint, read_range
from qwen35_lite.weights.config import TextConfig, load_config
from qwen35_lite.weights.fp8 import dequantize_fp8

SPEC = SyntheticSpec(num_hidden_layers=4, num_experts=12, num_experts_per_tok=3, vocab_size=4096)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def ckpts(module_tmp):
    """{(fused, dtype name): path}: both layouts, bf16 and fp32, several shards."""
    root = module_tmp("cache")
    out = {}
    for fused in (True, False):
        for dtype in (torch.bfloat16, torch.float32):
            name = f"{'fused' if fused else 'per-expert'}-{str(dtype)[6:]}"
            out[(fused, dtype)] = write_checkpoint(
                root / name, SPEC, dtype=dtype, fused=fused, shard_bytes=1 << 20
            )
    return out


def _store(path, dtype: torch.dtype | None = None) -> ExpertStore:
    """The store of a checkpoint, its slots in `dtype` (None: as stored)."""
    ckpt, cfg = Checkpoint(path), load_config(path)
    fmt = expert_format(cfg.raw, cfg.text.hidden_size, cfg.text.moe_intermediate_size, CPU, dtype, ckpt)
    return ExpertStore(ckpt, cfg.text, fmt)


def _tiered(path, dtype=torch.bfloat16, **kw) -> TieredExperts:
    return TieredExperts(_store(path, dtype), CPU, dtype, **kw)


def _dense(expert) -> tuple[torch.Tensor, torch.Tensor]:
    return expert.gate_up, expert.down


# ---- the store ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("compute", [torch.bfloat16, torch.float32])
def test_read_into_and_read_many_equal_read(ckpts, fused, stored, compute):
    store = _store(ckpts[(fused, stored)], compute)
    assert store.format.fused == fused and store.format.direct == (stored == compute)
    nb = store.slot_nbytes
    assert nb == 3 * SPEC.hidden_size * SPEC.moe_intermediate_size * compute.itemsize
    slot = torch.empty(nb, dtype=torch.uint8)
    for layer, e in [(0, 0), (1, 5), (3, 11)]:
        store.read_many(layer, [e], [slot])
        gate_up, down = _dense(store.format.bind(slot))
        ref_gu, ref_down = store.read(layer, e, compute)
        assert gate_up.data_ptr() == slot.data_ptr()  # a view into the slot, not a copy
        assert torch.equal(gate_up, ref_gu) and torch.equal(down, ref_down)
    experts = [7, 2, 3, 4, 10]  # 2, 3, 4 are neighbours in a fused tensor: one preadv
    slots = [torch.empty(nb, dtype=torch.uint8) for _ in experts]
    store.read_many(2, experts, slots)
    for e, slot in zip(experts, slots):
        ref = store.read(2, e, compute)
        got = _dense(store.format.bind(slot))
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_both_layouts_hold_the_same_experts(ckpts):
    a, b = _store(ckpts[(True, torch.bfloat16)]), _store(ckpts[(False, torch.bfloat16)])
    sa, sb = (torch.empty(a.slot_nbytes, dtype=torch.uint8) for _ in range(2))
    for layer in range(SPEC.num_hidden_layers):
        for e in (0, 6, 11):
            a.read_many(layer, [e], [sa])
            b.read_many(layer, [e], [sb])
            assert torch.equal(sa, sb)


def test_fp8_slots_hold_the_raw_bytes_and_compute_like_read(tmp_path):
    """Block-FP8 experts with scales (sizes not multiples of the 128 block): the slots hold the FP8 bytes
    and scales as stored (no dequantisation on the read path); the expert computes what the dequantised
    weights compute."""
    D, I, E = 200, 160, 3
    cfg = TextConfig(hidden_size=D, moe_intermediate_size=I, num_experts=E, num_hidden_layers=1)
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for e in range(E):
        for k, shape in (("gate", (I, D)), ("up", (I, D)), ("down", (D, I))):
            name = f"model.layers.0.mlp.experts.{e}.{k}_proj.weight"
            tensors[name] = torch.randn(shape, generator=g).to(torch.float8_e4m3fn)
            rows, cols = -(-shape[0] // 128), -(-shape[1] // 128)
            tensors[name + "_scale_inv"] = torch.rand(rows, cols, generator=g) + 0.5
    save_file(tensors, str(tmp_path / "model.safetensors"))
    ckpt = Checkpoint(tmp_path)
    x = torch.randn(5, D, generator=g)
    for compute in (torch.float32, torch.bfloat16):
        for device in ("cuda", "cpu"):  # CUDA: FP8 bytes in the slots; CPU: dequantised on entry
            fmt = expert_format({}, D, I, device, compute, ckpt)
            store = ExpertStore(ckpt, cfg, fmt)
            assert isinstance(fmt, Fp8BlockFormat) and fmt.direct == (device == "cuda")
            if fmt.direct:
                assert store.slot_nbytes < 3 * D * I + 4096  # one byte a weight, plus the block scales
            slots = [torch.empty(store.slot_nbytes, dtype=torch.uint8) for _ in range(E)]
            store.read_many(0, list(range(E)), slots)
            for e, slot in enumerate(slots):
                if fmt.direct:  # the raw bytes, as stored: no dequantisation on the read path
                    for part, info in zip(fmt.raw, store.parts[(0, e)]):
                        assert torch.equal(
                            part.view(slot).view(torch.uint8), read_range(info).view(torch.uint8)
                        )
                ref = store.read(0, e, compute)
                xc = x.to(compute)
                assert torch.equal(fmt.bind(slot)(xc), ffn(xc, *ref))
                w = dequantize_fp8(
                    tensors[f"model.layers.0.mlp.experts.{e}.down_proj.weight"],
                    tensors[f"model.layers.0.mlp.experts.{e}.down_proj.weight_scale_inv"],
                )
                assert torch.equal(ref[1], w.to(compute))


def test_fast_e4m3_conversion_is_exact_for_every_code():
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn)
    got, want = e4m3_to_float(codes), codes.float()
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got[~want.isnan()], want[~want.isnan()])
    w = torch.randn(256, 384).to(torch.float8_e4m3fn)
    s = torch.rand(2, 3) * 1e3  # scales past 2^8: no overflow in the bit trick
    assert torch.equal(dequantize_block(w, s), dequantize_fp8(w, s))


def test_evict_page_cache_runs_on_the_expert_files(ckpts):
    store = _store(ckpts[(True, torch.bfloat16)])
    assert evict_page_cache(store.files()) == len(store.files()) >= 1


# ---- the cache ---------------------------------------------------------------------------------


def test_lru_order_and_counters(ckpts):
    cache = _tiered(ckpts[(True, torch.bfloat16)], cpu_slots=3, prefetch=False)
    nb = cache.store.expert_nbytes
    for e in (1, 2, 3):
        cache.get(0, [e])
    assert cache.resident(0) == [1, 2, 3]
    cache.get(0, [1])  # a hit moves 1 to the most recent end
    assert cache.resident(0) == [2, 3, 1]
    cache.get(0, [4])  # evicts the least recently used: 2
    assert cache.resident(0) == [3, 1, 4]
    cache.get(0, [3, 5])  # 3 hits; 5 evicts 1 (4 is newer)
    assert cache.resident(0) == [4, 3, 5]
    assert cache.resident(1) == []  # per-layer pools
    s = cache.stats()
    assert (s["ram_hits"], s["ram_misses"]) == (2, 5)
    assert s["bytes_read"] == 5 * nb and s["experts_read"] == 5
    assert s["ram_hit_rate"] == pytest.approx(2 / 7, abs=1e-4)
    cache.reset_stats()
    assert cache.stats()["ram_hits"] == 0 and cache.resident(0) == [4, 3, 5]


def test_cached_experts_equal_the_store(ckpts):
    path = ckpts[(False, torch.float32)]
    cache, store = _tiered(path, torch.float32, cpu_slots=4, prefetch=False), _store(path)
    rng = random.Random(0)
    for _ in range(30):
        layer = rng.randrange(SPEC.num_hidden_layers)
        experts = rng.sample(range(SPEC.num_experts), rng.randint(1, 4))
        got = cache.get(layer, experts)
        for e in experts:
            ref = store.read(layer, e, torch.float32)
            assert torch.equal(got[e].gate_up, ref[0]) and torch.equal(got[e].down, ref[1])


def test_more_experts_than_slots_stream_through_the_slots(ckpts):
    """A prefill-sized request over a 2-slot layer: every expert correct when looked up, in any order."""
    path = ckpts[(True, torch.bfloat16)]
    cache, store = _tiered(path, cpu_slots=2, prefetch=False), _store(path)
    cache.get(1, [0, 9])  # residents that are also asked for below
    want = list(range(SPEC.num_experts))
    got = cache.get(1, want)
    assert len(got) == len(want) and 5 in got and 99 not in got
    for e in want + [11, 3, 0]:  # ascending, then out of order (a re-read, still correct)
        ref = store.read(1, e, torch.bfloat16)
        assert torch.equal(got[e].gate_up, ref[0]) and torch.equal(got[e].down, ref[1])
    s = cache.stats()
    assert s["ram_hits"] + s["ram_misses"] >= len(want)
    assert len(cache.resident(1)) == 2


def test_slots_are_reused_without_new_allocations(ckpts):
    cache = _tiered(ckpts[(True, torch.bfloat16)], cpu_slots=3, prefetch=True)
    buffers = [b.data_ptr() for b in cache.ram.buffers]
    slot_ptrs = {s.data_ptr() for pool in cache.ram.pools for s in pool.slots}
    rng = random.Random(1)
    seen = set()
    for step in range(200):
        layer = step % SPEC.num_hidden_layers
        cache.hint((layer + 1) % SPEC.num_hidden_layers, rng.sample(range(SPEC.num_experts), 2))
        n = rng.choice([1, 2, 3, 5])  # 5 > 3 slots: the streaming path
        got = cache.get(layer, rng.sample(range(SPEC.num_experts), n))
        for e in got:
            gate_up, down = _dense(got[e])
            seen.add(gate_up.data_ptr())
            assert down.data_ptr() == gate_up.data_ptr() + gate_up.numel() * gate_up.element_size()
    cache.wait_prefetch()
    assert seen <= slot_ptrs and len(seen) > len(slot_ptrs) // 2
    assert [b.data_ptr() for b in cache.ram.buffers] == buffers
    assert {s.data_ptr() for pool in cache.ram.pools for s in pool.slots} == slot_ptrs
    cache.close()


def test_slot_counts_are_validated(ckpts):
    with pytest.raises(BudgetError):
        _tiered(ckpts[(True, torch.bfloat16)], cpu_slots=0)
    cache = _tiered(ckpts[(True, torch.bfloat16)], cpu_slots=1000, prefetch=False)
    assert cache.stats()["ram_slots_per_layer"] == SPEC.num_experts  # capped: every expert fits


def test_preload_makes_every_lookup_a_hit(ckpts):
    cache = _tiered(ckpts[(True, torch.bfloat16)], cpu_slots=SPEC.num_experts, prefetch=False)
    cache.preload()
    assert cache.stats()["experts_read"] == SPEC.num_experts * SPEC.num_hidden_layers
    cache.reset_stats()
    cache.get(2, [0, 5, 11])
    assert cache.stats()["ram_misses"] == 0 and cache.stats()["ram_hits"] == 3


def test_prefetch_reads_ahead_and_counts_use(ckpts):
    cache = _tiered(ckpts[(True, torch.bfloat16)], cpu_slots=4, prefetch=True)
    cache.hint(1, [3, 7])
    cache.wait_prefetch()
    assert set(cache.resident(1)) == {3, 7}
    cache.get(1, [3, 8])
    s = cache.stats()
    assert s["prefetch_read"] == 2 and s["prefetch_used"] == 1 and s["prefetch_recall"] == 0.5
    assert (s["ram_hits"], s["ram_misses"]) == (1, 1)
    cache.close()


def test_prefetch_never_evicts_the_experts_in_use(ckpts):
    cache = _tiered(ckpts[(True, torch.bfloat16)], cpu_slots=3, prefetch=True)
    cache.get(0, [1, 2, 3])
    cache.hint(0, [4, 5])  # no slot is free and every resident is in use: nothing is read
    cache.wait_prefetch()
    assert set(cache.resident(0)) == {1, 2, 3} and cache.stats()["prefetch_read"] == 0
    cache.close()


def test_a_dropped_cache_is_freed_while_its_prefetch_thread_runs(ckpts):
    """The prefetch thread holds its job (the cache's) weakly: dropping the cache frees it."""
    cache = _tiered(ckpts[(True, torch.bfloat16)], cpu_slots=4, prefetch=True)
    cache.hint(1, [3, 7])
    cache.wait_prefetch()
    assert cache.stats()["prefetch_read"] == 2  # the thread ran the job
    ref = weakref.ref(cache)
    del cache
    gc.collect()
    assert ref() is None


def test_a_lookup_places_its_misses_once():
    calls = []

    def place() -> Placed:
        calls.append(1)
        return Placed({9: "nine"}, slot={9: 0})

    with pytest.raises(ValueError):
        Lookup({1: "one"}, misses=[9])  # misses without a way to place them
    got = Lookup({1: "one"}, None, {1: 3}, misses=[9], place=place)
    assert 9 not in got and got.misses == [9]
    assert got.place_misses().slot == {9: 0} and got.place_misses().experts == {}
    assert calls == [1] and got[9] == "nine" and got.slot == {1: 3, 9: 0} and not got.misses


# ---- end to end: outputs never depend on the cache or the prefetch -----------------------------


class _WrongHints(TieredExperts):
    """Hints the next layer with random experts before each get, and sometimes the layer itself
    right before its own get (a cancelled prefetch)."""

    def __init__(self, *a, seed: int = 0, **kw) -> None:
        super().__init__(*a, **kw)
        self.rng = random.Random(seed)

    def get(self, layer, experts, **kw):
        E = self.n_experts
        self.hint(layer + 1, self.rng.sample(range(E), 3))
        if self.rng.random() < 0.5:
            self.hint(layer, self.rng.sample(range(E), 3))
        return super().get(layer, experts, **kw)


class _RightHints(TieredExperts):
    """Hints each next layer with the experts a previous identical run used there (perfect recall)."""

    def __init__(self, *a, trace: list, **kw) -> None:
        super().__init__(*a, **kw)
        self.trace, self.i = trace, 0

    def get(self, layer, experts, **kw):
        if self.i + 1 < len(self.trace):
            self.hint(*self.trace[self.i + 1])
        self.i += 1
        return super().get(layer, experts, **kw)


class _Recorder(UncachedExperts):
    def __init__(self, *a) -> None:
        super().__init__(*a)
        self.trace = []

    def get(self, layer, experts, **kw):
        self.trace.append((layer, list(experts)))
        return super().get(layer, experts, **kw)


def _greedy(path, provider, n_prompt=70, n_new=8):
    cfg = load_config(path).text
    model = Qwen35Model.load(Checkpoint(path), cfg, provider, CPU, torch.bfloat16)
    ids = torch.randint(0, SPEC.vocab_size, (n_prompt,), generator=torch.Generator().manual_seed(3))
    return greedy(model, ids, n_new)


@pytest.mark.slow
def test_wrong_cancelled_and_right_prefetch_never_change_the_output(ckpts):
    path = ckpts[(True, torch.bfloat16)]
    store = _store(path)
    ref = _Recorder(store, CPU, torch.bfloat16)
    want_tokens, want_logits = _greedy(path, ref)
    runs = {
        "lru 2 slots, wrong hints": _WrongHints(store, CPU, torch.bfloat16, cpu_slots=2, prefetch=True),
        "lfu-lru 5 slots, wrong hints": _WrongHints(
            store, CPU, torch.bfloat16, cpu_slots=5, policy="lfu-lru", prefetch=True, seed=1
        ),
        "lru 6 slots, right hints": _RightHints(
            store, CPU, torch.bfloat16, cpu_slots=6, prefetch=True, trace=ref.trace
        ),
    }
    for name, provider in runs.items():
        tokens, logits = _greedy(path, provider)
        assert tokens == want_tokens, name
        assert torch.equal(logits, want_logits), name
        provider.close()
    s = runs["lru 6 slots, right hints"].stats()
    assert s["prefetch_recall"] == 1.0 and s["prefetch_used"] > 0
    assert runs["lru 2 slots, wrong hints"].stats()["prefetch_recall"] < 0.8


def test_freq_lru_keeps_the_popular_expert():
    lru, hybrid = LRUPolicy(), FreqLRUPolicy(window=3)
    for p in (lru, hybrid):
        for e in (0, 0, 0, 1, 2, 3):
            p.touch(e)
    assert lru.victim(keep=()) == 0  # least recent
    assert hybrid.victim(keep=()) == 1  # 0 is older but used three times
    assert hybrid.victim(keep={1}) == 2


# ---- the GPU tier ------------------------------------------------------------------------------


class _FakeStream:
    def wait_stream(self, other) -> None:
        pass

    def wait_event(self, ev) -> None:
        ev.waited += 1


class _FakeEvent:
    def __init__(self) -> None:
        self.recorded = self.waited = self.synced = 0

    def record(self, stream=None) -> None:
        self.recorded += 1

    def synchronize(self) -> None:
        self.synced += 1


class _CpuStandInGpu(TieredExperts):
    """The GPU tier's bookkeeping (slots, chunking through the RAM tier, events) run on CPU buffers."""

    def _alloc_gpu(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)


@pytest.fixture
def fake_cuda(monkeypatch):
    import contextlib

    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: _FakeStream())
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _FakeStream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())


@pytest.mark.parametrize("gpu_slots,cpu_slots", [(2, 3), (4, 2), (1, 1)])
def test_gpu_tier_logic_gives_the_store_experts(ckpts, fake_cuda, gpu_slots, cpu_slots):
    path = ckpts[(True, torch.bfloat16)]
    store = _store(path)
    cache = _CpuStandInGpu(
        store, torch.device("cuda"), torch.bfloat16, cpu_slots=cpu_slots, gpu_slots=gpu_slots, pin=False
    )
    gpu_ptrs = {s.data_ptr() for pool in cache.gpu.pools for s in pool.slots}
    rng = random.Random(2)
    for step in range(60):
        layer = rng.randrange(SPEC.num_hidden_layers)
        if step % 3 == 0:
            cache.hint(layer, rng.sample(range(SPEC.num_experts), 2))  # copies on the "side stream"
        experts = rng.sample(range(SPEC.num_experts), rng.randint(1, 5))
        got = cache.get(layer, experts)
        for e in experts:
            ref = store.read(layer, e, torch.bfloat16)
            assert got[e].gate_up.data_ptr() in gpu_ptrs  # handed out from GPU slots only
            assert torch.equal(got[e].gate_up, ref[0]) and torch.equal(got[e].down, ref[1])
    s = cache.stats()
    assert s["gpu_slots_per_layer"] == gpu_slots and s["gpu_misses"] > 0 and s["gpu_hits"] > 0
    assert s["bytes_to_gpu"] >= s["gpu_misses"] * store.slot_nbytes
    assert s["ram_hits"] + s["ram_misses"] > 0


def test_preload_fills_the_gpu_tier_through_a_small_ram_tier(ckpts, fake_cuda):
    path = ckpts[(True, torch.bfloat16)]
    store = _store(path)
    E = SPEC.num_experts
    cache = _CpuStandInGpu(store, torch.device("cuda"), torch.bfloat16, cpu_slots=2, gpu_slots=E, pin=False)
    seen = []
    cache.preload(on_progress=lambda done, total: seen.append((done, total)))
    assert seen[-1][0] == seen[-1][1] == SPEC.num_hidden_layers * E * store.slot_nbytes
    cache.reset_stats()
    for layer in range(SPEC.num_hidden_layers):
        got = cache.get(layer, list(range(E)))
        ref = store.read(layer, E - 1, torch.bfloat16)
        assert torch.equal(got[E - 1].gate_up, ref[0]) and torch.equal(got[E - 1].down, ref[1])
    s = cache.stats()
    assert s["gpu_misses"] == 0 and s["gpu_hits"] == SPEC.num_hidden_layers * E and s["bytes_read"] == 0


# ---- a decode step's lookup on a CUDA run: hits now, misses placed after (stand-in CUDA) ---------

SPLIT_SPEC = SyntheticSpec(num_hidden_layers=4, num_experts=16, num_experts_per_tok=4, vocab_size=4096)


@pytest.fixture(scope="module")
def split_ckpt(module_tmp):
    return write_checkpoint(module_tmp("split") / "ck", SPLIT_SPEC, dtype=torch.float32)


def _standin(path, in_place: bool, gpu_slots: int = 5, cpu_slots: int = 12) -> _CpuStandInGpu:
    ck, cfg = Checkpoint(path), load_config(path)
    fmt = expert_format(cfg.raw, cfg.text.hidden_size, cfg.text.moe_intermediate_size, CPU, None, ck)
    p = _CpuStandInGpu(
        ExpertStore(ck, cfg.text, fmt),
        torch.device("cuda"),
        torch.float32,
        cpu_slots=cpu_slots,
        gpu_slots=gpu_slots,
        pin=False,
        prefetch=False,
    )
    p.device = CPU  # tensors the provider makes (slot maps) go where the stand-in "GPU" buffers are
    p.compute_in_place = in_place
    return p


def test_a_decode_lookup_splits_hits_and_misses_and_promotes_the_misses(split_ckpt, fake_cuda):
    p = _standin(split_ckpt, in_place=True)
    store = p.store
    p.get(0, [0, 1, 2, 3])  # a prefill-like lookup: copied to the GPU as usual
    assert sorted(p.gpu.pools[0].where) == [0, 1, 2, 3] and p.experts_on_cpu == 0
    got = p.get(0, [2, 3, 7, 9], one_token=True)
    assert isinstance(got, Lookup) and got.misses == [7, 9] and set(got.slot) == {2, 3} and not got.cpu_slot
    got.place_misses()  # after the hits' compute is queued: the misses are read into RAM for the CPU
    assert not got.misses and set(got.cpu_slot) == {7, 9} and set(got.slot) == {2, 3}
    assert isinstance(got[7], OnCpu) and p.experts_on_cpu == 2
    for e in (2, 3, 7, 9):
        gate_up, down = store.read(0, e, torch.float32)
        x = torch.randn(1, SPLIT_SPEC.hidden_size)
        torch.testing.assert_close(got[e](x), ffn(x, gate_up, down))
    ram = p.ram.pools[0]
    for e, s in got.cpu_slot.items():
        assert ram.where[e] == s
    # promoted in the background for the next tokens, none of the step's own experts evicted
    assert {2, 3, 7}.issubset(p.gpu.pools[0].where) or {2, 3, 9}.issubset(p.gpu.pools[0].where)
    s = p.stats()
    assert s["gpu_misses"] == 4 + 2 and s["experts_on_cpu"] == 2


def test_copy_mode_places_the_misses_in_gpu_slots_after_the_hits(split_ckpt, fake_cuda):
    p = _standin(split_ckpt, in_place=False)
    p.get(0, [0, 1, 2, 3])
    got = p.get(0, [0, 1, 8, 9], one_token=True)
    assert got.misses == [8, 9] and set(got.slot) == {0, 1}
    got.place_misses()
    assert set(got.slot) == {0, 1, 8, 9} and not got.cpu_slot and p.experts_on_cpu == 0
    gpu = p.gpu.pools[0]
    assert all(gpu.where[e] == got.slot[e] for e in got.slot)  # the hits kept their slots
    gate_up, _ = p.store.read(0, 9, torch.float32)
    assert torch.equal(got[9].gate_up, gate_up)


def test_prefill_lookups_never_split(split_ckpt, fake_cuda):
    p = _standin(split_ckpt, in_place=True)
    got = p.get(1, [4, 5, 6])
    assert not got.cpu_slot and p.experts_on_cpu == 0


def test_pinned_host_memory_stays_under_its_cap(split_ckpt, fake_cuda):
    """Slots past the cap are pageable (copies from them are staged by the driver): with a cap of 0
    nothing is page-locked, and the tiers work as before."""
    ck, cfg = Checkpoint(split_ckpt), load_config(split_ckpt)
    fmt = expert_format(cfg.raw, cfg.text.hidden_size, cfg.text.moe_intermediate_size, CPU, None, ck)
    p = _CpuStandInGpu(
        ExpertStore(ck, cfg.text, fmt), torch.device("cuda"), torch.float32, cpu_slots=4, gpu_slots=2,
        pin=True, pinned_bytes=0, prefetch=False,
    )  # fmt: skip
    assert p.pinned_bytes == 0 and not any(b.is_pinned() for b in p.ram.buffers)
    got = p.get(0, [1, 2])
    gate_up, _ = p.store.read(0, 2, torch.float32)
    assert torch.equal(got[2].gate_up, gate_up) and p.stats()["pinned_bytes"] == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_tier_decodes_like_the_reference(ckpts):
    path = ckpts[(True, torch.bfloat16)]
    store, cuda = _store(path), torch.device("cuda")
    cfg = load_config(path).text

    def tokens(provider):
        model = Qwen35Model.load(Checkpoint(path), cfg, provider, cuda, torch.bfloat16)
        cache = model.make_cache()
        logits = model.forward(cache, torch.arange(50) * 7)
        out = []
        for _ in range(6):
            out.append(int(logits[-1].argmax()))
            logits = model.forward(cache, torch.tensor(out[-1:]))
        return out

    want = tokens(UncachedExperts(store, cuda, torch.bfloat16))
    cache = TieredExperts(store, cuda, torch.bfloat16, cpu_slots=3, gpu_slots=2)
    assert tokens(cache) == want
    assert cache.stats()["bytes_to_gpu"] > 0
