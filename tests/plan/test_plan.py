"""The memory plan: the 397B arithmetic of docs/offloading-anchors.md, refusals with numbers, sizing."""

from __future__ import annotations

import json
import math

import pytest
import torch

from qwen35_lite.convert.synthetic import SyntheticSpec, write_checkpoint
from qwen35_lite.errors import BudgetError
from qwen35_lite.plan.memory import GiB, MemoryPlan
from qwen35_lite.plan.sizes import tensor_shapes
from qwen35_lite.plan.table import plan_rows
from qwen35_lite.weights.checkpoint import Checkpoint
from qwen35_lite.weights.config import load_config

# Qwen3.5-397B-A17B, from shared/docs/qwen35-architecture.md §1.1
TEXT_397B = {
    "model_type": "qwen3_5_moe_text",
    "hidden_size": 4096,
    "num_hidden_layers": 60,
    "full_attention_interval": 4,
    "num_attention_heads": 32,
    "num_key_value_heads": 2,
    "head_dim": 256,
    "attention_bias": False,
    "linear_num_key_heads": 16,
    "linear_num_value_heads": 64,
    "linear_key_head_dim": 128,
    "linear_value_head_dim": 128,
    "linear_conv_kernel_dim": 4,
    "num_experts": 512,
    "num_experts_per_tok": 10,
    "moe_intermediate_size": 1024,
    "shared_expert_intermediate_size": 1024,
    "norm_topk_prob": True,
    "mlp_only_layers": [],
    "vocab_size": 248320,
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": 10000000,
        "partial_rotary_factor": 0.25,
        "mrope_section": [11, 11, 10],
        "mrope_interleaved": True,
    },
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "max_position_embeddings": 262144,
    "mtp_num_hidden_layers": 1,
    "eos_token_id": 248044,
}
CONFIG_397B = {
    "architectures": ["Qwen3_5MoeForConditionalGeneration"],
    "model_type": "qwen3_5_moe",
    "text_config": TEXT_397B,
    "tie_word_embeddings": False,
    "image_token_id": 248056,
    "video_token_id": 248057,
    "vision_start_token_id": 248053,
    "vision_end_token_id": 248054,
}


@pytest.fixture(scope="module")
def cfg397(module_tmp):
    d = module_tmp("q397")
    (d / "config.json").write_text(json.dumps(CONFIG_397B))
    return load_config(d).text


def test_397b_kv_state_and_resident_bytes_match_the_anchors(cfg397):
    plan = MemoryPlan.build(
        cfg397, device="cuda", dtype=torch.bfloat16, gpu_mem=80, cpu_mem=120, context=32768
    )
    plan.check()
    assert plan.kv_per_token == 30720  # 2 · 15 layers · 2 KV heads · 256 · 2 bytes = 30 KiB
    assert plan.kv_bytes >= 30720 * 32768  # 1.0 GiB at 32K (+ one layer's regrowth copy)
    # anchors §3.1: per GDN layer ≈ 118 M, per full-attention layer ≈ 105 M, router 2.1 M, shared expert
    # 12.6 M, lm_head 1.02 B -> 8.78 B params = 17.6 GB bf16 on the GPU; the 1.02 B embedding on the CPU
    assert plan.weights_gpu == pytest.approx(17.56e9, rel=0.02)
    assert plan.weights_cpu == 248320 * 4096 * 2
    # GDN recurrent state 45 · 64 · 128 · 128 fp32 ≈ 189 MB (+ conv windows, + one layer's update copy)
    assert 189e6 <= plan.state_bytes <= 189e6 * 1.1
    assert plan.expert_disk_bytes == 3 * 4096 * 1024 * 2  # 25.2 MB
    disk, to_gpu = plan.bytes_per_token(ram_hit=0.0, gpu_hit=0.0)
    assert disk == pytest.approx(15.1e9, rel=0.01) and to_gpu == disk  # 600 experts per token
    rows = dict(plan_rows(plan))
    assert rows["KV cache per token"].startswith("30.0 KiB")
    assert "GPU" in "".join(rows) and plan.gpu_slots > 0 and plan.cpu_slots > 0
    assert plan.gpu_total <= 80 * GiB and plan.cpu_total <= 120 * GiB


