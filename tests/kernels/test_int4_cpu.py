"""The C int4 kernel (kernels/int4_cpu.py) against the reference, each of its paths: the AVX512-BF16 one
(where the CPU has it) and the plain-C one (built with QL_PORTABLE), and the torch fallback without a
compiler. Reference: the weight dequantised as compressed-tensors does, then x @ Wᵀ in fp32."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import assert_near, random_packed

from qwen35_lite.kernels import Int4Kernel, compact, int4_cpu, linear
from qwen35_lite.kernels.int4 import torch_matmul

BF16, F32 = torch.bfloat16, torch.float32

# (N, K, group, symmetric): N off whole 64-row blocks, K several groups, each group size the kernel takes
SHAPES = [(96, 256, 32, True), (200, 512, 64, False), (64, 512, 128, False), (130, 1024, 256, True)]


@pytest.fixture(params=["fast", "portable"])
def path(request, monkeypatch):
    """The library built one way or the other (skipped where it does not build, or where the CPU has no
    fast path to test)."""
    monkeypatch.setattr(int4_cpu, "PORTABLE", request.param == "portable")
    if int4_cpu.matvec_library() is None:
        pytest.skip("no C compiler: torch's kernel only")
    if request.param == "fast" and not int4_cpu.fast_path():
        pytest.skip("no AVX512-BF16 + VBMI on this CPU")
    return request.param


def _weight(n: int, k: int, group: int, symmetric: bool, seed: int = 0):
    pw, _ = random_packed(4, n, k, group, symmetric, seed=seed)
    w = compact(pw, "cpu", BF16)
    assert isinstance(w, Int4Kernel) and w.weight.shape[0] % 64 == 0
    return pw, w


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}-g{s[2]}-{'sym' if s[3] else 'asym'}")
@pytest.mark.parametrize("rows", [1, 3, 6])
def test_matvec_equals_the_dequantised_linear(path, shape, rows):
    """A few rows (four at a time and the rest) through the C kernel: within bf16 rounding of the output
    of compressed-tensors' weights times x in fp32, and as close to torch's int4 kernel."""
    n, k, group, symmetric = shape
    pw, w = _weight(n, k, group, symmetric, seed=rows)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)).to(BF16)
    want = x.float() @ pw.dequantize(F32).T
    y = int4_cpu.matvec(x, w.weight, w.table, n)
    assert y.shape == (rows, n) and y.dtype == BF16
    assert_near(y, want, rel=1e-2)
    assert_near(y, torch_matmul(x, w.weight, w.table, n), rel=1e-2)
    assert torch.equal(linear(x, w), y)  # the resident layer's decode rows run it


def test_both_paths_agree(monkeypatch):
    """The fast and the plain-C path sum the same products in other orders: fp32 apart, then rounded."""
    monkeypatch.setattr(int4_cpu, "PORTABLE", False)
    if not int4_cpu.fast_path():
        pytest.skip("no AVX512-BF16 + VBMI on this CPU")
    pw, w = _weight(256, 2048, 32, False)
    x = torch.randn(2, 2048, generator=torch.Generator().manual_seed(5)).to(BF16)
    fast = int4_cpu.matvec(x, w.weight, w.table, 256)
    monkeypatch.setattr(int4_cpu, "PORTABLE", True)
    portable = int4_cpu.matvec(x, w.weight, w.table, 256)
    assert_near(fast, portable, rel=8e-3)  # at most a bf16 rounding step of the largest output


def test_without_a_compiler_torchs_kernel_runs(monkeypatch):
    pw, w = _weight(96, 256, 32, False)
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(2)).to(BF16)
    monkeypatch.setattr(int4_cpu, "matvec_library", lambda: None)
    assert int4_cpu.matvec(x, w.weight, w.table, 96) is None
    assert torch.equal(linear(x, w), torch_matmul(x, w.weight, w.table, 96))


def test_calls_the_kernel_cannot_take_go_to_torch():
    """fp32 activations (or a table in another dtype) are not the C kernel's: `fits` says so."""
    _, w = _weight(64, 256, 32, True)
    assert int4_cpu.fits(torch.zeros(1, 256, dtype=BF16), w.weight, w.table)
    assert not int4_cpu.fits(torch.zeros(1, 256), w.weight, w.table)
    assert not int4_cpu.fits(torch.zeros(1, 256, dtype=BF16), w.weight, w.table.float())
