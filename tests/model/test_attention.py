"""Gated attention's SDPA with GQA against the expanded-KV form."""

from __future__ import annotations

import pytest
import torch

from qwen35_lite.model.attention import _attend, _attend_reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", [(8, 2, 128), (4, 1, 16), (4, 4, 32)])
@pytest.mark.parametrize("T,past", [(1, 0), (1, 37), (32, 0), (70, 0), (5, 40), (64, 512)])
def test_gqa_attention_equals_expanded_kv(dtype, heads, T, past):
    H, Hkv, hd = heads
    g = torch.Generator().manual_seed(T + past)
    q = torch.randn(H, T, hd, generator=g).to(dtype)
    k, v = (torch.randn(Hkv, past + T, hd, generator=g).to(dtype) for _ in range(2))
    assert torch.equal(_attend(q, k, v, past), _attend_reference(q, k, v, past))
