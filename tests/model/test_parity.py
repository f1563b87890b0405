"""Parity with transformers' Qwen3_5(Moe)ForConditionalGeneration on randomised checkpoints it wrote."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import greedy, load_ours
from hf_reference import SHAPES, load_reference

from qwen35_lite.experts.cache import TieredExperts

PROMPT_LEN = 150  # crosses the DeltaNet chunk size (64) twice
NEW_TOKENS = 24


def _prompt(seed: int, n: int = PROMPT_LEN) -> torch.Tensor:
    return torch.randint(0, 248000, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def reference(hf_checkpoint):
    """reference(shape) -> (prompt ids, transformers' fp32 logits, its greedy tokens), computed once."""
    done = {}

    def get(shape: str):
        if shape not in done:
            ref, ids = load_reference(hf_checkpoint(shape), torch.float32), _prompt(1)
            with torch.no_grad():
                logits = ref(input_ids=ids[None]).logits[0]
                out = ref.generate(
                    ids[None], max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False
                )
            done[shape] = ids, logits, out[0, PROMPT_LEN:].tolist()
        return done[shape]

    return get


def _assert_matches(ours, reference_run) -> None:
    ids, ref_logits, ref_tokens = reference_run
    our_logits = ours.forward(ours.make_cache(), ids, all_logits=True)
    assert our_logits.shape == ref_logits.shape
    torch.testing.assert_close(our_logits, ref_logits, atol=1e-4, rtol=0)
    assert greedy(ours, ids, NEW_TOKENS)[0] == ref_tokens


@pytest.mark.slow
@pytest.mark.parametrize("shape", list(SHAPES))
def test_fp32_logits_and_greedy_tokens_match_transformers(hf_checkpoint, reference, shape):
    _assert_matches(load_ours(hf_checkpoint(shape), torch.float32), reference(shape))


MOE_SHAPES = [s for s in SHAPES if s != "dense"]


@pytest.mark.slow
@pytest.mark.parametrize("shape", MOE_SHAPES)
@pytest.mark.parametrize(
    "slots,prefetch", [(1, False), (2, True), (5, False), (64, False)], ids=["1", "2-prefetch", "5", "all"]
)
def test_every_cache_size_matches_transformers(hf_checkpoint, reference, shape, slots, prefetch):
    """The expert cache (its smallest size included, and with lookahead prefetch on) changes nothing."""
    factory = functools.partial(TieredExperts, cpu_slots=slots, prefetch=prefetch)
    ours = load_ours(hf_checkpoint(shape), torch.float32, factory)
    _assert_matches(ours, reference(shape))
    stats = ours.provider.stats()
    assert stats["ram_misses"] > 0 and (stats["ram_hits"] > 0 or slots == 1)


def _preloaded(*args, **kwargs) -> TieredExperts:
    provider = TieredExperts(*args, cpu_slots=10**6, **kwargs)
    provider.preload()
    return provider


@pytest.mark.slow
@pytest.mark.parametrize("shape", MOE_SHAPES)
def test_resident_stacked_decode_matches_transformers(hf_checkpoint, reference, shape):
    """Every expert preloaded: decode picks slots on the device and runs the layer's experts as one
    stack (no host read of the routing), and still gives transformers' tokens and logits."""
    ours = load_ours(hf_checkpoint(shape), torch.float32, _preloaded)
    assert all(ours.provider.static_slots(i) is not None for i in range(len(ours.layers)))
    _assert_matches(ours, reference(shape))
    assert ours.provider.stats()["ram_misses"] == 0


@pytest.mark.parametrize("shape", ["moe_ratio2_gqa2", "dense"])
def test_bf16_top1_agrees_with_transformers(hf_checkpoint, shape):
    path = hf_checkpoint(shape)
    ref, ours = load_reference(path, torch.bfloat16), load_ours(path, torch.bfloat16)
    ids = _prompt(2, 200)
    with torch.no_grad():
        ref_top = ref(input_ids=ids[None]).logits[0].argmax(-1)
    our_top = ours.forward(ours.make_cache(), ids, all_logits=True).argmax(-1)
    agreement = (ref_top == our_top).float().mean().item()
    assert agreement >= 0.99, f"top-1 agreement {agreement:.3f}"
