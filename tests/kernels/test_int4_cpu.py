"""The C int4 kernel (kernels/int4_cpu.py) against the reference, each of its paths: AMX tiles (2-16 rows)
and AVX512-BF16 (where the CPU has them), the plain-C one (built with QL_PORTABLE), and the torch
fallback without a compiler. Reference: the weight dequantised as compressed-tensors does, then x @ Wᵀ in
fp32."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import assert_near, random_packed

from qwen35_lite.kernels import Int4Kernel, compact, int4_cpu, linear
from qwen35_lite.kernels.int4 import torch_matmul

BF16, F32 = torch.bfloat16, torch.float32

# (N, K, group, symmetric): N off whole 64-row blocks, K several groups, each group size the kernel takes
SHAPES = [(96, 256, 32, True), (200, 512, 64, False), (64, 512, 128, False), (130, 1024, 256, True)]


@pytest.fixture(params=["amx", "avx512", "portable"])
def path(request, monkeypatch):
    """The library built and run one way (skipped where it does not build, or where the CPU lacks the
    path to test)."""
    monkeypatch.setattr(int4_cpu, "PORTABLE", request.param == "portable")
    monkeypatch.setattr(int4_cpu, "AMX", request.param == "amx")
    if int4_cpu.matvec_library() is None:
        pytest.skip("no C compiler: torch's kernel only")
    fast, amx = int4_cpu.paths()
    if request.param == "avx512" and not fast or request.param == "amx" and not amx:
        pytest.skip(f"no {request.param} path on this CPU")
    return request.param


def _weight(n: int, k: int, group: int, symmetric: bool, seed: int = 0):
    pw, _ = random_packed(4, n, k, group, symmetric, seed=seed)
    w = compact(pw, "cpu", BF16)
    assert isinstance(w, Int4Kernel) and w.weight.shape[0] % 64 == 0
    return pw, w


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}-g{s[2]}-{'sym' if s[3] else 'asym'}")
@pytest.mark.parametrize("rows", [1, 3, 6, 17])
def test_matvec_equals_the_dequantised_linear(path, shape, rows):
    """A few rows (the vector paths four at a time and the rest, the tiles up to 16) through the C kernel: within bf16 rounding of the output
    of compressed-tensors' weights times x in fp32, and as close to torch's int4 kernel."""
    n, k, group, symmetric = shape
    pw, w = _weight(n, k, group, symmetric, seed=rows)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)).to(BF16)
    want = x.float() @ pw.dequantize(F32).T
    y = int4_cpu.matvec(x, w.weight, w.table, n)
    assert y.shape == (rows, n) and y.dtype == BF16
    assert_near(y, want, rel=1e-2)
    assert_near(y, torch_matmul(x, w.weight, w.table, n), rel=1e-2)
    assert torch.equal(linear(x, w), y)  # the resident layer's decode rows run it (PORTABLE selects it)


def test_the_paths_agree(monkeypatch):
    """The paths sum the same products in other orders: fp32 apart, then rounded to bf16."""
    if not int4_cpu.fast_path():
        pytest.skip("no AVX512-BF16 + VBMI on this CPU")
    pw, w = _weight(256, 2048, 32, False)
    x = torch.randn(2, 2048, generator=torch.Generator().manual_seed(5)).to(BF16)
    ys = []
    for portable, amx in [(False, True), (False, False), (True, False)]:
        monkeypatch.setattr(int4_cpu, "PORTABLE", portable)
        monkeypatch.setattr(int4_cpu, "AMX", amx)
        ys.append(int4_cpu.matvec(x, w.weight, w.table, 256))
    for y in ys[1:]:
        assert_near(y, ys[0], rel=8e-3)  # at most a bf16 rounding step of the largest output


def test_torchs_gemm_after_the_tiles_is_unchanged():
    """The tile path puts back each thread's tile configuration: torch's bf16 GEMM (oneDNN, AMX where
    there is one) gives the same bits before and after it."""
    if not int4_cpu.paths()[1]:
        pytest.skip("no AMX on this CPU")
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(64, 512, generator=g).to(BF16), torch.randn(256, 512, generator=g).to(BF16)
    before = torch.nn.functional.linear(a, b)
    _, w = _weight(256, 512, 32, True)
    int4_cpu.matvec(a[:4], w.weight, w.table, 256)
    assert torch.equal(torch.nn.functional.linear(a, b), before)


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


def test_without_the_fast_path_torchs_kernel_runs(monkeypatch):
    """The plain-C path is slower than torch's int4pack kernel where measured: a CPU without AVX512-BF16
    (here: the fast path reported absent) keeps torch's kernel for resident layers and experts."""
    if int4_cpu.matvec_library() is None:
        pytest.skip("no C compiler: torch's kernel only")
    monkeypatch.setattr(int4_cpu, "_paths", lambda portable: (False, False))
    assert not int4_cpu.selected() and int4_cpu.experts_library() is None
    pw, w = _weight(96, 256, 32, True)
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(9)).to(BF16)
    assert torch.equal(linear(x, w), torch_matmul(x, w.weight, w.table, 96))
