"""Sampling: logits processors (penalties) and a sampler closure (temperature, top-k, top-p, min-p).

temperature 0 means greedy. Penalties follow common practice: repetition_penalty (HF/llama.cpp) acts on
every token seen (prompt and reply), presence_penalty (OpenAI/vLLM) on tokens of the reply only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .errors import CheckpointError


@dataclass
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None


def apply_penalties(logits: torch.Tensor, seen: torch.Tensor, generated: torch.Tensor, p: SamplingParams):
    """logits [V] fp32; seen/generated: 1-D id tensors. Returns new logits."""
    if p.repetition_penalty != 1.0 and seen.numel():
        ids = seen.unique()
        vals = logits[ids]
        logits[ids] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if p.presence_penalty and generated.numel():
        logits[generated.unique()] -= p.presence_penalty
    return logits


def check_finite(logits: torch.Tensor) -> None:
    """Raise CheckpointError when the model gave NaN or infinite logits: argmax would pick at random and
    multinomial would fail in torch's words; either way the weights, not the sampler, are at fault."""
    if not bool(torch.isfinite(logits).all()):
        bad = "NaN" if bool(torch.isnan(logits).any()) else "infinite"
        raise CheckpointError(
            f"the model computed {bad} logits: the checkpoint's weights are corrupt or overflow in this dtype",
            "download the checkpoint again (or check its shards for NaN); with --dtype float16, try"
            " bfloat16 or float32",
        )


def make_sampler(p: SamplingParams) -> Callable[[torch.Tensor], int]:
    """Return fn(logits [V] fp32) -> token id."""
    gen = torch.Generator()
    if p.seed is not None:
        gen.manual_seed(p.seed)
    else:
        gen.seed()

    def sample(logits: torch.Tensor) -> int:
        check_finite(logits)
        if p.temperature <= 0:
            return int(torch.argmax(logits))
        logits = logits / p.temperature
        if p.top_k > 0:
            kth = torch.topk(logits, min(p.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if p.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            drop = sorted_p.cumsum(0) - sorted_p > p.top_p  # keep the smallest prefix reaching top_p
            probs = probs.scatter(0, order[drop], 0.0)
        if p.min_p > 0:
            probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        return int(torch.multinomial(probs.cpu() / probs.sum(), 1, generator=gen))

    return sample