def test_397b_fp8_experts_are_half_the_bytes(cfg397):
    plan = MemoryPlan.build(
        cfg397, device="cpu", dtype=torch.bfloat16, stored_dtype=torch.float8_e4m3fn, cpu_mem=120
    )
    assert plan.expert_disk_bytes == pytest.approx(12.6e6, rel=0.01)  # + block scales
    assert plan.staging_bytes > 0  # FP8 -> bf16 goes through a staging buffer


def test_397b_cpu_budget_too_small_is_refused_with_the_numbers(cfg397):
    plan = MemoryPlan.build(cfg397, device="cpu", dtype=torch.bfloat16, cpu_mem=16, context=32768)
    with pytest.raises(BudgetError) as err:
        plan.check()
    msg, hint = err.value.message, err.value.hint
    assert "--cpu-mem is 16.00 GiB" in msg and "weights 18.25 GiB" in msg and "KV for 32768 tokens" in msg
    need = float(hint.split("--cpu-mem ")[1].split()[0])
    fits = MemoryPlan.build(cfg397, device="cpu", dtype=torch.bfloat16, cpu_mem=need, context=32768)
    fits.check()  # the flag the hint gives is enough
    assert fits.cpu_slots >= 1


def test_397b_gpu_budget_too_small_spills_layers_then_refuses(cfg397):
    plan = MemoryPlan.build(cfg397, device="cuda", dtype=torch.bfloat16, gpu_mem=16, cpu_mem=200)
    assert plan.cpu_layers and plan.cpu_layers[-1] == 59  # the last layers' resident weights go to the CPU
    # they run from two GPU buffers the size of the largest; its router stays on the GPU
    shapes = tensor_shapes(cfg397)
    layer_59 = sum(math.prod(s) * 2 for n, s in shapes.items() if n.startswith("layers.59."))
    router = 512 * 4096 * 2
    assert plan.spill_buffers == 2 * max(plan._layer_bytes[i] for i in plan.cpu_layers)
    assert plan._layer_bytes[59] == layer_59 - router
    assert plan.gpu_fixed + plan.moe_layers * plan.slot_bytes <= 16 * GiB
    plan.check()
    assert any("placed on the CPU" in label for label, _ in plan_rows(plan))
    with pytest.raises(BudgetError, match="--gpu-mem") as err:
        MemoryPlan.build(cfg397, device="cuda", dtype=torch.bfloat16, gpu_mem=1, cpu_mem=200).check()
    assert "spilled-layer buffers" in err.value.message  # every part of the total is named


def test_too_many_slots_asked_is_refused_with_what_fits(cfg397):
    plan = MemoryPlan.build(cfg397, device="cpu", dtype=torch.bfloat16, cpu_mem=64, cpu_experts=100)
    with pytest.raises(BudgetError) as err:
        plan.check()
    fits = int(err.value.hint.split("--cpu-experts ")[1].split()[0])
    assert fits >= 1
    MemoryPlan.build(cfg397, device="cpu", dtype=torch.bfloat16, cpu_mem=64, cpu_experts=fits).check()


def test_context_that_fits_is_consistent(cfg397):
    plan = MemoryPlan.build(cfg397, device="cpu", dtype=torch.bfloat16, cpu_mem=25, context=4096)
    fit = plan.context_fit
    assert 4096 < fit < 262144
    MemoryPlan.build(
        cfg397, device="cpu", dtype=torch.bfloat16, cpu_mem=25, context=fit, cpu_experts=1
    ).check()
    with pytest.raises(BudgetError):
        MemoryPlan.build(
            cfg397, device="cpu", dtype=torch.bfloat16, cpu_mem=25, context=fit + 2048, cpu_experts=1
        ).check()


def test_default_budget_comes_from_free_memory(cfg397):
    plan = MemoryPlan.build(cfg397, device="cpu", dtype=torch.bfloat16)
    assert plan.cpu_budget_from == "free memory" and plan.cpu_budget > 0


def test_plan_from_a_checkpoint_equals_the_plan_from_its_config(tmp_path):
    spec = SyntheticSpec(num_experts=6, num_experts_per_tok=2, vocab_size=4096)
    path = write_checkpoint(tmp_path / "ck", spec, dtype=torch.bfloat16)
    cfg = load_config(path).text
    ckpt = Checkpoint(path)
    for name, shape in tensor_shapes(cfg).items():
        assert ckpt.info(name).shape == shape, name
    a = MemoryPlan.build(cfg, device="cpu", dtype=torch.bfloat16, ckpt=ckpt, cpu_mem=2)
    b = MemoryPlan.build(cfg, device="cpu", dtype=torch.bfloat16, cpu_mem=2)
    assert (a.weights_cpu, a.expert_disk_bytes, a.slot_bytes) == (
        b.weights_cpu,
        b.expert_disk_bytes,
        b.slot_bytes,
    )
    assert a.cpu_slots == spec.num_experts  # everything fits: every expert gets a slot
    f32 = MemoryPlan.build(cfg, device="cpu", dtype=torch.float32, ckpt=ckpt, cpu_mem=2)
    assert f32.slot_bytes == 2 * a.slot_bytes and f32.staging_bytes == 2 * a.expert_disk_bytes


