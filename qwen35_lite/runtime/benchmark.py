"""A fixed workload for `qwen35-lite bench`: seeded prompt ids, greedy decode of a set number of tokens.

The same (prompt tokens, new tokens, seed) gives the same ids and, greedy, the same tokens on every run,
so figures from two budgets or two machines compare like for like. Nothing here prints: progress goes
to a callback, the result is a dict (the CLI renders it as a table or one JSON object).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import InputError
from ..plan.cpu_features import cpu_has_native_bf16, cpu_model_name
from ..text.tokenizer import StreamDecoder
from .engine import Engine
from .generate import Finished, GenerationRequest, TokenEvent, generate
from .sampling import SamplingParams


def prompt_ids(engine: Engine, n: int, seed: int = 0) -> list[int]:
    """`n` seeded ids below the first stop id: Qwen's special tokens start at the eos id, and a prompt of
    control tokens would not look like a prompt."""
    vocab = engine.model.cfg.vocab_size
    high = min([vocab, *engine.defaults.stop_ids])
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, high, (n,), generator=g).tolist()


def check_workload(prompt_tokens: int, new_tokens: int, context: int, model_max: int | None = None) -> None:
    """Refuse a workload the context cannot hold: the decode would stop early and time fewer tokens."""
    need = prompt_tokens + new_tokens
    if need <= context:
        return
    if model_max is not None and need > model_max:
        hint = f"the model's maximum context is {model_max}: lower --prompt-tokens or --new-tokens"
    else:
        hint = f"use --ctx {need} or more, or lower --prompt-tokens or --new-tokens"
    raise InputError(
        f"{prompt_tokens} prompt tokens + {new_tokens} new tokens need {need} tokens of context,"
        f" but the context is {context}",
        hint,
    )


def run_benchmark(
    engine: Engine,
    prompt_tokens: int,
    new_tokens: int,
    *,
    seed: int = 0,
    profile: bool = False,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> dict:
    """Prefill `prompt_tokens` seeded ids, then decode exactly `new_tokens` greedily (no stop token ends
    it early). on_progress(phase, done, total) with phase "prefill" or "decode".

    Returns the reply stats of generate (prefill/decode tok/s, ttft, hits and misses per tier, bytes read
    from disk and copied to the GPU per decoded token, peak memory per device) plus the workload, the
    plan's slots and the tokens. profile: also count a few decode steps' kernel-launching ops and host
    reads (op_profile.profile_decode), under "profile".
    """
    if prompt_tokens < 1 or new_tokens < 1:
        raise InputError(
            "bench needs at least one prompt token and one new token", "e.g. --prompt-tokens 512"
        )
    check_workload(prompt_tokens, new_tokens, engine.max_context, engine.cfg.text.max_position_embeddings)
    req = GenerationRequest(
        prompt_ids=prompt_ids(engine, prompt_tokens, seed),
        params=SamplingParams(temperature=0.0),
        max_new_tokens=new_tokens,
        stop_ids=(),  # a fixed amount of work: every run decodes exactly new_tokens
        max_context=engine.max_context,
    )
    cache = engine.model.make_cache()
    on_prefill = (lambda done, total: on_progress("prefill", done, total)) if on_progress else None
    done: Finished | None = None
    decoded = 0
    decoder = StreamDecoder(engine.tokenizer)
    for event in generate(engine.model, cache, req, decoder, on_prefill=on_prefill, threads=engine.threads):
        if isinstance(event, TokenEvent):
            if event.id >= 0:  # -1: the decoder's tail, not a token
                decoded += 1
                if on_progress:
                    on_progress("decode", decoded, new_tokens)
        else:
            done = event
    m = engine.model
    out = {
        "model": engine.model_dir.name,
        "device": m.device.type,
        "dtype": str(m.dtype).removeprefix("torch."),
        "cpu": cpu_model_name(),
        "cpu_native_bf16": cpu_has_native_bf16(),
        # --cpu-threads, else torch's default (the most the decode thread tuner uses)
        "cpu_threads": engine.threads.most if engine.threads is not None else torch.get_num_threads(),
        "seed": seed,
        **done.stats,
        "tokens": done.tokens,
    }
    if profile:
        from .op_profile import profile_decode

        out["profile"] = profile_decode(engine.model, prompt_ids(engine, min(prompt_tokens, 64), seed + 1))
    plan = engine.plan
    if plan is not None:
        out["plan"] = {
            "cpu_slots": plan.cpu_slots,
            "gpu_slots": plan.gpu_slots,
            "experts": plan.cfg.num_experts if plan.moe_layers else 0,
            "cpu_budget": plan.cpu_budget,
            "gpu_budget": plan.gpu_budget,
            "context": plan.context,
        }
    if engine.expert_rates is not None:
        out["expert_rates"] = engine.expert_rates.as_dict()
    return out
