"""Sampling: penalties, then temperature, top-k, top-p and min-p, all on the logits' device.

temperature 0 means greedy. Penalties follow common practice: repetition_penalty (HF/llama.cpp) acts on
every token seen (prompt and reply), presence_penalty (OpenAI/vLLM) on tokens of the reply only.

On a GPU every value read back to the host is a sync, so a token costs exactly one read: the chosen id and
the "were the logits finite" flags, together. The random draw uses a generator on the logits' device: a
seeded run repeats itself on the same device, but a GPU and a CPU draw different numbers from one seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from ..errors import CheckpointError


@dataclass
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0


SAMPLING_KEYS = tuple(f.name for f in fields(SamplingParams))  # the flags, /set keys and request fields


def apply_penalties(logits: torch.Tensor, seen: torch.Tensor, generated: torch.Tensor, p: SamplingParams):
    """logits [V] fp32; seen/generated: 1-D id tensors. Returns new logits. The reference for `Penalties`,
    which keeps the same sets as masks on the device instead of rebuilding them each token."""
    if p.repetition_penalty != 1.0 and seen.numel():
        ids = seen.unique()
        vals = logits[ids]
        logits[ids] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if p.presence_penalty and generated.numel():
        logits[generated.unique()] -= p.presence_penalty
    return logits


class Penalties:
    """The ids seen (history and reply) and the reply's ids, as boolean masks over the vocabulary on the
    logits' device; each sampled id is added there, so nothing is rebuilt from lists or read back."""

    def __init__(self, p: SamplingParams, history: Sequence[int], vocab: int, device: torch.device):
        self.p = p
        self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
        self.seen.index_fill_(0, torch.tensor(list(history), dtype=torch.long, device=device), True)
        self.reply = torch.zeros_like(self.seen)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        rp, pp = self.p.repetition_penalty, self.p.presence_penalty
        if rp != 1.0:
            logits = torch.where(self.seen, torch.where(logits > 0, logits / rp, logits * rp), logits)
        if pp:
            logits = torch.where(self.reply, logits - pp, logits)
        return logits

    def add(self, token: torch.Tensor) -> None:
        """token: the sampled id as a 0-d tensor on the device (index_fill_: no read back)."""
        self.seen.index_fill_(0, token.view(1), True)
        self.reply.index_fill_(0, token.view(1), True)


def nonfinite_error(nan: bool) -> CheckpointError:
    """NaN or infinite logits: argmax would pick at random and a draw would fail in torch's words; either
    way the weights, not the sampler, are at fault."""
    return CheckpointError(
        f"the model computed {'NaN' if nan else 'infinite'} logits: the checkpoint's weights are corrupt"
        " or overflow in this dtype",
        "download the checkpoint again (or check its shards for NaN); with --dtype float16, try"
        " bfloat16 or float32",
    )


class Sampler:
    """fn(logits [V] fp32) -> token id. The logits stay on their device; one host read per call."""

    def __init__(self, p: SamplingParams, history: Sequence[int] = ()):
        self.p = p
        self.history = list(history) if p.penalised else []  # ids seen before the reply (prompt included)
        self.penalties: Penalties | None = None
        self.generator: torch.Generator | None = None

    def __call__(self, logits: torch.Tensor) -> int:
        if self.p.penalised:
            if self.penalties is None:
                self.penalties = Penalties(self.p, self.history, logits.numel(), logits.device)
            logits = self.penalties.apply(logits)
        token = self.pick(logits)
        if self.penalties is not None:
            self.penalties.add(token)
        # the one read: the id and whether the logits held inf or NaN
        token_id, inf, nan = torch.stack((token, logits.isinf().any(), logits.isnan().any())).tolist()
        if inf or nan:
            raise nonfinite_error(bool(nan))
        return token_id

    def pick(self, logits: torch.Tensor) -> torch.Tensor:
        """The chosen id as a 0-d tensor on the logits' device."""
        p = self.p
        if p.temperature <= 0:
            return torch.argmax(logits)  # the first maximum on ties
        logits = logits / p.temperature
        if p.top_k > 0:
            kth = torch.topk(logits, min(p.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if p.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            drop = sorted_p.cumsum(0) - sorted_p > p.top_p  # keep the smallest prefix reaching top_p
            # scatter the whole sorted row back: a boolean index (order[drop]) would sync on a GPU
            probs = probs.scatter(0, order, sorted_p.masked_fill(drop, 0.0))
        if p.min_p > 0:
            probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        return self.draw(probs / probs.sum())

    def draw(self, probs: torch.Tensor) -> torch.Tensor:
        """One draw from `probs`: argmax(probs / Exp(1) noise), which is what torch.multinomial computes
        for one sample (the same ids from the same seed on a CPU), without its validity check, which reads
        a flag back to the host (a sync on a GPU); NaN logits are caught from the one read instead."""
        if self.generator is None:
            self.generator = torch.Generator(device=probs.device)
            if self.p.seed is not None:
                self.generator.manual_seed(self.p.seed)
            else:
                self.generator.seed()
        noise = torch.empty_like(probs).exponential_(1, generator=self.generator)
        return torch.argmax(probs / noise)


def make_sampler(p: SamplingParams, history: Sequence[int] = ()) -> Sampler:
    """Return fn(logits [V] fp32) -> token id. history: the ids already in the context (the repetition
    penalty's start); each sampled id is added to the penalties' sets by the sampler itself."""
    return Sampler(p, history)
