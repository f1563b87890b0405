"""Parity with transformers' Qwen3_5(Moe)ForConditionalGeneration on randomised checkpoints it wrote."""

from __future__ import annotations

import pytest
import torch
from conftest import load_ours
from hf_reference import SHAPES, load_reference

PROMPT_LEN = 150  # crosses the DeltaNet chunk size (64) twice
NEW_TOKENS = 24


def _prompt(seed: int, n: int = PROMPT_LEN) -> torch.Tensor:
    return torch.randint(0, 248000, (n,), generator=torch.Generator().manual_seed(seed))


def _greedy_ours(model, ids: torch.Tensor, n: int) -> list[int]:
    cache = model.make_cache()
    logits = model.forward(cache, ids)
    out = []
    for _ in range(n):
        token = int(logits[-1].argmax())
        out.append(token)
        logits = model.forward(cache, torch.tensor([token]))
    return out


@pytest.mark.parametrize("shape", list(SHAPES))
def test_fp32_logits_and_greedy_tokens_match_transformers(hf_checkpoint, shape):
    path = hf_checkpoint(shape)
    ref, ours = load_reference(path, torch.float32), load_ours(path, torch.float32)
    ids = _prompt(1)
    with torch.no_grad():
        ref_logits = ref(input_ids=ids[None]).logits[0]
    our_logits = ours.forward(ours.make_cache(), ids, all_logits=True)
    assert our_logits.shape == ref_logits.shape
    torch.testing.assert_close(our_logits, ref_logits, atol=1e-4, rtol=0)

    with torch.no_grad():
        ref_out = ref.generate(
            ids[None], max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False
        )
    ref_tokens = ref_out[0, PROMPT_LEN:].tolist()
    assert _greedy_ours(ours, ids, NEW_TOKENS) == ref_tokens


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
