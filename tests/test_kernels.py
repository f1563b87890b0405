"""Fast kernels against the simple versions kept beside them: bit-identical on the CPU."""

from __future__ import annotations

import pytest
import torch

from qwen35_lite.experts.formats import DenseExpert
from qwen35_lite.model.attention import _attend, _attend_reference
from qwen35_lite.model.deltanet import causal_conv, causal_conv_reference
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