def test_serve_state_cache_is_part_of_the_plan(cfg397):
    """`serve --state-cache`: the kept model states come out of the expert cache's share and show in a
    refusal's parts, which add up to its total."""
    base = MemoryPlan.build(cfg397, device="cpu", dtype=torch.bfloat16, cpu_mem=64, context=8192)
    kept = MemoryPlan.build(
        cfg397, device="cpu", dtype=torch.bfloat16, cpu_mem=64, context=8192, kept_states=8 << 30
    )
    assert kept.cpu_fixed == base.cpu_fixed + (8 << 30) and kept.cpu_slots < base.cpu_slots
    assert kept.cpu_total <= kept.cpu_budget
    with pytest.raises(BudgetError) as err:
        MemoryPlan.build(cfg397, device="cpu", dtype=torch.bfloat16, cpu_mem=30, kept_states=20 << 30).check()
    assert "kept model states 20.00 GiB" in err.value.message


def test_serve_sizes_its_state_cache_from_what_is_left_and_a_small_model_fits_under_2_gib(tmp_path):
    """Without --state-cache, serve keeps a share of what the budget leaves after the smallest expert
    cache (never a fixed amount): a small model plans under 2 GiB; an explicit --state-cache that puts
    the plan over is named in the hint, with no "shorter --ctx" where KV is not the problem."""
    path = write_checkpoint(tmp_path / "ck", SyntheticSpec(vocab_size=4096), dtype=torch.bfloat16)
    cfg, ckpt = load_config(path).text, Checkpoint(path)
    kw = dict(device="cpu", dtype=torch.bfloat16, ckpt=ckpt)
    for gib in (1.0, 1.5, 1.9):
        plan = MemoryPlan.build(cfg, cpu_mem=gib, kept_states=None, **kw)
        plan.check()
        assert 0 < plan.kept_states < 0.25 * gib * GiB and plan.cpu_total <= gib * GiB
        assert plan.cpu_slots == cfg.num_experts
        assert dict(plan_rows(plan))["kept model states (serve)"].endswith("(a share of what is left)")
    with pytest.raises(BudgetError) as err:
        MemoryPlan.build(cfg, cpu_mem=1.0, kept_states=2 << 30, **kw).check()
    assert "kept model states 2.00 GiB (--state-cache)" in err.value.message
    hint = err.value.hint
    assert "--state-cache" in hint and "--ctx" not in hint and "0 KiB" not in hint
    less = float(hint.split("--state-cache ")[1].split()[0])
    MemoryPlan.build(cfg, cpu_mem=1.0, kept_states=int(less * GiB), **kw).check()  # the hint's value fits


def test_a_text_run_reserves_nothing_for_images_and_a_run_with_images_their_size(tmp_path):
    """run without --image: no tower, no image part; run --image: the tower and what the images' headers
    say decoding them takes; chat and serve (images=None): the tower, and no standing image allowance."""
    from PIL import Image

    from qwen35_lite.model.vision.preprocess import ImageProcessorConfig, image_nbytes

    vision = {"depth": 2, "hidden_size": 32, "num_heads": 2, "intermediate_size": 48, "out_hidden_size": 64}
    config = {**CONFIG_397B, "vision_config": vision}
    (tmp_path / "config.json").write_text(json.dumps(config))
    cfg = load_config(tmp_path)
    pic = tmp_path / "a.png"
    Image.new("RGBA", (1200, 800)).save(pic)
    kw = dict(device="cpu", dtype=torch.bfloat16, cpu_mem=64, context=4096, vision=cfg.vision)
    text = MemoryPlan.build(cfg.text, images=(), **kw)
    chat = MemoryPlan.build(cfg.text, **kw)
    run = MemoryPlan.build(cfg.text, images=(pic, pic), **kw)
    assert text.vision_bytes == text.image_bytes == 0 and chat.image_bytes == 0 < chat.vision_bytes
    assert run.image_bytes == 2 * image_nbytes(1200, 800, "RGBA", True, ImageProcessorConfig())
    assert run.cpu_fixed - text.cpu_fixed == run.vision_bytes + run.image_bytes
    assert not any("image" in label for label, _ in plan_rows(text))
    assert "decoding the images (--image)" in dict(plan_rows(run))
    with pytest.raises(BudgetError) as err:
        MemoryPlan.build(cfg.text, images=(), **{**kw, "cpu_mem": 16}).check()
    assert "image" not in err.value.message and "vision" not in err.value.message


