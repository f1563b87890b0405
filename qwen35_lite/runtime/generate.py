"""The generation loop: chunked prefill, then sample → yield → feed, one token at a time.

The loop yields small events (TokenEvent per token, one Finished at the end); it never prints.
Thinking is tracked from the `<think>`/`</think>` ids, so the UI can dim, hide or separate it.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from ..errors import CheckpointError, InputError
from ..model.cache import ModelCache
from ..model.qwen35 import PREFILL_CHUNK, Qwen35Model
from .sampling import SamplingParams, TokenLogprobs, TokenMask, make_sampler
from .stats import expert_counters, peak_memory, reply_expert_stats
from .threads import ThreadTuner


@dataclass
class TokenEvent:
    id: int
    text: str  # the newly completed text (may be empty while a UTF-8 character is incomplete)
    thinking: bool
    logprobs: TokenLogprobs | None = None  # when the params ask for them


@dataclass
class Finished:
    reason: str  # "stop" | "length" | "context" | "cancelled"
    stats: dict = field(default_factory=dict)
    unfed: list[int] = field(
        default_factory=list
    )  # sampled ids not yet fed to the model (chat resumes with them)
    tokens: list[int] = field(default_factory=list)  # every generated id, the stop token included


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    max_new_tokens: int = 512
    stop_ids: tuple[int, ...] = ()
    think_ids: tuple[int, int] = (248068, 248069)  # <think>, </think>
    start_in_thinking: bool = False  # the prompt ends inside an open <think> block
    embeds: torch.Tensor | None = None  # [T, D] prompt embeddings (images), replacing the id lookup
    positions: torch.Tensor | None = None  # [3, T] M-RoPE positions for the prompt (images), absolute
    # Added to cache.rope_delta once the prompt is fed (image blocks shift every later position).
    rope_delta: int = 0
    max_context: int = 262144
    # A grammar the answer must follow (constrain.GrammarConstraint), engaged outside the think block.
    constraint: TokenMask | None = None
    # A test seam (runtime/scripted.py): these ids are emitted instead of sampled, then a stop id.
    script: list[int] | None = None


def check_context(cache: ModelCache, n_prompt: int, max_context: int, model_max: int) -> None:
    if cache.offset + n_prompt >= max_context:
        raise InputError(
            f"the prompt needs {cache.offset + n_prompt} tokens of context but the limit is {max_context}",
            context_hint("shorten the prompt", cache.offset, max_context, model_max),
        )


def context_hint(first: str, offset: int, max_context: int, model_max: int) -> str:
    """Only the ways out that can work: /clear when there is a conversation to forget, --ctx when the
    model takes a longer context than the one reserved."""
    ways = [first]
    if offset:
        ways.append("/clear the conversation")
    if max_context < model_max:
        ways.append(f"raise --ctx (this model takes up to {model_max} tokens, if the memory budget holds it)")
    return ", or ".join([", ".join(ways[:-1]), ways[-1]] if len(ways) > 1 else ways)


def check_vocab(ids: list[int], vocab_size: int) -> None:
    """A tokenizer from another model gives ids past the embedding table: say so instead of an IndexError."""
    top = max(ids, default=-1)
    if top >= vocab_size:
        raise CheckpointError(
            f"token id {top} is outside the model's vocabulary of {vocab_size}",
            "the checkpoint's tokenizer.json does not belong to its config.json (vocab_size)",
        )


def prefill(
    model: Qwen35Model,
    cache: ModelCache,
    req: GenerationRequest,
    on_progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Feed the prompt in blocks of model.prefill_block tokens, each layer by layer (a MoE layer reads its
    experts once a block, not once a 512-token chunk); return the last position's logits [V] (model dtype).
    on_progress(tokens done, tokens) moves with the layers inside a block."""
    ids = torch.tensor(req.prompt_ids, dtype=torch.long)
    T = len(req.prompt_ids)
    block = max(PREFILL_CHUNK, model.prefill_block // PREFILL_CHUNK * PREFILL_CHUNK)
    logits = None
    for s in range(0, T, block):
        e = min(T, s + block)
        embeds = None if req.embeds is None else req.embeds[s:e]
        positions = None if req.positions is None else req.positions[:, s:e]

        def on_layer(done: int, layers: int, s: int = s, e: int = e) -> None:
            if on_progress:
                on_progress(s + (e - s) * done // layers, T)

        logits = model.prefill(cache, ids=ids[s:e], embeds=embeds, positions=positions, on_layer=on_layer)
    cache.token_ids.extend(req.prompt_ids)
    # Only after the whole prompt: the explicit positions above already include the shift; every later
    # token (decode, next turn) takes offset + rope_delta.
    cache.rope_delta += req.rope_delta
    return logits[-1]


def generate(
    model: Qwen35Model,
    cache: ModelCache,
    req: GenerationRequest,
    decoder,
    *,
    cancel: threading.Event | None = None,
    on_prefill: Callable[[int, int], None] | None = None,
    threads: ThreadTuner | None = None,
) -> Iterator[TokenEvent | Finished]:
    """Run one reply. `decoder` is a StreamDecoder (push(id) -> text, flush() -> text); `threads` (a
    CPU run's ThreadTuner) picks each decode step's thread count."""
    check_context(cache, len(req.prompt_ids), req.max_context, model.cfg.max_position_embeddings)
    check_vocab(req.prompt_ids, model.cfg.vocab_size)
    experts = model.provider
    counters = [expert_counters(experts)]
    t0 = time.perf_counter()
    if threads is not None:
        threads.for_prefill()
    logits = prefill(model, cache, req, on_prefill)
    t_prefill = time.perf_counter() - t0
    counters.append(expert_counters(experts))
    # logits stay on the model's device; the sampler reads back the id alone (one sync a token on a GPU)
    sample = make_sampler(req.params, history=cache.token_ids, constraint=req.constraint)
    if req.script is not None:
        sample = _scripted(req.script, req.stop_ids, sample)
    prefilled_offset = cache.offset
    thinking = req.start_in_thinking
    generated: list[int] = []
    reason, unfed, ttft = "length", [], None
    fed = 0  # decode forward passes: the time after the first token is theirs (the last one's too)
    while len(generated) < req.max_new_tokens:
        if cancel is not None and cancel.is_set():
            reason = "cancelled"
            break
        if req.constraint is not None:  # the reasoning is free; the answer follows the grammar
            req.constraint.engaged = not thinking
        token = sample(logits)
        ttft = ttft if ttft is not None else time.perf_counter() - t0
        generated.append(token)
        if token in req.stop_ids:
            reason = "stop"
            break
        if token in req.think_ids:
            thinking = token == req.think_ids[0]
            text = ""
        else:
            text = decoder.push(token)
        yield TokenEvent(token, text, thinking, getattr(sample, "last", None))
        if cache.offset + 1 >= req.max_context:
            reason, unfed = "context", [token]
            break
        if cancel is not None and cancel.is_set():
            reason, unfed = "cancelled", [token]
            break
        with threads.step() if threads is not None else contextlib.nullcontext():
            logits = model.forward(cache, ids=torch.tensor([token]))[-1]  # the sampler takes them in fp32
        cache.token_ids.append(token)
        fed += 1
    tail = decoder.flush()
    if tail:
        yield TokenEvent(-1, tail, thinking)
    total = time.perf_counter() - t0
    decode_s = total - (ttft or total)
    stats = {
        "prompt_tokens": len(req.prompt_ids),
        "generated_tokens": len(generated),
        "prefill_s": round(t_prefill, 4),
        "prefill_tok_s": round(len(req.prompt_ids) / t_prefill, 2) if t_prefill > 0 else None,
        "decode_s": round(decode_s, 4),
        "decode_tok_s": round(fed / decode_s, 2) if decode_s > 0 and fed else None,
        "ttft_s": round(ttft, 4) if ttft is not None else None,
        "decode_threads": threads.current if threads is not None else None,  # the tuner's last choice
        "context_tokens": cache.offset,
        **peak_memory(model.device),
        **reply_expert_stats(*counters, expert_counters(experts), cache.offset - prefilled_offset),
    }
    yield Finished(reason, stats, unfed, generated)


def _scripted(ids: list[int], stop_ids: tuple[int, ...], sample: Callable) -> Callable:
    """A sampler that returns `ids`, then the first stop id (the test seam of runtime/scripted.py)."""
    queue = [*ids, *stop_ids[:1]]

    def next_id(logits: torch.Tensor) -> int:
        return queue.pop(0) if queue else sample(logits)

    return next_id
