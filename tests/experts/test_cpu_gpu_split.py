"""CPU and GPU together: a decode step's GPU misses computed by the CPU from their RAM slots.

Without a GPU the GPU tier's bookkeeping runs on CPU buffers with stand-in streams and events (as in
tests/experts/test_cache.py, which tests the split lookup itself and the background promotion), so the tokens,
the fixed-order sum and the cost model are checked here; the real overlap needs CUDA (tests/runtime/test_gpu.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import greedy, load_ours
from test_cache import _standin, fake_cuda  # noqa: F401  (the fixture, used below)

from qwen35_lite.convert.synthetic import SyntheticSpec, write_checkpoint
from qwen35_lite.experts.rates import ExpertRates, measure_rates
from qwen35_lite.weights.config import load_config

pytestmark = pytest.mark.usefixtures("fake_cuda")  # stand-in CUDA streams and events, every test

SPEC = SyntheticSpec(num_hidden_layers=4, num_experts=16, num_experts_per_tok=4, vocab_size=4096)


@pytest.fixture(scope="module")
def ckpt(module_tmp):
    return write_checkpoint(module_tmp("split") / "ck", SPEC, dtype=torch.float32)


@pytest.mark.slow
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
