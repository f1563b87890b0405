"""The compact Linear encodings against their references on random inputs: the CPU int4 kernel, the int8
kernel and int8 as two int4 calls, each at a decode row (the kernel) and a prefill block (dequantised once,
then the dense GEMM), against compressed-tensors' dequantisation then F.linear; the exact encoding bit for
bit; what the plan counts equal to what is held; the fallbacks where a kernel's constraints do not hold."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_helpers import assert_near, random_packed

from qwen35_lite.kernels import (
    Int4Kernel,
    Int8Group,
    Int8Kernel,
    Int8Split,
    PackedWeight,
    compact,
    compact_nbytes,
    int8_cpu,
    linear,
)
from qwen35_lite.kernels.base import GEMM_ROWS
from qwen35_lite.weights.packed import UNPACK, dequantize

BF16, F32 = torch.bfloat16, torch.float32
INT8_OTHER = Int8Group if int8_cpu.library() is not None else Int8Split  # without a compiler: two int4 calls

# (bits, N, K, group or None for a scale per row, symmetric) -> the encoding compact picks on a bf16 CPU
CASES = [
    ((4, 128, 256, 32, True), Int4Kernel),
    ((4, 96, 512, 128, False), Int4Kernel),  # N padded to whole 64-row blocks
    ((4, 64, 256, None, False), Int4Kernel),  # a scale per row, repeated over groups of 256
    ((8, 64, 256, None, True), Int8Kernel),
    ((8, 80, 256, 32, False), INT8_OTHER),
    ((8, 64, 512, 64, True), INT8_OTHER),
    ((8, 48, 256, None, False), INT8_OTHER),
]


def _ids(case):
    (bits, n, k, g, sym), _ = case
    return f"int{bits}-{n}x{k}-{'g' + str(g) if g else 'row'}-{'sym' if sym else 'asym'}"


@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest.mark.parametrize("rows", [1, 3, GEMM_ROWS + 8])
def test_a_kernel_computes_the_dequantised_linear(case, rows):
    """Decode rows run the kernel, a prefill block dequantises once: both within bf16 rounding of
    compressed-tensors' weights times x in fp32."""
    (bits, n, k, g, sym), kind = case
    pw, _ = random_packed(bits, n, k, g, sym, seed=rows)
    w = compact(pw, "cpu", BF16)
    assert type(w) is kind
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(1)).to(BF16)
    want = x.float() @ pw.dequantize(F32).T
    y = linear(x, w)
    assert y.shape == (rows, n) and y.dtype == BF16
    assert_near(y, want)
    assert_near(w.reference(x), want)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_a_kernel_encoding_holds_the_weights_compressed_tensors_gives(case):
    """dequantize (what a prefill block runs) is the stored weight in bf16 bit for bit where the scales
    make it so (symmetric: (u - 8)·s rounded once is q·s rounded once), within bf16 rounding of the folded
    zero points otherwise."""
    (bits, n, k, g, sym), _ = case
    pw, _ = random_packed(bits, n, k, g, sym)
    w = compact(pw, "cpu", BF16)
    want = pw.dequantize(BF16)
    if sym:
        assert torch.equal(w.dequantize(BF16), want)
    else:
        assert_near(w.dequantize(BF16), want, rel=1e-2)
    assert torch.equal(w.dequantize(F32, slice(16, 80)), w.dequantize(F32)[16:80])


@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest.mark.parametrize("device, dtype", [("cpu", BF16), ("cpu", F32), ("cuda", BF16)])
def test_the_plan_counts_what_is_held(case, device, dtype):
    (bits, n, k, g, sym), _ = case
    pw, _ = random_packed(bits, n, k, g, sym)
    held = compact(pw, device, dtype).nbytes  # built on the host, the same bytes on the device
    assert held == compact_nbytes(bits, g, sym, (n, k), device, dtype, BF16)


@pytest.mark.parametrize("scheme", [(4, 32, True), (4, None, False), (8, None, True), (8, 32, False)])
def test_the_exact_encoding_is_compressed_tensors_dequantisation_then_linear(scheme):
    """fp32 (and CUDA) keep the stored encoding: bit for bit what transformers + compressed-tensors compute."""
    bits, g, sym = scheme
    pw, stored = random_packed(bits, 64, 256, g, sym, scale_dtype=F32)
    assert compact(pw, "cpu", F32) is pw
    want_w = dequantize(
        UNPACK[bits],
        bits,
        stored["weight_packed"],
        stored["weight_scale"],
        stored.get("weight_zero_point"),
        F32,
        (64, 256),
    )
    assert torch.equal(pw.dequantize(F32), want_w)
    for rows in (1, 40):
        x = torch.randn(rows, 256)
        want = torch.mv(want_w, x[0]).unsqueeze(0) if rows == 1 else F.linear(x, want_w)
        assert torch.equal(linear(x, pw), want)


