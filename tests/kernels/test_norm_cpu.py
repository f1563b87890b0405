"""The one-row RMSNorm and residual add (kernels/norm_cpu.py) against torch's form (model/layers.py:
rms_normalize, a LayerNorm of [x, −x], and the add before it) on random rows, and the layers taking it."""

from __future__ import annotations

import pytest
import torch

from qwen35_lite.kernels import norm_cpu
from qwen35_lite.model.fuse import norm_scale
from qwen35_lite.model.layers import add_rms_norm_1p, rms_norm_1p, rms_norm_1p_reference, rms_normalize

pytestmark = pytest.mark.skipif(norm_cpu.library() is None, reason="no C compiler")


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    else:  # the fp32 sum of squares runs in another order: a bf16 rounding may flip, rarely, by one step
        torch.testing.assert_close(got, want, rtol=2**-7, atol=1e-3)
        assert (got != want).sum() <= max(2, got.numel() // 100)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [1, 7, 96, 1024, 4096])
def test_add_and_norm_equal_torch(dtype, D):
    g = torch.Generator().manual_seed(D)
    scale = norm_scale(torch.randn(D, generator=g).to(dtype))  # (1 + w) in fp32, [2D]
    for _ in range(5):
        h, delta = (torch.randn(1, D, generator=g).mul(3).to(dtype) for _ in range(2))
        total, y = norm_cpu.add_rms_norm(h, delta, scale, 1e-6)
        assert torch.equal(total, h + delta)  # one rounding of the exact sum, as torch's add
        _close(y, rms_normalize(h + delta, 1e-6, scale))
        same, y = norm_cpu.add_rms_norm(h, None, scale, 1e-6)
        assert same is h
        _close(y, rms_normalize(h, 1e-6, scale))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layers_take_the_kernel_for_one_row_only(monkeypatch, dtype):
    calls = []
    real = norm_cpu.add_rms_norm
    monkeypatch.setattr(norm_cpu, "add_rms_norm", lambda *a: calls.append(a[1] is not None) or real(*a))
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, generator=g).to(dtype)
    h, delta = torch.randn(1, 64, generator=g).to(dtype), torch.randn(1, 64, generator=g).to(dtype)
    _close(rms_norm_1p(h, norm_scale(w), 1e-6), rms_norm_1p_reference(h, w, 1e-6))
    total, y = add_rms_norm_1p(h, delta, norm_scale(w), 1e-6)
    assert torch.equal(total, h + delta)
    _close(y, rms_norm_1p_reference(h + delta, w, 1e-6))
    assert calls == [False, True]
    rms_norm_1p(torch.randn(3, 64).to(dtype), norm_scale(w), 1e-6)  # a prefill's rows: torch's form
    assert calls == [False, True]
