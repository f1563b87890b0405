"""Our kernels against their simple references, and cached computation against one full forward."""

from __future__ import annotations

import pytest
import torch
from conftest import load_ours

from qwen35_lite.experts.dispatch import dispatch_grouped, dispatch_reference
from qwen35_lite.experts.formats import DenseExpert
from qwen35_lite.model.deltanet import chunk_gated_delta_rule, l2norm, recurrent_gated_delta_rule
from qwen35_lite.model.moe import route


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


def test_grouped_dispatch_equals_reference():
    g = torch.Generator().manual_seed(0)
    T, D, I, E, A = 37, 16, 8, 6, 3
    x = torch.randn(T, D, generator=g)
    weights, ids = route(x, torch.randn(E, D, generator=g), A)
    experts = {
        e: DenseExpert(torch.randn(2 * I, D, generator=g), torch.randn(D, I, generator=g)) for e in range(E)
    }
    # Batched and one-row matmuls sum in different orders (AMX, AVX-512 and AVX2 kernels each their own):
    # a tolerance scaled to fp32's epsilon over D-long dot products of O(1) values holds on any CPU.
    torch.testing.assert_close(
        dispatch_grouped(x, weights, ids, experts),
        dispatch_reference(x, weights, ids, experts),
        rtol=1e-5,
        atol=1e-4,
    )


@pytest.fixture(scope="module")
def model(hf_checkpoint):
    return load_ours(hf_checkpoint("moe_ratio2_gqa2"))


def test_prefill_then_decode_equals_full_forward(model):
    ids = torch.randint(0, 248000, (140,), generator=torch.Generator().manual_seed(3))
    full = model.forward(model.make_cache(), ids, all_logits=True)
    cache = model.make_cache()
    steps = [model.forward(cache, ids[:130], all_logits=True)]
    steps += [model.forward(cache, ids[t : t + 1]) for t in range(130, 140)]
    torch.testing.assert_close(torch.cat(steps), full, atol=1e-4, rtol=0)


def test_state_carried_across_two_calls_equals_one_prompt(model):
    """A chat's second turn feeds only its new tokens on the cache of the first."""
    ids = torch.randint(0, 248000, (180,), generator=torch.Generator().manual_seed(4))
    full = model.forward(model.make_cache(), ids, all_logits=True)
    cache = model.make_cache()
    first = model.forward(cache, ids[:77], all_logits=True)
    second = model.forward(cache, ids[77:], all_logits=True)
    torch.testing.assert_close(torch.cat([first, second]), full, atol=1e-4, rtol=0)
    assert cache.offset == 180
