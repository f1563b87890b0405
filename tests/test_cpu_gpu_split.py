"""CPU and GPU together: a decode step's GPU misses computed by the CPU from their RAM slots.

Without a GPU the GPU tier's bookkeeping runs on CPU buffers with stand-in streams and events (as in
test_expert_cache.py), so the split, the background promotion, the fixed-order sum and the cost model are
checked here; the real overlap needs CUDA (tests/test_gpu.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import greedy, load_ours
from test_expert_cache import _CpuStandInGpu, fake_cuda  # noqa: F401  (the fixture, used below)

from qwen35_lite.checkpoint import Checkpoint
from qwen35_lite.config import load_config
from qwen35_lite.experts.formats import expert_format, ffn
from qwen35_lite.experts.lookup import Lookup, OnCpu
from qwen35_lite.experts.rates import ExpertRates, measure_rates
from qwen35_lite.experts.store import ExpertStore
from qwen35_lite.synthetic import SyntheticSpec, write_checkpoint

pytestmark = pytest.mark.usefixtures("fake_cuda")  # stand-in CUDA streams and events, every test

SPEC = SyntheticSpec(num_hidden_layers=4, num_experts=16, num_experts_per_tok=4, vocab_size=4096)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("split") / "ck", SPEC, dtype=torch.float32)


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


def test_a_decode_lookup_splits_hits_and_misses_and_promotes_the_misses(ckpt):
    p = _standin(ckpt, in_place=True)
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
        x = torch.randn(1, SPEC.hidden_size)
        torch.testing.assert_close(got[e](x), ffn(x, gate_up, down))
    ram = p.ram.pools[0]
    for e, s in got.cpu_slot.items():
        assert ram.where[e] == s
    # promoted in the background for the next tokens, none of the step's own experts evicted
    assert {2, 3, 7}.issubset(p.gpu.pools[0].where) or {2, 3, 9}.issubset(p.gpu.pools[0].where)
    s = p.stats()
    assert s["gpu_misses"] == 4 + 2 and s["experts_on_cpu"] == 2


def test_copy_mode_places_the_misses_in_gpu_slots_after_the_hits(ckpt):
    p = _standin(ckpt, in_place=False)
    p.get(0, [0, 1, 2, 3])
    got = p.get(0, [0, 1, 8, 9], one_token=True)
    assert got.misses == [8, 9] and set(got.slot) == {0, 1}
    got.place_misses()
    assert set(got.slot) == {0, 1, 8, 9} and not got.cpu_slot and p.experts_on_cpu == 0
    gpu = p.gpu.pools[0]
    assert all(gpu.where[e] == got.slot[e] for e in got.slot)  # the hits kept their slots
    gate_up, _ = p.store.read(0, 9, torch.float32)
    assert torch.equal(got[9].gate_up, gate_up)


def test_prefill_lookups_never_split(ckpt):
    p = _standin(ckpt, in_place=True)
    got = p.get(1, [4, 5, 6])
    assert not got.cpu_slot and p.experts_on_cpu == 0


@pytest.mark.parametrize("gpu_slots,cpu_slots", [(5, 12), (4, 4), (16, 16)])
def test_cpu_computed_experts_give_the_gpu_computed_tokens_in_fp32(ckpt, gpu_slots, cpu_slots):
    """Greedy tokens and logits with GPU misses computed by the CPU equal those with every miss copied
    to the GPU, and the reference provider's."""
    ids = torch.randint(0, SPEC.vocab_size, (40,), generator=torch.Generator().manual_seed(0))
    ref_tokens, ref_logits = greedy(load_ours(ckpt, torch.float32), ids, 10)
    runs = {}
    for in_place in (False, True):
        model = load_ours(
            ckpt, torch.float32, lambda *a, ip=in_place: _standin(ckpt, ip, gpu_slots, cpu_slots)
        )
        runs[in_place] = greedy(model, ids, 10), model.provider.stats()
    for (tokens, logits), _ in runs.values():
        assert tokens == ref_tokens
        torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    on_cpu = runs[True][1]["experts_on_cpu"]
    assert (on_cpu > 0) == (gpu_slots < SPEC.num_experts) and runs[False][1]["experts_on_cpu"] == 0


