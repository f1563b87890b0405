"""`info` (the plan from config.json alone), `bench --json`, and the budget flags through `run`: a budget
too small is one error line and a hint; a budget below the checkpoint's size decodes the same tokens.

In-process through typer's CliRunner. The process-wide constants of the plan (the runtime and the
tokenizer, ~0.6 GiB) are zeroed where a small checkpoint must be larger than its budget; test_budget
checks the real constants against RSS sampled from outside the process.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_plan import CONFIG_397B
from typer.testing import CliRunner

import qwen35_lite.plan.memory
from qwen35_lite.cli import app
from qwen35_lite.convert.synthetic import SyntheticSpec, write_checkpoint
from qwen35_lite.plan.memory import GiB

# 4 layers x 64 experts x 384 KiB = 96 MiB of experts beside a 64 MB embedding + head (the real vocabulary,
# so the chat template's special tokens exist)
SPEC = SyntheticSpec(num_experts=64, num_experts_per_tok=4, moe_intermediate_size=1024)
EMBED_397B = 248320 * 4096 * 2


def cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def ok_json(*args) -> dict:
    r = cli(*args, "--json")
    assert r.exit_code == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1, r.stdout
    return json.loads(lines[0])


def assert_refused(r, *words: str) -> None:
    """Exit 1, one `error:` line naming `words`, one `hint:` line, nothing else."""
    assert r.exit_code == 1, (r.exit_code, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].startswith("hint: "), r.stderr
    for w in words:
        assert w in r.stderr, r.stderr
    assert "Traceback" not in r.stdout + r.stderr


@pytest.fixture(scope="module")
def config_397b(module_tmp) -> Path:
    d = module_tmp("q397")
    (d / "config.json").write_text(json.dumps(CONFIG_397B))
    return d


@pytest.fixture(scope="module")
def ckpt(module_tmp) -> Path:
    return write_checkpoint(module_tmp("ib") / "ck", SPEC, dtype=torch.bfloat16)


@pytest.fixture
def no_process_constants(monkeypatch):
    monkeypatch.setattr(qwen35_lite.plan.memory, "PROCESS_BASE", 0)
    monkeypatch.setattr(qwen35_lite.plan.memory, "TOKENIZER", 0)
    monkeypatch.setattr(qwen35_lite.plan.memory, "TOKENIZER_PARSE", 0)
    monkeypatch.setattr(qwen35_lite.plan.sizes, "CPU_PRIMITIVE_BYTES", 0)  # measured on other shapes only
    monkeypatch.setattr(qwen35_lite.plan.sizes, "CPU_RETAINED_BASE", 0)


# ---- info ------------------------------------------------------------------------------------------


def test_info_on_the_397b_config_alone_matches_the_anchors(config_397b):
    # CPU: every resident weight in RAM. Anchors §3.1: 8.78 B params on the GPU path + the 1.02 B embedding.
    cpu = ok_json("info", "-m", config_397b, "--device", "cpu", "--cpu-mem", 25)
    assert cpu["kv_bytes_per_token"] == 30720  # 2 · 15 attention layers · 2 KV heads · 256 · 2 bytes
    assert cpu["weights_cpu"] == pytest.approx(17.56e9 + EMBED_397B, rel=0.02)
    assert cpu["expert_disk_bytes"] == 3 * 4096 * 1024 * 2 and cpu["experts"] == 512
    assert cpu["cpu_total"] <= 25 * GiB and cpu["cpu_slots"] >= 1
    # the context that fits --cpu-mem 25: it runs with one slot per layer, 2048 tokens more does not
    fit = cpu["context_fit"]
    assert 32768 < fit < 262144
    assert cli("info", "-m", config_397b, "--cpu-mem", 25, "--ctx", fit, "--cpu-experts", 1).exit_code == 0
    over = cli("info", "-m", config_397b, "--cpu-mem", 25, "--ctx", fit + 2048, "--cpu-experts", 1)
    assert_refused(over, "--cpu-mem is 25.00 GiB", "--cpu-mem")
    # a GPU plan, made on this GPU-less machine from --gpu-mem: 17.6 GB resident there, the embedding in RAM
    gpu = ok_json("info", "-m", config_397b, "--device", "cuda", "--gpu-mem", 80, "--cpu-mem", 120)
    assert gpu["weights_gpu"] == pytest.approx(17.56e9, rel=0.02) and gpu["weights_cpu"] == EMBED_397B
    assert gpu["gpu_slots"] >= 1 and gpu["gpu_total"] <= 80 * GiB
    assert gpu["gpu_bytes_per_token"] > 0
    # the table
    r = cli("info", "-m", config_397b, "--cpu-mem", 30)
    assert r.exit_code == 0, r.stderr
    assert "30.0 KiB" in r.stdout and "context that fits" in r.stdout and "expert slots (RAM)" in r.stdout


def test_info_reserves_the_vision_tower(config_397b, tmp_path):
    # Qwen3.5-397B's vision_config (27 blocks of 1152): 0.456 B params, 1.824 GB in fp32, the dtype
    # the tower computes in on the CPU (vision.tower.tower_dtype); on a GPU it is the text dtype
    vision = {"depth": 27, "hidden_size": 1152, "num_heads": 16, "intermediate_size": 4304}
    (tmp_path / "config.json").write_text(json.dumps({**CONFIG_397B, "vision_config": vision}))
    args = ("--device", "cpu", "--cpu-mem", 64, "--ctx", 4096, "--cpu-experts", 1)
    text_only = ok_json("info", "-m", config_397b, *args)
    with_vision = ok_json("info", "-m", tmp_path, *args)
    assert with_vision["vision_bytes"] == pytest.approx(1.824e9, rel=0.001) and text_only["vision_bytes"] == 0
    # `info` plans for chat and serve, where an image may come at any turn: the tower is reserved, no
    # image's decoding is (it takes room when the image comes: multimodal.room_for_images)
    assert with_vision["cpu_total"] - text_only["cpu_total"] == with_vision["vision_bytes"]
    assert with_vision["image_bytes"] == 0 and text_only["image_bytes"] == 0
    r = cli("info", "-m", tmp_path, "--cpu-mem", 64, "--ctx", 4096)
    assert "vision tower (loaded on first image)" in r.stdout and "reserved" in r.stdout
    gpu = ok_json("info", "-m", tmp_path, "--device", "cuda", "--gpu-mem", 80, "--cpu-mem", 64)
    assert gpu["vision_bytes"] == pytest.approx(0.912e9, rel=0.001)  # bf16 on the GPU


def test_info_refuses_a_budget_below_the_resident_path(config_397b):
    r = cli("info", "-m", config_397b, "--cpu-mem", 16)
    assert_refused(r, "the resident path needs", "--cpu-mem is 16.00 GiB", "weights 18.25 GiB")
    assert "--ctx" not in r.stderr  # the weights alone are over 16 GiB: a shorter context cannot help
    need = float(r.stderr.split("use --cpu-mem ")[1].split()[0])
    assert cli("info", "-m", config_397b, "--cpu-mem", need).exit_code == 0  # the hint's value fits
    # where the context is what does not fit, the hint names --ctx with the KV a token takes
    r = cli("info", "-m", config_397b, "--cpu-mem", 25, "--ctx", 250000)
    assert_refused(r, "--cpu-mem is 25.00 GiB", "a shorter --ctx (KV is 30.0 KiB per token)")


# ---- bench ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_bench_json_reports_speeds_cache_traffic_and_memory(ckpt):
    b = ok_json("bench", "-m", ckpt, "--prompt-tokens", 40, "--new-tokens", 5, "--cpu-experts", 8)
    assert b["prompt_tokens"] == 40 and b["generated_tokens"] == 5 and len(b["tokens"]) == 5
    for key in ("prefill_tok_s", "decode_tok_s", "ttft_s", "peak_rss_bytes"):
        assert b[key] > 0, key
    assert b["ttft_s"] <= b["prefill_s"] + 1
    assert b["plan"]["cpu_slots"] == 8 and b["plan"]["experts"] == SPEC.num_experts
    assert b["ram_hits"] + b["ram_misses"] > 0 and 0 <= b["ram_hit_rate"] <= 1
    assert b["ram_misses"] > 0  # 8 slots of 64 experts per layer
    assert b["disk_bytes"] >= b["ram_misses"] * 3 * 64 * 1024 * 2
    assert b["disk_bytes_per_token"] > 0  # decode misses read from disk
    assert "gpu_hits" not in b and "peak_gpu_bytes" not in b  # no GPU tier on a CPU run


# ---- run under --cpu-mem --------------------------------------------------------------------------


@pytest.mark.slow
def test_run_under_cpu_mem_decodes_the_same_tokens_with_misses(ckpt, no_process_constants):
    common = ("run", "-m", ckpt, "-t", 0, "-n", 6, "--ctx", 512, "Name three colours.")
    plan = ok_json("info", "-m", ckpt, "--ctx", 512, "--cpu-mem", 4, "--cpu-experts", 3)
    budget = (plan["cpu_total"] + plan["expert_slot_bytes"]) / GiB  # room for 3 slots per layer, not 4
    ckpt_bytes = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    assert ckpt_bytes > 1.5 * budget * GiB
    free = ok_json(*common)
    capped = ok_json(*common, "--cpu-mem", f"{budget:.6f}")
    assert capped["tokens"] == free["tokens"]
    s = capped["stats"]
    assert s["experts"]["ram_slots_per_layer"] == 3
    assert s["ram_misses"] > 0 and s["disk_bytes"] > 0 and s["disk_bytes_per_token"] > 0
    assert s["decode_tok_s"] > 0 and s["ttft_s"] > 0 and s["peak_rss_bytes"] > 0
    assert free["stats"]["experts"]["ram_slots_per_layer"] == SPEC.num_experts  # it fits: every expert


def test_run_with_a_cpu_mem_too_small_is_one_line_and_a_hint(ckpt):
    r = cli("run", "-m", ckpt, "--cpu-mem", 0.05, "hello")
    assert_refused(r, "the resident path needs", "--cpu-mem is 0.05 GiB", "use --cpu-mem")


def test_info_sizes_slots_from_the_quantization_config(tmp_path):
    """The real 397B config on the reference box's budgets: the FP8 release's quantization_config gives about
    2x the bf16 plan's RAM and GPU slots per layer, a compressed-tensors W4A16 g128 one about 3.9x."""
    from test_formats import CT_W4, FP8

    budgets = ["--device", "cuda", "--gpu-mem", 22.5, "--cpu-mem", 110, "--ctx", 8192]
    plans = {}
    for name, qc in [("bf16", None), ("fp8", FP8), ("w4", CT_W4)]:
        d = tmp_path / name
        d.mkdir()
        cfg = {**CONFIG_397B, **({"quantization_config": qc} if qc else {})}
        (d / "config.json").write_text(json.dumps(cfg))
        plans[name] = ok_json("info", "-m", d, *budgets)
    bf16, fp8, w4 = plans["bf16"], plans["fp8"], plans["w4"]
    # 74 RAM slots as the issue measured; 2 GPU slots, not 3: the 4096-token prefill block's buffers
    # (0.86 GiB) take what the third slot per layer had
    assert (bf16["gpu_slots"], bf16["cpu_slots"]) == (2, 74)
    assert fp8["expert_format"] == "fp8 block-128" and w4["expert_format"] == "int4 g128 symmetric"
    assert (
        1.9 <= fp8["cpu_slots"] / bf16["cpu_slots"] <= 2.1
        and 3.6 <= w4["cpu_slots"] / bf16["cpu_slots"] <= 4.0
    )

    def gpu_room(p: dict) -> float:  # GPU slots per layer the budget holds, before rounding down
        fixed = p["gpu_total"] - p["gpu_slots"] * p["moe_layers"] * p["expert_slot_bytes"]
        return (p["gpu_budget"] - fixed) / (p["moe_layers"] * p["expert_slot_bytes"])

    assert 1.9 <= gpu_room(fp8) / gpu_room(bf16) <= 2.1 and 3.6 <= gpu_room(w4) / gpu_room(bf16) <= 4.0
    assert w4["expert_slot_bytes"] < bf16["expert_slot_bytes"] / 3.8
    bad = {**CONFIG_397B, "quantization_config": {**CT_W4, "quant_method": "awq"}}
    (tmp_path / "config.json").write_text(json.dumps(bad))
    r = cli("info", "-m", tmp_path, *budgets)
    assert r.exit_code == 1 and "awq" in r.stderr and "Traceback" not in r.stderr
