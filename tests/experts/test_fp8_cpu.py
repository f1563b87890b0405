"""FP8 experts kept FP8 in CPU slots and run by the C kernel (experts/formats/fp8_cpu.py) against the
torch reference beside it, the slots it saves, and the fallback without a compiler."""

from __future__ import annotations

import json

import pytest
import torch
from test_info_bench import ok_json
from test_plan import CONFIG_397B

from qwen35_lite.experts.formats import DenseFormat, Fp8BlockFormat, fp8_cpu
from qwen35_lite.experts.slots import SlotTier
from qwen35_lite.weights.fp8 import FP8_CONFIG

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def kernel_asked_for(monkeypatch):
    """The FP8 CPU kernel is opt-in (experts/formats/fp8.py KERNEL_ENV): these tests ask for it."""
    monkeypatch.setenv("QWEN35_LITE_FP8_CPU_KERNEL", "1")


needs_kernel = pytest.mark.skipif(not fp8_cpu.available(256, 128), reason="no C compiler: fallback path only")


def _fp8_tier(fmt, E: int, seed: int):
    """E FP8 slots of random bytes (every e4m3 code but NaN: subnormals, both signs) and block scales."""
    tier = SlotTier("ram", fmt, 1, E, lambda: None, lambda n: torch.empty(n, dtype=torch.uint8))
    g = torch.Generator().manual_seed(seed)
    raws = []
    for s in range(E):
        views = fmt.raw_views(tier.pools[0].slots[s])
        for part, view in zip(fmt.raw, views):
            if part.dtype == torch.float8_e4m3fn:
                codes = torch.randint(0, 254, part.shape, generator=g, dtype=torch.int32)
                codes += (codes >= 0x7F).int()  # skip 0x7F: 0..0x7E, 0x80..0xFE
                view.view(torch.uint8).copy_(codes.to(torch.uint8))
            else:
                view.copy_(torch.rand(part.shape, generator=g) / 256 + 1e-4)
        raws.append(views)
    return tier, raws, g


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_equals_the_dequantised_reference(dtype):
    """Slots picked on the device (and from the host) through the kernel against each expert dequantised
    in fp32 and run by F.linear: fp32 input to rounding, bf16 input to bf16's."""
    fmt = Fp8BlockFormat(256, 128, torch.bfloat16, torch.float8_e4m3fn, dequantise_on_use=True)
    assert fmt.cpu_kernel and fmt.uses_cpu_kernel
    tier, raws, g = _fp8_tier(fmt, 8, seed=1)
    stack = tier.stacks[0]
    assert isinstance(stack, fp8_cpu.StackedFp8Cpu)
    eps = 1e-5 if dtype == torch.float32 else 1e-2
    for _ in range(3):
        x = torch.randn(1, 256, generator=g).to(dtype)
        slots = torch.randperm(8, generator=g)[:3]
        want = torch.cat([fp8_cpu.reference_ffn(x, raws[s]) for s in slots.tolist()])
        got = stack(x, slots)
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), want, rtol=eps, atol=eps * float(want.abs().max()))
        assert torch.equal(stack.rows(x, slots.tolist()), got)


@needs_kernel
def test_bound_expert_and_prefill_rows_use_the_same_numbers():
    """A slot bound alone (prefill's rows) dequantises the expert once a call; its output agrees with the
    kernel's on the same token."""
    fmt = Fp8BlockFormat.build(256, 128, CPU, torch.bfloat16, torch.float8_e4m3fn)
    tier, raws, g = _fp8_tier(fmt, 4, seed=2)
    x = torch.randn(5, 256, generator=g).bfloat16()
    rows = tier.experts[0][2](x)
    kernel = tier.stacks[0](x[:1], torch.tensor([2]))
    torch.testing.assert_close(
        rows[:1].float(), kernel.float(), rtol=2e-2, atol=2e-2 * float(kernel.abs().max())
    )


def test_cpu_slots_hold_fp8_bytes_with_the_kernel_and_bf16_without(monkeypatch):
    bf16 = DenseFormat(4096, 1024, torch.bfloat16, torch.bfloat16, fused=False)
    fmt = Fp8BlockFormat.build(4096, 1024, CPU, torch.bfloat16, torch.float8_e4m3fn)
    if fp8_cpu.available(4096, 1024):
        assert fmt.direct and bf16.slot_nbytes / fmt.slot_nbytes >= 1.99
    # fp32 compute keeps the exact path: dequantised into the cache
    assert not Fp8BlockFormat.build(4096, 1024, CPU, torch.float32, torch.float8_e4m3fn).direct
    # no compiler (or a failed build): the path before, bf16 slots
    monkeypatch.setattr(fp8_cpu, "library", lambda: None)
    fallback = Fp8BlockFormat.build(4096, 1024, CPU, torch.bfloat16, torch.float8_e4m3fn)
    assert not fallback.direct and fallback.slot_nbytes == bf16.slot_nbytes
    assert not fp8_cpu.available(4096, 1024) and not fp8_cpu.fits(200, 128)


@needs_kernel
def test_info_on_the_397b_fp8_config_counts_fp8_slots(tmp_path):
    """The plan sizes CPU slots from the format: an FP8 checkpoint gets ~2x the RAM slots of bf16."""
    budgets = ["--device", "cpu", "--dtype", "bfloat16", "--cpu-mem", 110, "--ctx", 8192]
    plans = {}
    for name, qc in [("bf16", None), ("fp8", FP8_CONFIG)]:
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(
            json.dumps({**CONFIG_397B, **({"quantization_config": qc} if qc else {})})
        )
        plans[name] = ok_json("info", "-m", d, *budgets)
    assert "CPU FP8 kernel" in plans["fp8"]["expert_format"]
    assert plans["fp8"]["cpu_slots"] / plans["bf16"]["cpu_slots"] >= 1.8


def test_a_kernel_that_cannot_be_built_is_none(monkeypatch, tmp_path):
    """No compiler, or a source that does not compile: None, and the callers take their torch path."""
    from qwen35_lite.kernels.cbuild import build

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert build("broken", "this is not C;", "f", ("p",)) is None
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    assert build("fine", "void f(void* p) {}", "f", ("p",)) is None
    monkeypatch.setenv("QWEN35_LITE_NO_KERNELS", "1")
    monkeypatch.delenv("CC")
    assert build("off", "void f(void* p) {}", "f", ("p",)) is None