def test_rates_pick_the_faster_side(ckpt):
    p = _standin(ckpt, in_place=False)
    p.preload()
    rates = measure_rates(p, sync=lambda: None, gpu_scratch=torch.empty(p.slot_nbytes, dtype=torch.uint8))
    assert rates.cpu_s > 0 and rates.copy_s > 0 and rates.slot_nbytes == p.slot_nbytes
    assert ExpertRates(1e-4, 2e-4, 1 << 20).compute_in_place
    assert not ExpertRates(3e-4, 2e-4, 1 << 20).compute_in_place
    shown = ExpertRates(1e-3, 2e-3, 10**6).as_dict()
    assert shown["cpu_expert_gb_s"] == 1.0 and shown["pcie_gb_s"] == 0.5
    assert shown["gpu_misses_computed_by"] == "cpu"


def test_info_shows_the_expected_split_on_a_gpu_budget(tmp_path):
    import json

    from test_plan import CONFIG_397B

    from qwen35_lite.plan.memory import MemoryPlan
    from qwen35_lite.plan.table import expert_split, plan_rows

    (tmp_path / "config.json").write_text(json.dumps(CONFIG_397B))
    cfg = load_config(tmp_path).text
    plan = MemoryPlan.build(cfg, device="cuda", dtype=torch.bfloat16, gpu_mem=22.5, cpu_mem=110, context=8192)
    split = expert_split(plan)
    E = cfg.num_experts
    assert split["gpu"] == round(plan.gpu_slots / E, 4) and 0 < split["ram"] < 1
    assert abs(sum(split.values()) - 1) < 1e-3
    row = dict(plan_rows(plan))["expected expert split"]
    assert "on the GPU" in row and "computed by the CPU or copied" in row and "from disk" in row
    cpu_plan = MemoryPlan.build(cfg, device="cpu", dtype=torch.bfloat16, cpu_mem=110, context=8192)
    assert "expected expert split" not in dict(plan_rows(cpu_plan))


def test_pinned_host_memory_stays_under_its_cap(ckpt):
    """Slots past the cap are pageable (copies from them are staged by the driver): with a cap of 0
    nothing is page-locked, and the tiers work as before."""
    ck, cfg = Checkpoint(ckpt), load_config(ckpt)
    fmt = expert_format(cfg.raw, cfg.text.hidden_size, cfg.text.moe_intermediate_size, CPU, None, ck)
    p = _CpuStandInGpu(
        ExpertStore(ck, cfg.text, fmt), torch.device("cuda"), torch.float32, cpu_slots=4, gpu_slots=2,
        pin=True, pinned_bytes=0, prefetch=False,
    )  # fmt: skip
    assert p.pinned_bytes == 0 and not any(b.is_pinned() for b in p.ram.buffers)
    got = p.get(0, [1, 2])
    gate_up, _ = p.store.read(0, 2, torch.float32)
    assert torch.equal(got[2].gate_up, gate_up) and p.stats()["pinned_bytes"] == 0


def test_the_plan_holds_a_decode_steps_gathered_experts(tmp_path):
    """StackedExperts gathers the top-k experts (and, for FP8 on a GPU, dequantises them in fp32): the
    plan's buffers hold that at a decode step, whatever the prefill block."""
    import json

    from test_plan import CONFIG_397B

    from qwen35_lite.plan.memory import MemoryPlan
    from qwen35_lite.plan.sizes import activation_bytes

    (tmp_path / "config.json").write_text(json.dumps(CONFIG_397B))
    cfg = load_config(tmp_path).text
    fp8 = {"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}
    for stored, raw, per_expert in (
        (torch.bfloat16, {}, 2 * 1024 * 4096 * 2),
        (torch.float8_e4m3fn, fp8, None),
    ):
        plan = MemoryPlan.build(
            cfg, device="cuda", dtype=torch.bfloat16, stored_dtype=stored, raw_config=raw,
            gpu_mem=22.5, cpu_mem=110, context=8192,
        )  # fmt: skip
        if per_expert is not None:
            assert plan.decode_gather == 10 * per_expert  # ten bf16 gate_up matrices
        else:
            assert plan.decode_gather > 10 * 2 * 1024 * 4096 * 4  # fp32 dequantisation besides
        assert plan.activations >= activation_bytes(cfg, torch.bfloat16, 1, 8192) + plan.decode_gather
