"""Fast kernels against the simple versions kept beside them: bit-identical on the CPU where the order of
the arithmetic is the same, within fp32 rounding where it is not."""

from __future__ import annotations

import pytest
import torch

from qwen35_lite.experts.formats import DenseExpert
from qwen35_lite.model.attention import _attend, _attend_reference
from qwen35_lite.model.deltanet import (
    causal_conv,
    causal_conv_reference,
    decode_gated_delta_rule,
    l2norm,
    recurrent_gated_delta_rule,
)
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
from qwen35_lite.model.moe import dispatch_decode, dispatch_grouped, dispatch_reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", [(8, 2, 128), (4, 1, 16), (4, 4, 32)])
@pytest.mark.parametrize("T,past", [(1, 0), (1, 37), (32, 0), (70, 0), (5, 40), (64, 512)])
def test_gqa_attention_equals_expanded_kv(dtype, heads, T, past):
    H, Hkv, hd = heads
    g = torch.Generator().manual_seed(T + past)
    q = torch.randn(H, T, hd, generator=g).to(dtype)
    k, v = (torch.randn(Hkv, past + T, hd, generator=g).to(dtype) for _ in range(2))
    assert torch.equal(_attend(q, k, v, past), _attend_reference(q, k, v, past))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("C,T", [(96, 5), (2048, 32), (3072, 70), (512, 512)])
def test_fp32_causal_conv_equals_model_dtype_conv(dtype, C, T):
    g = torch.Generator().manual_seed(C + T)
    window = torch.randn(C, 3 + T, generator=g).to(dtype)
    weight = (torch.randn(C, 1, 4, generator=g) * 0.5).to(dtype)
    assert torch.equal(causal_conv(window, weight), causal_conv_reference(window, weight))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("E,A,D,I", [(16, 4, 64, 32), (512, 10, 256, 64)])
def test_decode_dispatch_equals_grouped(dtype, E, A, D, I):
    g = torch.Generator().manual_seed(E + A)
    experts = {
        e: DenseExpert(torch.randn(2 * I, D, generator=g).to(dtype), torch.randn(D, I, generator=g).to(dtype))
        for e in range(E)
    }
    for step in range(20):
        x = torch.randn(1, D, generator=g).to(dtype)
        ids = torch.randperm(E, generator=g)[:A][None]  # [1, A] distinct, in router (not id) order
        weights = torch.rand(1, A, generator=g)
        weights = (weights / weights.sum()).to(dtype)
        want = dispatch_grouped(x, weights, ids, experts)
        assert torch.equal(dispatch_decode(x, weights, ids, experts), want)
        if step == 0:
            ref = dispatch_reference(x, weights, ids, experts)
            torch.testing.assert_close(want, ref)


# --- the decode step's fast forms against the written-out ones (model/layers.py, deltanet.py, attention.py)
# fp32 sums taken in another order differ by ~1e-7 relative; bf16 results by a rounding flip at most.


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


def test_decode_step_equals_recurrence():
    g = torch.Generator().manual_seed(1)
    hk, r, dk, dv = 2, 3, 16, 24  # GQA: each q/k head serves 3 value heads
    hv = hk * r
    state = torch.randn(hv, dk, dv, generator=g)
    ref_state = state.clone()
    for _ in range(6):
        q = l2norm(torch.randn(hk, 1, dk, generator=g)).repeat_interleave(r, dim=0) * dk**-0.5
        k = l2norm(torch.randn(hk, 1, dk, generator=g)).repeat_interleave(r, dim=0)
        v = torch.randn(hv, 1, dv, generator=g)
        log_decay, beta = -torch.rand(hv, 1, generator=g), torch.rand(hv, 1, generator=g)
        want, ref_state = recurrent_gated_delta_rule(q, k, v, log_decay, beta, ref_state)
        got = decode_gated_delta_rule(q, k, v, log_decay.exp()[..., None], beta[..., None], state)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(state, ref_state, rtol=1e-5, atol=1e-5)
