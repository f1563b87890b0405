"""Sampling: a grammar's mask, penalties and logit bias, then temperature, top-k, top-p and min-p, all on
the logits' device.

temperature 0 means greedy. Penalties follow common practice: repetition_penalty (HF/llama.cpp) acts on
every token seen (prompt and reply), presence_penalty and frequency_penalty (OpenAI/vLLM) on tokens of the
reply only (presence once a token is there, frequency once per time it is there). logit_bias is added
to the logits, and -100 bans the token outright (-inf), as OpenAI documents it.

Log probabilities (`logprobs`) are vLLM's default ("raw_logprobs"): the log-softmax of the model's fp32
logits, before penalties, bias and temperature, so they are the model's own and the same for a greedy
and a sampled request; a response format's mask (constrain.py) comes first, as vLLM applies its grammar
bitmask before the sampler: forbidden tokens are -inf and the allowed ones share the probability.

On a GPU every value read back to the host is a sync, so a token costs exactly one read: the chosen id,
the "were the logits finite" flags and, when asked for, its log probability and the top ones, together. The random draw uses a generator on the logits' device: a
seeded run repeats itself on the same device, but a GPU and a CPU draw different numbers from one seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Protocol

import torch

from ..errors import CheckpointError, InputError
from ..kernels import greedy_cpu

BAN = -100.0  # a logit_bias this low bans the token


@dataclass
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    # Per request only (no flag, no /set key):
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's log probability and the top k

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


REQUEST_ONLY = ("logit_bias", "logprobs")
# the flags, /set keys and request fields
SAMPLING_KEYS = tuple(f.name for f in fields(SamplingParams) if f.name not in REQUEST_ONLY)


class TokenMask(Protocol):
    """What the sampler asks of a constraint (constrain.GrammarConstraint): the logits with forbidden
    tokens at -inf, and the sampled token, to move on. Only consulted while `engaged`."""

    engaged: bool

    def mask(self, logits: torch.Tensor) -> torch.Tensor: ...

    def accept(self, token: int) -> None: ...


@dataclass
class TokenLogprobs:
    """The chosen token's log probability and the top ones (id, logprob), most likely first."""

    logprob: float
    top: list[tuple[int, float]]


def apply_penalties(logits: torch.Tensor, seen: torch.Tensor, generated: torch.Tensor, p: SamplingParams):
    """logits [V] fp32; seen/generated: 1-D id tensors. Returns new logits. The reference for `Penalties`,
    which keeps the same sets as masks on the device instead of rebuilding them each token."""
    if p.repetition_penalty != 1.0 and seen.numel():
        ids = seen.unique()
        vals = logits[ids]
        logits[ids] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if p.presence_penalty and generated.numel():
        logits[generated.unique()] -= p.presence_penalty
    if p.frequency_penalty and generated.numel():
        logits -= p.frequency_penalty * torch.bincount(generated, minlength=logits.numel()).to(logits.dtype)
    return logits


class Penalties:
    """The ids seen (history and reply) and the reply's ids, as boolean masks over the vocabulary on the
    logits' device; each sampled id is added there, so nothing is rebuilt from lists or read back."""

    def __init__(self, p: SamplingParams, history: Sequence[int], vocab: int, device: torch.device):
        self.p = p
        self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
        self.seen.index_fill_(0, torch.tensor(list(history), dtype=torch.long, device=device), True)
        self.reply = torch.zeros_like(self.seen)
        self.counts = torch.zeros(vocab, dtype=torch.float32, device=device) if p.frequency_penalty else None

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        rp, pp, fp = self.p.repetition_penalty, self.p.presence_penalty, self.p.frequency_penalty
        if rp != 1.0:
            logits = torch.where(self.seen, torch.where(logits > 0, logits / rp, logits * rp), logits)
        if pp:
            logits = torch.where(self.reply, logits - pp, logits)
        if self.counts is not None:
            logits = logits - fp * self.counts
        return logits

    def add(self, token: torch.Tensor) -> None:
        """token: the sampled id as a 0-d tensor on the device (index_fill_: no read back)."""
        self.seen.index_fill_(0, token.view(1), True)
        self.reply.index_fill_(0, token.view(1), True)
        if self.counts is not None:
            self.counts.index_add_(0, token.view(1), torch.ones(1, device=self.counts.device))


