"""The int8 C kernel (kernels/int8_cpu.py) against dequantise-then-F.linear on random weights: symmetric and
asymmetric, a scale a row or per group, odd shapes, a decode row and a few, its AVX-512 path and its plain-C
path; and the encodings that use it (Int8Kernel, Int8Group) against torch's kernel and the two-int4 split."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import random_packed

from qwen35_lite.kernels import Int8Group, Int8Kernel, Int8Split, compact, int8_cpu, linear

BF16 = torch.bfloat16
pytestmark = pytest.mark.skipif(int8_cpu.library() is None, reason="no C compiler: torch's kernels run")

# (N, K, groups, asymmetric): odd rows (tails of the 4-row blocks), K not a multiple of 16 (masked tails)
SHAPES = [
    (37, 100, 1, False),
    (5, 48, 1, True),
    (130, 512, 8, False),
    (66, 256, 4, True),
    (9, 1040, 65, True),
]


def random_weight(n: int, k: int, groups: int, asym: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    scale = (torch.rand(n, groups, generator=g) * 0.01 + 1e-3).to(BF16)
    zero = torch.randint(-128, 128, (n, groups), dtype=torch.int8, generator=g) if asym else None
    return q, scale, zero


def reference(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None
) -> torch.Tensor:
    n, k = q.shape
    groups = scale.shape[1]
    w = q.float().view(n, groups, -1)
    if zero is not None:
        w = w - zero.float()[..., None]
    return x.float() @ (w * scale.float()[..., None]).view(n, k).T


def assert_close_rel(y: torch.Tensor, want: torch.Tensor) -> None:
    """fp32 sums in another order, then one bf16 rounding of each output: within bf16's precision of the
    output's norm (any CPU, any summation order)."""
    assert y.shape == want.shape and y.dtype == BF16
    assert (y.float() - want).norm() <= 8e-3 * want.norm()
    assert (y.float() - want).abs().max() <= 2e-2 * want.abs().max()


@pytest.mark.parametrize("portable", [False, True], ids=["fast", "portable"])
@pytest.mark.parametrize("rows", [1, 3, 6, 37])  # 37: more token rows than a pass takes (32)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}-G{s[2]}-{'asym' if s[3] else 'sym'}")
def test_the_kernel_computes_the_dequantised_linear(shape, rows, portable):
    n, k, groups, asym = shape
    if portable and int8_cpu.library(portable=True) is None:
        pytest.skip("the plain-C build failed")
    q, scale, zero = random_weight(n, k, groups, asym, seed=rows)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows + 1)).to(BF16)
    y = int8_cpu.int8_linear(x, q, scale, zero, portable=portable)
    assert_close_rel(y, reference(x, q, scale, zero))


def test_fast_and_portable_paths_agree_and_a_scale_a_row_equals_torchs_kernel():
    q, scale, _ = random_weight(200, 1024, 1, False, seed=5)
    x = torch.randn(2, 1024, generator=torch.Generator().manual_seed(6)).to(BF16)
    fast = int8_cpu.int8_linear(x, q, scale)
    assert_close_rel(fast, int8_cpu.int8_linear(x, q, scale, portable=True).float())
    assert_close_rel(fast, torch.ops.aten._weight_int8pack_mm(x, q, scale.view(-1)).float())


def test_int8_kernel_runs_the_c_kernel_and_falls_back_to_torchs(monkeypatch):
    pw, _ = random_packed(8, 64, 256, None, True)
    w = compact(pw, "cpu", BF16)
    assert isinstance(w, Int8Kernel)
    x = torch.randn(1, 256).to(BF16)
    c = linear(x, w)
    assert_close_rel(c, w.reference(x).float())
    monkeypatch.setattr(int8_cpu, "library", lambda portable=False: None)
    torch_kernel = linear(x, w)
    assert torch.equal(torch_kernel, torch.ops.aten._weight_int8pack_mm(x, w.q, w.scale))
    assert_close_rel(c, torch_kernel.float())


@pytest.mark.parametrize("group, sym", [(32, False), (64, True), (None, False)])
def test_without_the_c_kernel_group_int8_runs_as_two_int4_calls(group, sym, monkeypatch):
    """The same weights as Int8Group and as Int8Split (what runs without a compiler): the same outputs
    within bf16 rounding."""
    pw, _ = random_packed(8, 96, 256, group, sym, seed=3)
    fast = compact(pw, "cpu", BF16)
    assert isinstance(fast, Int8Group)
    monkeypatch.setattr("qwen35_lite.kernels.choose.int8_c_library", lambda: None)
    split = compact(pw, "cpu", BF16)
    assert isinstance(split, Int8Split)
    x = torch.randn(2, 256, generator=torch.Generator().manual_seed(4)).to(BF16)
    assert_close_rel(fast(x), split(x).float())
    assert torch.equal(fast.dequantize(BF16), pw.dequantize(BF16))


def test_without_avx512_the_kernels_are_not_used(monkeypatch):
    """The plain-C path is ~14x slower than torch's `_weight_int8pack_mm` where measured: a CPU without
    the AVX-512 path keeps torch's kernel for resident layers and experts."""
    from qwen35_lite.experts.formats import int8_cpu as experts_int8

    if int8_cpu.library() is None:
        pytest.skip("no C compiler or no AVX-512: torch's kernel only")
    monkeypatch.setattr(int8_cpu, "fast_path", lambda: False)
    int8_cpu.library.cache_clear()
    try:
        assert int8_cpu.library() is None and experts_int8.library() is None
        assert int8_cpu.library(portable=True) is not None  # still built for its tests
    finally:
        int8_cpu.library.cache_clear()