def test_the_prefill_block_shrinks_before_the_plan_refuses(cfg397):
    """A budget the largest block does not fit, but a smaller one does: the block is lowered (down to
    PREFILL_CHUNK), not the run refused."""
    from qwen35_lite.model.qwen35 import PREFILL_CHUNK

    kw = dict(device="cpu", dtype=torch.bfloat16, context=8192, cpu_experts=1)
    roomy = MemoryPlan.build(cfg397, cpu_mem=200, **kw)
    smallest = MemoryPlan.build(cfg397, cpu_mem=1000, **kw)
    smallest.prefill_block = PREFILL_CHUNK
    smallest.kv_bytes, smallest.activations = smallest._context_bytes(smallest.context)
    need = smallest.cpu_total
    assert roomy.prefill_block > PREFILL_CHUNK and roomy.cpu_total > need
    tight = MemoryPlan.build(cfg397, cpu_mem=need / GiB, **kw)
    tight.check()
    assert tight.prefill_block == PREFILL_CHUNK and tight.cpu_total <= tight.cpu_budget
    with pytest.raises(BudgetError):
        MemoryPlan.build(cfg397, cpu_mem=need / GiB - 0.01, **kw).check()


def test_a_budget_past_any_machine_is_no_overflow(cfg397):
    for gib in (1e300, float("inf")):
        plan = MemoryPlan.build(cfg397, device="cpu", dtype=torch.bfloat16, cpu_mem=gib, context=4096)
        plan.check()
        assert plan.cpu_slots == cfg397.num_experts


def w4a16_all_linear() -> dict:
    """The community recipe's quantization_config: W4A16 g128 on every Linear but the router, the
    shared-expert gate, DeltaNet's in_proj_a/b, lm_head, the vision tower and MTP (ct_reference)."""
    from ct_reference import RECIPE_IGNORE

    from qwen35_lite.convert.quantize import quantization_config
    from qwen35_lite.weights.packed import QuantScheme

    qc = quantization_config(QuantScheme(bits=4, group_size=128, symmetric=True))
    qc["config_groups"]["group_0"]["targets"] = ["Linear"]
    qc["ignore"] = RECIPE_IGNORE
    return qc


def test_397b_w4a16_resident_layers_leave_the_gpu_room_for_30_int4_experts_a_layer(tmp_path):
    """Issue 18's criterion: the plan `info` makes (plan_load on config.json alone) for the 397B with every
    Linear W4A16 (lm_head bf16), a 24 GB GPU and 110 GiB of RAM: the resident layers held packed take at
    most 8 GiB of the GPU (16.4 GiB in bf16) and the GPU keeps 30 int4 expert slots a layer or more."""
    from qwen35_lite.plan.load import plan_load
    from qwen35_lite.plan.options import EngineOptions

    (tmp_path / "config.json").write_text(
        json.dumps({**CONFIG_397B, "quantization_config": w4a16_all_linear()})
    )
    opts = EngineOptions(device="cuda", gpu_mem=24, cpu_mem=110, offline=True)
    plan = plan_load(str(tmp_path), opts, config_only=True).plan
    plan.check()
    assert plan.expert_format == "int4 g128 symmetric"
    assert plan.weights_gpu <= 8 * GiB
    assert plan.gpu_slots >= 30
    packed = plan.resident_by_format["int4 g128 symmetric"]
    assert packed["memory_bytes"] <= packed["disk_bytes"]  # held as stored on a GPU
    # the bf16 head (1.9 GiB) is the only large dense resident on the GPU; the table shows both formats
    assert plan.resident_by_format["bfloat16"]["memory_bytes"] < 4.2 * GiB
    text = dict(plan_rows(plan))["resident weights by format"]
    assert "int4 g128 symmetric" in text and "in memory" in text and "bfloat16" in text
