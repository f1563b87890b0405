"""Norms, RoPE and the one-row linear against their written-out forms."""

from __future__ import annotations

import pytest
import torch

from qwen35_lite.model.fuse import norm_scale
from qwen35_lite.model.layers import (
    MRoPE,
    apply_rope_,
    apply_rope_reference,
    gated_rms_norm,
    gated_rms_norm_reference,
    rms_norm_1p,
    rms_norm_1p_reference,
    rms_normalize,
)


def _rms_inputs(dtype, D=256):
    g = torch.Generator().manual_seed(D)
    x = torch.randn(6, D, generator=g) * torch.tensor([1e-3, 0.1, 1.0, 10.0, 300.0, 1.0])[:, None]
    x[5, : D // 2] = 1e-6  # tiny entries beside large ones: the [x, -x] mean must not swamp them
    return (
        x.to(dtype),
        (torch.randn(D, generator=g) * 0.3).to(dtype),
        torch.randn(6, D, generator=g).to(dtype),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norms_equal_the_written_out_forms(dtype):
    x, w, gate = _rms_inputs(dtype)
    got, want = rms_norm_1p(x, norm_scale(w), 1e-6), rms_norm_1p_reference(x, w, 1e-6)
    got_g, want_g = gated_rms_norm(x, gate.float(), w, 1e-6), gated_rms_norm_reference(x, gate, w, 1e-6)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6)
        torch.testing.assert_close(got_g, want_g, rtol=2e-6, atol=1e-6)
    else:  # at most a flipped rounding, on few elements
        for a, b in ((got, want), (got_g, want_g)):
            torch.testing.assert_close(a, b, rtol=8e-3, atol=1e-5)
            assert (a != b).float().mean() < 0.01
    # off the CPU the input is normalised in fp32 and rounded once, as the CPU's mixed-dtype kernel does
    fp32_first = rms_normalize(x.float(), 1e-6, norm_scale(w)).to(dtype)
    torch.testing.assert_close(fp32_first, got, rtol=8e-3 if dtype == torch.bfloat16 else 1e-6, atol=1e-6)


def test_rope_in_place_has_the_bits_of_rotate_half():
    rope = MRoPE(32, 1e7, [6, 5, 5])
    positions = torch.stack([torch.arange(5, 12), torch.arange(7) * 2 % 7, torch.arange(7) % 3])
    cos, signed_sin = rope.cos_sin(positions, torch.bfloat16)
    freqs = positions[..., None].float() * rope.inv_freq  # transformers' order: [3, T, 16], then pick
    picked = freqs.gather(0, rope.row_of_slot.view(1, 1, -1).expand(1, 7, -1))[0]
    emb = torch.cat((picked, picked), dim=-1)
    assert torch.equal(cos, emb.cos().bfloat16())
    x = torch.randn(10, 7, 128, generator=torch.Generator().manual_seed(0)).bfloat16()
    want = apply_rope_reference(x, cos, emb.sin().bfloat16())
    apply_rope_(x, cos, signed_sin)
    assert torch.equal(x, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,K", [(3088, 1024), (8, 64), (32768, 256)])
def test_one_row_linear_equals_the_matmul(dtype, N, K):
    """layers.linear runs one row through torch.mv (faster on the CPU): the same sums as F.linear up to
    their order (bit-identical on the machines measured; a tolerance, CPUs differ)."""
    from qwen35_lite.model.layers import linear

    g = torch.Generator().manual_seed(N)
    w, x = torch.randn(N, K, generator=g).to(dtype), torch.randn(3, K, generator=g).to(dtype)
    want = torch.nn.functional.linear(x, w)
    assert torch.equal(linear(x, w), want)  # several rows: the matmul itself
    eps = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(linear(x[1:2], w), want[1:2], atol=eps * float(want.abs().max()), rtol=eps)
