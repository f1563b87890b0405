"""The router against its reference order."""

from __future__ import annotations

import pytest
import torch

from qwen35_lite.model.moe import route, route_reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_route_by_top_logits_equals_the_reference_order(dtype):
    """Softmax over the top-k logits = top-k of the softmax, renormalised: same experts, same weights up
    to fp32 rounding (then the cast)."""
    g = torch.Generator().manual_seed(7)
    x, w = torch.randn(300, 256, generator=g).to(dtype), torch.randn(512, 256, generator=g).to(dtype)
    weights, ids = route(x, w, 10)
    ref_weights, ref_ids = route_reference(x, w, 10)
    assert torch.equal(ids, ref_ids)
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=0, rtol=2**-8)
    torch.testing.assert_close(weights, ref_weights, **tol)
