"""Fusing projections with packed parts (kernels.fuse_rows, as model/fuse.py calls it): parts of one scheme
become one weight (their packed rows concatenated), parts held differently run one after the other, and
either way the fused weight computes what the parts compute, in the exact and the kernel encodings."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import random_packed

from qwen35_lite.kernels import PackedWeight, RowBlocks, compact, fuse_rows, linear

BF16, F32 = torch.bfloat16, torch.float32


def _unfused(x: torch.Tensor, parts) -> torch.Tensor:
    return torch.cat([linear(x, p) for p in parts], dim=-1)


@pytest.mark.parametrize("scheme", [(4, 32, True), (4, None, False), (8, None, True), (8, 64, False)])
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_parts_of_one_scheme_fuse_into_one_weight_that_equals_them(scheme, dtype):
    bits, g, sym = scheme
    parts = [random_packed(bits, n, 256, g, sym, seed=i)[0] for i, n in enumerate((128, 64, 192))]
    fused = fuse_rows(parts)
    assert isinstance(fused, PackedWeight) and fused.shape == (384, 256)
    assert torch.equal(fused.dequantize(F32), torch.cat([p.dequantize(F32) for p in parts]))
    run = compact(fused, "cpu", dtype)
    ran = [compact(p, "cpu", dtype) for p in parts]
    for rows in (1, 40):
        x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows)).to(dtype)
        assert torch.equal(linear(x, run), _unfused(x, ran))


def test_parts_held_differently_fuse_into_runs_called_in_turn():
    """The community recipe: DeltaNet's in_proj_qkv and z packed, in_proj_b and a kept bf16."""
    qkv, _ = random_packed(4, 192, 256, 32, True, seed=1)
    z, _ = random_packed(4, 64, 256, 32, True, seed=2)
    b, a = torch.randn(16, 256).to(BF16), torch.randn(16, 256).to(BF16)
    other, _ = random_packed(4, 64, 256, 64, True, seed=3)  # another group size: its own run
    fused = fuse_rows([qkv, z, b, a, other])
    assert isinstance(fused, RowBlocks) and fused.shape == (352, 256)
    assert [type(p) for p in fused.parts] == [PackedWeight, torch.Tensor, PackedWeight]
    assert fused.parts[0].shape == (256, 256) and fused.parts[1].shape == (32, 256)
    run = compact(fused, "cpu", BF16)
    ran = [compact(p, "cpu", BF16) for p in (qkv, z, b, a, other)]
    for rows in (1, 40):
        x = torch.randn(rows, 256).to(BF16)
        assert torch.equal(linear(x, run), _unfused(x, ran))
    # its tensors listed and rebuilt (a spilled layer's views)
    again = run.with_tensors({k: v.clone() for k, v in run.tensors().items()})
    x = torch.randn(1, 256).to(BF16)
    assert torch.equal(again(x), run(x)) and again.nbytes == run.nbytes


def test_dense_parts_still_fuse_by_concatenation():
    parts = [torch.randn(8, 16), torch.randn(4, 16)]
    fused = fuse_rows(parts)
    assert isinstance(fused, torch.Tensor) and torch.equal(fused, torch.cat(parts))
