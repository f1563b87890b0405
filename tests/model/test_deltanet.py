"""Gated DeltaNet's fast forms (chunked prefill, in-place decode step, fp32 conv) against the reference recurrence."""

from __future__ import annotations

import pytest
import torch

from qwen35_lite.model.deltanet import (
    causal_conv,
    causal_conv_reference,
    chunk_gated_delta_rule,
    decode_gated_delta_rule,
    l2norm,
    recurrent_gated_delta_rule,
)


def _delta_inputs(T: int, H: int = 3, dk: int = 8, dv: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = l2norm(torch.randn(H, T, dk, generator=g)) * dk**-0.5
    k = l2norm(torch.randn(H, T, dk, generator=g))
    v = torch.randn(H, T, dv, generator=g)
    gate = -torch.rand(H, T, generator=g) * 2  # log decay < 0
    beta = torch.rand(H, T, generator=g)
    state = torch.randn(H, dk, dv, generator=g)
    return q, k, v, gate, beta, state


@pytest.mark.parametrize("T", [1, 5, 64, 65, 200])
def test_chunked_delta_rule_equals_recurrence(T):
    q, k, v, g, beta, state = _delta_inputs(T)
    o_ref, s_ref = recurrent_gated_delta_rule(q, k, v, g, beta, state.clone())
    o, s = chunk_gated_delta_rule(q, k, v, g, beta, state.clone())
    torch.testing.assert_close(o, o_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s, s_ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("C,T", [(96, 5), (2048, 32), (3072, 70), (512, 512)])
def test_fp32_causal_conv_equals_model_dtype_conv(dtype, C, T):
    g = torch.Generator().manual_seed(C + T)
    window = torch.randn(C, 3 + T, generator=g).to(dtype)
    weight = (torch.randn(C, 1, 4, generator=g) * 0.5).to(dtype)
    assert torch.equal(causal_conv(window, weight), causal_conv_reference(window, weight))


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
