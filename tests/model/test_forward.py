"""Cached computation (prefill then decode, state carried across calls) against one full forward."""

from __future__ import annotations

import pytest
import torch
from conftest import load_ours


@pytest.fixture(scope="module")
def model(hf_checkpoint):
    return load_ours(hf_checkpoint("moe_ratio2_gqa2"))


@pytest.mark.slow
def test_prefill_then_decode_equals_full_forward(model):
    ids = torch.randint(0, 248000, (140,), generator=torch.Generator().manual_seed(3))
    full = model.forward(model.make_cache(), ids, all_logits=True)
    cache = model.make_cache()
    steps = [model.forward(cache, ids[:130], all_logits=True)]
    steps += [model.forward(cache, ids[t : t + 1]) for t in range(130, 140)]
    torch.testing.assert_close(torch.cat(steps), full, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_state_carried_across_two_calls_equals_one_prompt(model):
    """A chat's second turn feeds only its new tokens on the cache of the first."""
    ids = torch.randint(0, 248000, (180,), generator=torch.Generator().manual_seed(4))
    full = model.forward(model.make_cache(), ids, all_logits=True)
    cache = model.make_cache()
    first = model.forward(cache, ids[:77], all_logits=True)
    second = model.forward(cache, ids[77:], all_logits=True)
    torch.testing.assert_close(torch.cat([first, second]), full, atol=1e-4, rtol=0)
    assert cache.offset == 180
