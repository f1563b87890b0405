"""Lookahead prefetch from the model (MoE hints the next layer), its recall counter, and the store's
page-cache accounting: a wrong, late or cancelled prefetch never changes an output."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import greedy

from qwen35_lite.convert.synthetic import SyntheticSpec, write_checkpoint
from qwen35_lite.experts.cache import TieredExperts, UncachedExperts
from qwen35_lite.experts.store import ExpertStore, evict_page_cache
from qwen35_lite.model.moe import MoE
from qwen35_lite.model.qwen35 import Qwen35Model
from qwen35_lite.weights.checkpoint import Checkpoint
from qwen35_lite.weights.config import load_config

SPEC = SyntheticSpec(num_hidden_layers=4, num_experts=16, num_experts_per_tok=4, vocab_size=4096)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def path(module_tmp):
    return write_checkpoint(module_tmp("prefetch") / "ckpt", SPEC, dtype=torch.bfloat16)


class _Counting(UncachedExperts):
    """Reference provider; records hints (it has no `lookahead`, so the model must send none)."""

    def __init__(self, *a) -> None:
        super().__init__(*a)
        self.hints: list = []

    def hint(self, layer, experts) -> None:
        self.hints.append((layer, experts))


def _greedy(path, provider, wrong_gates: bool = False, n_new: int = 10):
    cfg = load_config(path).text
    model = Qwen35Model.load(Checkpoint(path), cfg, provider, CPU, torch.bfloat16)
    if wrong_gates:  # hints from a router that has nothing to do with the next layer's
        g = torch.Generator().manual_seed(5)
        for layer in model.layers:
            if layer.mlp.next_gate is not None:
                layer.mlp.next_gate = torch.randn(layer.mlp.next_gate.shape, generator=g).to(torch.bfloat16)
    ids = torch.randint(0, SPEC.vocab_size, (40,), generator=torch.Generator().manual_seed(1))
    return greedy(model, ids, n_new)


def test_model_wires_the_next_router_into_each_moe(path):
    cfg = load_config(path).text
    model = Qwen35Model.load(Checkpoint(path), cfg, None, CPU, torch.bfloat16)
    moes = [layer.mlp for layer in model.layers]
    assert all(isinstance(m, MoE) for m in moes)
    for m, nxt in zip(moes, moes[1:]):
        assert m.next_gate is nxt.w["gate"]
    assert moes[-1].next_gate is None


@pytest.mark.slow
@pytest.mark.parametrize("slots", [1, 3, 8])
@pytest.mark.parametrize("wrong", [False, True])
def test_lookahead_never_changes_the_output_and_counts_recall(path, slots, wrong):
    store = ExpertStore(Checkpoint(path), load_config(path).text)
    ref = _Counting(store, CPU, torch.bfloat16)
    want_tokens, want_logits = _greedy(path, ref)
    assert ref.hints == []  # a provider without `lookahead` is never sent hints

    cache = TieredExperts(store, CPU, torch.bfloat16, cpu_slots=slots, prefetch=True, min_recall=0.0)
    assert cache.lookahead
    tokens, logits = _greedy(path, cache, wrong_gates=wrong)
    cache.wait_prefetch()
    assert tokens == want_tokens and torch.equal(logits, want_logits)
    s = cache.stats()
    # decode steps hint layers 1..L-1 with top-k each: (n_new) steps x (L - 1) layers x k
    assert s["prefetch_hinted"] == 10 * (SPEC.num_hidden_layers - 1) * SPEC.num_experts_per_tok
    assert s["prefetch_recall"] is not None and 0.0 <= s["prefetch_recall"] <= 1.0
    if slots == 8:  # room beyond the experts in use: hinted experts are read ahead
        assert s["prefetch_read"] > 0
    cache.close()


@pytest.mark.slow
def test_lookahead_recall_beats_chance_with_the_real_router(path):
    """The next layer's router on this layer's input agrees with the next layer's choice more often
    than a random router does (random: about k / E = 0.25)."""
    store = ExpertStore(Checkpoint(path), load_config(path).text)
    recall = {}
    for wrong in (False, True):
        cache = TieredExperts(
            store, CPU, torch.bfloat16, cpu_slots=12, prefetch=True
        )  # not all 16: a layer holding every expert sends no hints
        _greedy(path, cache, wrong_gates=wrong, n_new=24)
        recall[wrong] = cache.stats()["prefetch_recall"]
        cache.close()
    assert recall[False] > recall[True]


def test_prefetch_off_sends_no_hints(path):
    store = ExpertStore(Checkpoint(path), load_config(path).text)
    cache = TieredExperts(store, CPU, torch.bfloat16, cpu_slots=4, prefetch=False)
    assert not cache.lookahead
    _greedy(path, cache, n_new=3)
    assert cache.stats()["prefetch_hinted"] == 0 and cache.stats()["prefetch_recall"] is None


def test_cancelled_prefetch_leaves_correct_experts(path):
    store = ExpertStore(Checkpoint(path), load_config(path).text)
    cache = TieredExperts(store, CPU, torch.bfloat16, cpu_slots=4, prefetch=True)
    for step in range(30):
        layer = step % SPEC.num_hidden_layers
        cache.hint(layer, list(range(step % 7, step % 7 + 6)))  # more than the slots; then cancelled
        want = [(step * 5 + i) % SPEC.num_experts for i in range(3)]
        got = cache.get(layer, want)
        for e in want:
            ref = store.read(layer, e, torch.bfloat16)
            assert torch.equal(got[e].gate_up, ref[0]) and torch.equal(got[e].down, ref[1])
        assert len(cache.resident(layer)) <= 4
    cache.close()


@pytest.mark.skipif(not getattr(os, "RWF_NOWAIT", 0), reason="needs preadv2 RWF_NOWAIT (Linux)")
def test_store_tells_page_cache_reads_from_disk_reads(path):
    store = ExpertStore(Checkpoint(path), load_config(path).text)
    slots = [torch.empty(store.slot_nbytes, dtype=torch.uint8) for _ in range(3)]
    store.read_many(0, [1, 5, 9], slots)
    runs = store.runs_cached + store.runs_from_disk  # the runs of one such read, each counted once
    cached = store.runs_cached
    store.read_many(0, [1, 5, 9], slots)  # just read: the page cache holds it
    assert store.runs_cached > cached
    evict_page_cache(store.files())
    cached, disk = store.runs_cached, store.runs_from_disk
    store.read_many(0, [1, 5, 9], slots)
    if store._nowait:  # the filesystem answers RWF_NOWAIT: every run counted as cached or from disk
        # (tmpfs never evicts, so the split between the two may be anything; their sum may not)
        assert runs > 0 and (store.runs_cached - cached) + (store.runs_from_disk - disk) == runs
    for e, slot in zip((1, 5, 9), slots):
        ref = store.read(0, e, torch.bfloat16)
        got = store.format.bind(slot)
        assert torch.equal(got.gate_up, ref[0]) and torch.equal(got.down, ref[1])