def bias_vector(bias: dict[int, float], vocab: int, device: torch.device) -> torch.Tensor:
    """logit_bias as a dense [V] vector on the device (-inf where it bans); an id outside the vocabulary
    is refused."""
    if (top := max(bias, default=-1)) >= vocab or min(bias, default=0) < 0:
        bad = top if top >= vocab else min(bias)
        raise InputError(
            f"logit_bias names token id {bad}, outside the model's vocabulary of {vocab}",
            f"use ids from 0 to {vocab - 1}",
        )
    vector = torch.zeros(vocab, dtype=torch.float32)
    for token, value in bias.items():
        vector[token] = float("-inf") if value <= BAN else value
    return vector.to(device)


def nothing_allowed() -> InputError:
    return InputError(
        "no token is left to sample: logit_bias bans every token the response format allows",
        "ban fewer tokens with logit_bias (-100), or drop the response format",
    )


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
    """fn(logits [V], the model's dtype) -> token id. The logits stay on their device; one host read per
    call. They are taken in fp32; a plain greedy pick on the CPU reads them as they are, in one C pass
    (kernels/greedy_cpu.py: the same id and the same errors as the torch form below).

    `constraint` (a TokenMask) masks the logits while it is engaged; `last` holds the chosen token's
    log probabilities when the params ask for them."""

    def __init__(self, p: SamplingParams, history: Sequence[int] = (), constraint: TokenMask | None = None):
        self.p = p
        self.history = list(history) if p.penalised else []  # ids seen before the reply (prompt included)
        self.penalties: Penalties | None = None
        self.bias: torch.Tensor | None = None
        self.generator: torch.Generator | None = None
        self.constraint = constraint
        self.last: TokenLogprobs | None = None
        # the argmax of the logits as they are: nothing to penalise, bias or report
        self._plain_greedy = (
            p.temperature <= 0 and not p.penalised and not p.logit_bias and p.logprobs is None
        )

    def __call__(self, logits: torch.Tensor) -> int:
        masked = self.constraint is not None and self.constraint.engaged
        if not masked and self._plain_greedy and greedy_cpu.usable(logits):
            token_id, inf, nan = greedy_cpu.greedy_scan(logits)
            if inf or nan:
                raise nonfinite_error(nan)
            return token_id
        logits = raw = logits.float()
        if masked:
            logits = self.constraint.mask(logits)
        scored = logits  # what log probabilities are taken from
        if self.p.penalised:
            if self.penalties is None:
                self.penalties = Penalties(self.p, self.history, logits.numel(), logits.device)
            logits = self.penalties.apply(logits)
        if self.p.logit_bias:
            if self.bias is None:
                self.bias = bias_vector(self.p.logit_bias, logits.numel(), logits.device)
            logits = logits + self.bias
        token = self.pick(logits)
        if self.penalties is not None:
            self.penalties.add(token)
        # the one read: the id, whether the logits held inf or NaN, whether anything was left to pick,
        # and the log probabilities asked for (ids below 2^24 are exact in float64)
        narrowed = masked or bool(self.p.logit_bias)  # only then can every token be -inf
        empty = (
            logits.max() == float("-inf")
            if narrowed
            else torch.zeros((), dtype=torch.bool, device=raw.device)
        )
        flags = torch.stack((raw.isinf().any(), raw.isnan().any(), empty))
        parts = [token.view(1).double(), flags.double()]
        k = self.p.logprobs
        if k is not None:
            lp = torch.log_softmax(scored, dim=-1)
            top = torch.topk(lp, min(k, lp.numel())) if k else None
            parts.append(lp[token].view(1).double())
            if top is not None:
                parts += [top.values.double(), top.indices.double()]
        values = torch.cat(parts).tolist()
        token_id, inf, nan, empty = (int(v) for v in values[:4])
        if inf or nan:
            raise nonfinite_error(bool(nan))
        if empty:
            raise nothing_allowed()
        if k is not None:
            top_values, top_ids = values[5 : 5 + k], values[5 + k :]
            self.last = TokenLogprobs(values[4], [(int(i), v) for i, v in zip(top_ids, top_values)])
        if masked:
            self.constraint.accept(token_id)
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
            if self.p.seed is not None and self.p.seed >= 0:  # -1: random, as some clients send it
                self.generator.manual_seed(self.p.seed)
            else:
                self.generator.seed()
        noise = torch.empty_like(probs).exponential_(1, generator=self.generator)
        return torch.argmax(probs / noise)


def make_sampler(
    p: SamplingParams, history: Sequence[int] = (), constraint: TokenMask | None = None
) -> Sampler:
    """Return fn(logits [V] fp32) -> token id. history: the ids already in the context (the repetition
    penalty's start); each sampled id is added to the penalties' sets by the sampler itself.
    constraint: a grammar's mask (constrain.GrammarConstraint), applied while it is engaged."""
    return Sampler(p, history, constraint)
