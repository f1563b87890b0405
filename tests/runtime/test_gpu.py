"""CUDA paths: parity with transformers on the GPU, the GPU budget measured from outside the process,
and tokens that do not depend on the cache sizes or on prefetch. Skipped where no GPU is visible."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import greedy
from hf_reference import SHAPES, load_reference
from test_budget import BIG

from qwen35_lite.convert.synthetic import write_checkpoint
from qwen35_lite.experts.cache import TieredExperts, UncachedExperts
from qwen35_lite.experts.store import ExpertStore
from qwen35_lite.model.qwen35 import Qwen35Model
from qwen35_lite.plan.memory import GiB
from qwen35_lite.weights.checkpoint import Checkpoint
from qwen35_lite.weights.config import load_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
CUDA = torch.device("cuda")
ROOT = Path(__file__).resolve().parents[2]


def _prompt(seed: int, n: int) -> torch.Tensor:
    return torch.randint(0, 248000, (n,), generator=torch.Generator().manual_seed(seed))


def _load(path: Path, dtype: torch.dtype, provider_factory=UncachedExperts, **kw) -> Qwen35Model:
    cfg, ckpt = load_config(path), Checkpoint(path)
    provider = None
    if cfg.is_moe:
        provider = provider_factory(ExpertStore(ckpt, cfg.text), CUDA, dtype, **kw)
    return Qwen35Model.load(ckpt, cfg.text, provider, CUDA, dtype)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_cuda_fp32_matches_transformers(hf_checkpoint, shape):
    path = hf_checkpoint(shape)
    ref, ours = load_reference(path, torch.float32), _load(path, torch.float32)
    ids = _prompt(1, 150)  # crosses the DeltaNet chunk size twice
    with torch.no_grad():
        ref_logits = ref(input_ids=ids[None]).logits[0]
    our_logits = ours.forward(ours.make_cache(), ids, all_logits=True).cpu()
    torch.testing.assert_close(our_logits, ref_logits, atol=2e-4, rtol=0)
    with torch.no_grad():
        ref_out = ref.generate(ids[None], max_new_tokens=16, min_new_tokens=16, do_sample=False)
    assert greedy(ours, ids, 16)[0] == ref_out[0, 150:].tolist()


@pytest.mark.parametrize("gpu_slots,cpu_slots", [(1, 1), (3, 2), (8, 8)])
@pytest.mark.parametrize("lookahead", [False, True])
def test_every_cache_size_and_prefetch_give_the_uncached_tokens(
    hf_checkpoint, gpu_slots, cpu_slots, lookahead
):
    path = hf_checkpoint("moe_ratio2_gqa2")
    ids = _prompt(3, 150)
    want = greedy(_load(path, torch.float32), ids, 12)[0]
    model = _load(
        path, torch.float32, TieredExperts, gpu_slots=gpu_slots, cpu_slots=cpu_slots, prefetch=lookahead
    )
    assert greedy(model, ids, 12)[0] == want
    stats = model.provider.stats()
    assert stats["gpu_misses"] > 0 and stats["bytes_to_gpu"] > 0


@pytest.mark.parametrize("gpu_slots,cpu_slots", [(2, 8), (5, 12)])
def test_cpu_computed_misses_give_the_copied_tokens(hf_checkpoint, gpu_slots, cpu_slots):
    """CPU and GPU together: GPU misses computed by the CPU from RAM slots (compute_in_place) give the
    tokens of every miss copied to the GPU, in fp32; and no slot-map or routing read beyond one per layer."""
    path = hf_checkpoint("moe_ratio2_gqa2")
    ids = _prompt(4, 150)
    want = greedy(_load(path, torch.float32), ids, 12)[0]
    model = _load(
        path, torch.float32, TieredExperts, gpu_slots=gpu_slots, cpu_slots=cpu_slots, prefetch=False
    )
    model.provider.compute_in_place = True
    assert greedy(model, ids, 12)[0] == want
    assert model.provider.stats()["experts_on_cpu"] > 0


def test_rates_are_measured_on_the_gpu(hf_checkpoint):
    from qwen35_lite.experts.rates import measure_rates

    path = hf_checkpoint("moe_ratio2_gqa2")
    model = _load(path, torch.bfloat16, TieredExperts, gpu_slots=2, cpu_slots=8)
    model.provider.preload()
    rates = measure_rates(model.provider)
    assert rates.cpu_s > 0 and rates.copy_s > 0


def test_resident_decode_reads_only_the_token(hf_checkpoint):
    """Every expert on the GPU: slots picked on the device, one host read per token (the id)."""
    from qwen35_lite.runtime.op_profile import profile_decode

    path = hf_checkpoint("moe_ratio2_gqa2")
    model = _load(path, torch.bfloat16, TieredExperts, gpu_slots=10**6, cpu_slots=1)
    model.provider.preload()
    prof = profile_decode(model, list(range(100, 140)), tokens=4)
    assert prof["host_reads_per_token"] == 1


# ---- the GPU budget, sampled from outside -------------------------------------------------------------


# 8 layers x 256 experts x 1.5 MiB = 3 GiB of experts; the real vocabulary, so any prompt tokenises
GPU_BIG = dataclasses.replace(BIG, num_experts=256, vocab_size=248320)


@pytest.fixture(scope="module")
def big_checkpoint(module_tmp) -> Path:
    return write_checkpoint(module_tmp("gpu-big") / "ck", GPU_BIG, dtype=torch.bfloat16, shard_bytes=1 << 30)


def _gpu_used_by(pid: int) -> int | None:
    out = subprocess.run(
        ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
    ).stdout
    for line in out.splitlines():
        p, used = (x.strip() for x in line.split(","))
        if p == str(pid):
            return int(used) << 20
    return None


def _run_sampled(model: Path, *flags: str) -> tuple[dict, int]:
    """`qwen35-lite run --json` on the GPU in a subprocess; its JSON and its peak GPU memory (nvidia-smi)."""
    args = [sys.executable, str(ROOT / "cli.py"), "run", "-m", str(model), "--device", "cuda", "--raw"]
    args += ["--temperature", "0", "--max-new-tokens", "12", "--json", *flags, "The weather today is " * 40]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        used = _gpu_used_by(proc.pid)
        peak = max(peak, used or 0)
        time.sleep(0.05)
    out, err = proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1]), peak


@pytest.mark.skipif(shutil.which("nvidia-smi") is None, reason="needs nvidia-smi to sample GPU memory")
@pytest.mark.parametrize(
    "extra", [(), ("--gpu-experts", "1", "--cpu-experts", "1")], ids=["plan", "one-slot"]
)
def test_gpu_run_stays_within_gpu_mem_and_decodes_the_same_tokens(big_checkpoint, extra):
    expert_bytes = sum(f.stat().st_size for f in big_checkpoint.glob("*.safetensors"))
    budget = 2.0  # GiB, of which ~1 GiB is the CUDA context: the experts get about a quarter of theirs
    want, _ = _run_sampled(big_checkpoint, "--gpu-experts", str(GPU_BIG.num_experts))
    got, peak = _run_sampled(big_checkpoint, "--gpu-mem", str(budget), *extra)
    assert got["tokens"] == want["tokens"]
    assert got["prompt_ids"] == want["prompt_ids"]
    stats = got["stats"]  # this reply's counters
    assert stats["gpu_misses"] > 0 and stats["gpu_bytes"] > 0
    assert 0 < peak <= budget * GiB * 1.05, (peak / GiB, budget)
    assert stats["peak_gpu_bytes"] <= budget * GiB
    assert expert_bytes > budget * GiB
