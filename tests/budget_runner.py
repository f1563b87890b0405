"""Run one greedy decode under a memory plan and print the tokens as JSON (a subprocess of test_budget).

    python tests/budget_runner.py MODEL [--cpu-mem GiB] [--cpu-experts N] [--uncached]
        [--prompt-len T] [--new-tokens N] [--context N] [--prefill-block N] [--report-cache]

With --cpu-mem / --cpu-experts the experts come from a TieredExperts sized by MemoryPlan (as the CLI
does); with --uncached from UncachedExperts (the unconstrained reference). No tokenizer is loaded: the
prompt is seeded random ids.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwen35_lite.experts.cache import TieredExperts, UncachedExperts  # noqa: E402
from qwen35_lite.experts.store import ExpertStore  # noqa: E402
from qwen35_lite.model.qwen35 import Qwen35Model  # noqa: E402
from qwen35_lite.plan.memory import MemoryPlan  # noqa: E402
from qwen35_lite.weights.checkpoint import Checkpoint  # noqa: E402
from qwen35_lite.weights.config import load_config  # noqa: E402

CPU = torch.device("cpu")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--cpu-mem", type=float)
    ap.add_argument("--cpu-experts", type=int)
    ap.add_argument("--uncached", action="store_true")
    ap.add_argument("--prompt-len", type=int, default=600)
    ap.add_argument("--new-tokens", type=int, default=12)
    ap.add_argument(
        "--prefill-block", type=int, help="instead of the plan's (the layer-by-layer prefill's block)"
    )
    ap.add_argument("--context", type=int)
    ap.add_argument("--report-cache", action="store_true", help="also print cache nbytes after prefill")
    args = ap.parse_args()
    torch.set_num_threads(2)

    model_cfg = load_config(Path(args.model))
    cfg = model_cfg.text
    ckpt = Checkpoint(args.model)
    dtype = ckpt.info("embed_tokens.weight").dtype
    store = ExpertStore(ckpt, cfg, raw_config=model_cfg.raw)
    plan = None
    if args.uncached:
        provider = UncachedExperts(store, CPU, dtype)
    else:
        plan = MemoryPlan.build(
            cfg,
            device=CPU,
            dtype=dtype,
            ckpt=ckpt,
            raw_config=model_cfg.raw,
            cpu_mem=args.cpu_mem,
            cpu_experts=args.cpu_experts,
            context=args.context or args.prompt_len + args.new_tokens,
            tokenizer=False,
        )
        plan.check()
        provider = TieredExperts(store, CPU, dtype, **plan.provider_kwargs())
    model = Qwen35Model.load(ckpt, cfg, provider, CPU, dtype)
    block = args.prefill_block or (plan.prefill_block if plan is not None else model.prefill_block)
    cache = model.make_cache()
    ids = torch.randint(0, cfg.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(0))
    for s in range(0, len(ids), block):
        logits = model.prefill(cache, ids[s : s + block])
    prefill_cache = cache.nbytes
    prefill_bytes = provider.stats()["bytes_read"]
    tokens = []
    for _ in range(args.new_tokens):
        tokens.append(int(logits[-1].argmax()))
        logits = model.forward(cache, torch.tensor(tokens[-1:]))
    out = {
        "tokens": tokens,
        "stats": provider.stats(),
        "prefill_bytes": prefill_bytes,
        "prefill_block": block,
    }
    if plan is not None:
        out["plan"] = {
            "cpu_slots": plan.cpu_slots,
            "cpu_total": plan.cpu_total,
            "cpu_budget": plan.cpu_budget,
        }
    if args.report_cache:
        out["cache_after_prefill"], out["cache_after_decode"] = prefill_cache, cache.nbytes
    print(json.dumps(out))


if __name__ == "__main__":
    main()