def test_a_weight_dequantised_in_row_blocks_equals_it_whole(monkeypatch):
    from qwen35_lite.kernels import base

    pw, _ = random_packed(4, 256, 256, 32, False, scale_dtype=F32)
    x = torch.randn(5, 256)
    whole = linear(x, pw)
    monkeypatch.setattr(base, "DEQUANT_ELEMS", 64 * 256)  # four blocks of 64 rows
    assert torch.equal(linear(x, pw), whole)
    w = compact(pw, "cpu", BF16)
    xb = torch.randn(GEMM_ROWS, 256).to(BF16)
    monkeypatch.setattr(base, "DEQUANT_ELEMS", 1 << 22)
    whole = linear(xb, w)
    monkeypatch.setattr(base, "DEQUANT_ELEMS", 64 * 256)
    assert torch.equal(linear(xb, w), whole)


@pytest.mark.parametrize(
    "scheme, why",
    [
        ((4, 96, 64, 16, True), "group 16: the kernel takes 32-256"),
        ((4, 64, 192, 96, True), "group 96: not a power of two"),
        ((4, 64, 48, None, True), "a scale per row: no group of 32-256 divides K = 48"),
        ((8, 64, 48, None, True), "int8 K = 48: not a multiple of 32 (and no C kernel)"),
        ((8, 64, 48, 24, True), "int8 groups of 24: neither int4 groups nor a multiple of 16"),
    ],
)
def test_where_a_kernel_does_not_fit_the_exact_encoding_runs(scheme, why, monkeypatch):
    bits, n, k, g, sym = scheme
    if bits == 8 and g is None:
        monkeypatch.setattr("qwen35_lite.kernels.choose.int8_c_library", lambda: None)
    pw, _ = random_packed(bits, n, k, g, sym)
    w = compact(pw, "cpu", BF16)
    assert w is pw, why
    x = torch.randn(2, k).to(BF16)
    assert torch.equal(linear(x, w), F.linear(x, pw.dequantize(BF16)))


def test_a_compact_weight_moves_and_rebuilds_over_other_tensors():
    pw, _ = random_packed(8, 64, 256, 32, False)
    w = compact(pw, "cpu", BF16)
    copies = {name: t.clone() for name, t in w.tensors().items()}
    split = {"high.weight", "high.table", "low.weight", "low.table"}
    assert set(copies) == (split if INT8_OTHER is Int8Split else {"q", "scale", "zero"})
    again = w.with_tensors(copies)
    x = torch.randn(1, 256).to(BF16)
    assert torch.equal(again(x), w(x)) and again.nbytes == w.nbytes


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("scheme", [(4, 128, True), (8, None, False)])
def test_on_cuda_a_packed_weight_runs_dequantised_per_call(scheme):
    bits, g, sym = scheme
    pw, _ = random_packed(bits, 256, 512, g, sym)
    w = compact(pw, "cuda", BF16).to("cuda")
    assert isinstance(w, PackedWeight) and w.device.type == "cuda"
    x = torch.randn(3, 512).to(BF16)
    assert_near(linear(x.cuda(), w).cpu(), x.float() @ pw.dequantize(F32).T)


def test_inside_dequantized_once_a_weight_is_dequantised_once_with_the_same_result(monkeypatch):
    """A prefill block's chunks (Qwen35Model.prefill): the first call dequantises (a block of rows at a
    time), the next ones reuse it; the results are those of each call dequantising for itself."""
    from qwen35_lite.kernels import base, dequantized_once

    pw, _ = random_packed(4, 256, 256, 32, True, scale_dtype=F32)
    w = compact(pw, "cpu", BF16)
    xs = [torch.randn(GEMM_ROWS + i, 256).to(BF16) for i in range(3)]
    want = [linear(x, w) for x in xs] + [linear(x.float(), pw) for x in xs]
    calls = []
    monkeypatch.setattr(base, "DEQUANT_ELEMS", 64 * 256)  # blocks of 64 rows
    for enc in (w, pw):
        original = type(enc).dequantize
        monkeypatch.setattr(
            type(enc), "dequantize", lambda self, *a, f=original: calls.append(1) or f(self, *a)
        )
    with dequantized_once():
        got = [linear(x, w) for x in xs] + [linear(x.float(), pw) for x in xs]
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert len(calls) == 2 * 4  # each weight once, as 4 blocks of 64 rows
    assert base._KEPT.weights is None  # dropped at the end
