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
from qwen35_lite.weights.fp8 import FP8_CONFIG, dequantize_block, dequantize_fp8

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def kernel_by_default(monkeypatch):
    """The FP8 CPU kernel is on by default where its fast path builds (experts/formats/fp8.py KERNEL_ENV)."""
    monkeypatch.delenv("QWEN35_LITE_FP8_CPU_KERNEL", raising=False)
    monkeypatch.delenv("QWEN35_LITE_NO_KERNELS", raising=False)


needs_kernel = pytest.mark.skipif(not fp8_cpu.available(256, 128), reason="no fast FP8 kernel: fallback only")
needs_cc = pytest.mark.skipif(fp8_cpu.library() is None, reason="no C compiler: fallback path only")
FINITE = [c for c in range(256) if c & 0x7F != 0x7F]  # every e4m3fn code but NaN (never in a checkpoint)


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


@needs_cc
@pytest.mark.parametrize("portable", [False, True], ids=["fast", "portable"])
def test_the_kernels_conversion_is_exact_on_every_code(portable):
    """W x with x one-hot reads one weight back: every e4m3fn code (subnormals, both signs, zeros) comes
    out as torch's dequantisation of it, scale included, in the fast (AVX512-BF16) and the plain-C path;
    the prefill's one-pass dequantisation gives the same bits as weights/fp8.py's."""
    fn = fp8_cpu.matvec_fn(portable)
    codes = torch.zeros(128 * 256, dtype=torch.uint8)
    codes[: len(FINITE)] = torch.tensor(FINITE, dtype=torch.uint8)
    w = codes.view(128, 256)[torch.randperm(128)].contiguous().view(torch.float8_e4m3fn)
    scale = torch.tensor([[0.75, 3.0]])
    want = dequantize_fp8(w, scale)
    got, scratch = torch.empty(256, 128), torch.empty(256)
    for j in range(256):
        x = torch.zeros(256)
        x[j] = 1.0
        fn(w.data_ptr(), scale.data_ptr(), 128, 256, x.data_ptr(), scratch.data_ptr(), got[j].data_ptr())
    assert torch.equal(got.T, want)
    assert torch.equal(fp8_cpu.dequantize_into(w, scale, torch.empty(128, 256)), dequantize_block(w, scale))


@needs_cc
@pytest.mark.parametrize("portable", [False, True], ids=["fast", "portable"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_equals_the_dequantised_reference(dtype, portable, monkeypatch):
    """Slots picked on the device (and from the host) through the kernel against each expert dequantised
    in fp32 and run by F.linear: to bf16's rounding (the fast path multiplies bf16 x and h)."""
    fmt = Fp8BlockFormat(256, 128, torch.bfloat16, torch.float8_e4m3fn, dequantise_on_use=True)
    if portable:
        fast = fp8_cpu.library()
        monkeypatch.setattr(fp8_cpu, "library", lambda: fp8_cpu.build(
            "fp8_portable", fp8_cpu.PORTABLE + fp8_cpu.SOURCE, "fp8_experts", fp8_cpu.ARGS
        ))  # fmt: skip
        assert fp8_cpu.library() is not fast
    fmt.cpu_kernel = True  # the class asks for the fast path; these slots run whichever library is set
    tier, raws, g = _fp8_tier(fmt, 8, seed=1)
    stack = tier.stacks[0]
    assert isinstance(stack, fp8_cpu.StackedFp8Cpu)
    for _ in range(3):
        x = torch.randn(1, 256, generator=g).to(dtype)
        slots = torch.randperm(8, generator=g)[:3]
        want = torch.cat([fp8_cpu.reference_ffn(x, raws[s]) for s in slots.tolist()])
        got = stack(x, slots)
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2 * float(want.abs().max()))
        assert torch.equal(stack.rows(x, slots.tolist()), got)


@needs_kernel
def test_prefill_rows_run_the_dequantised_expert_in_fp32():
    """A slot bound alone runs several rows (a prefill) as fp32 matmuls on the expert dequantised once
    (fp32 reference to bf16's output rounding, any row count across PREFILL_ROWS blocks) and one row by
    the kernel, as the layer's stack does."""
    fmt = Fp8BlockFormat.build(256, 128, CPU, torch.bfloat16, torch.float8_e4m3fn)
    assert fmt.cpu_kernel and fmt.uses_cpu_kernel
    tier, raws, g = _fp8_tier(fmt, 4, seed=2)
    expert = tier.experts[0][2]
    for T in (2, fp8_cpu.PREFILL_ROWS + 5):
        x = torch.randn(T, 256, generator=g).bfloat16()
        want = fp8_cpu.reference_ffn(x, raws[2])
        rows = expert(x)
        assert rows.dtype == torch.bfloat16 and rows.shape == (T, 256)
        torch.testing.assert_close(rows.float(), want, rtol=1e-2, atol=1e-3 * float(want.abs().max()))
    one = torch.randn(1, 256, generator=g).bfloat16()
    assert torch.equal(expert(one), tier.stacks[0](one, torch.tensor([2])))


def test_prefill_memory_is_the_fp32_expert_and_one_row_block():
    """The plan's prefill_expert for the kernel: the fp32 weights (12 bytes a gate/up/down element) and a
    PREFILL_ROWS block's fp32 temporaries, not the bf16 copies and conversion passes of the torch path."""
    fmt = Fp8BlockFormat(4096, 1024, torch.bfloat16, torch.float8_e4m3fn, dequantise_on_use=True)
    fmt.cpu_kernel = True
    D, I = 4096, 1024
    assert fmt.prefill_nbytes() == 12 * D * I + fp8_cpu.PREFILL_ROWS * (2 * D + 4 * I) * 4
    fmt.cpu_kernel = False
    assert fmt.prefill_nbytes() > 20 * D * I  # the torch path: fp32 and bf16 copies, concatenated


def test_cpu_slots_hold_fp8_bytes_with_the_kernel_and_bf16_without(monkeypatch):
    bf16 = DenseFormat(4096, 1024, torch.bfloat16, torch.bfloat16, fused=False)
    fmt = Fp8BlockFormat.build(4096, 1024, CPU, torch.bfloat16, torch.float8_e4m3fn)
    if fp8_cpu.available(4096, 1024):
        assert fmt.direct and bf16.slot_nbytes / fmt.slot_nbytes >= 1.99
    # fp32 compute keeps the exact path: dequantised into the cache
    assert not Fp8BlockFormat.build(4096, 1024, CPU, torch.float32, torch.float8_e4m3fn).direct
    # turned off: the path before, bf16 slots
    monkeypatch.setenv("QWEN35_LITE_FP8_CPU_KERNEL", "0")
    off = Fp8BlockFormat.build(4096, 1024, CPU, torch.bfloat16, torch.float8_e4m3fn)
    assert not off.direct and off.slot_nbytes == bf16.slot_nbytes
    monkeypatch.delenv("QWEN35_LITE_FP8_CPU_KERNEL")
    # no compiler (or a failed build): the same
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
