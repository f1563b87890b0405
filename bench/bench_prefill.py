"""Prefill on the CPU under a quarter budget: the 512-token chunked prefill vs the layer-by-layer one.

    python bench/bench_prefill.py [--root /tmp/qwen35-bench] [--prompts 2048 8192] [--out docs/benchmarks.md]

On the "e512" synthetic checkpoint (bench/offload_runs.py: top-10 of 512 experts, 8 layers, 1.5 GiB of bf16
experts) with RAM slots for a quarter of each layer's experts, a seeded prompt of N tokens is prefilled
(warm page cache) two ways: in 512-token chunks through every layer (what `forward` does, the prefill
before this change) and layer by layer in blocks (`Qwen35Model.prefill`, what `run`/`chat` do now, the
block as the memory plan sets it). Reported: prefill tok/s and GiB read from the shards, against the
routed experts' own bytes. Figures go to the "Prefill (CPU)" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from bench_formats import write_section  # noqa: E402
from offload_runs import SPECS, machine, prompt_ids, warm_page_cache  # noqa: E402

from qwen35_lite.convert.synthetic import write_checkpoint  # noqa: E402
from qwen35_lite.model.qwen35 import PREFILL_CHUNK  # noqa: E402
from qwen35_lite.runtime.engine import Engine, EngineOptions  # noqa: E402


def run(engine: Engine, ids: torch.Tensor, block: int | None) -> dict:
    """block None: the chunked forward through every layer; else layer by layer in blocks."""
    model, provider = engine.model, engine.provider
    provider.reset_stats()
    cache = model.make_cache()
    start = time.perf_counter()
    step = block or PREFILL_CHUNK
    for s in range(0, len(ids), step):
        if block is None:
            model.forward(cache, ids[s : s + step])
        else:
            model.prefill(cache, ids[s : s + step])
    seconds = time.perf_counter() - start
    return {"tok_s": len(ids) / seconds, "gib_read": provider.stats()["bytes_read"] / 2**30}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=Path("/tmp/qwen35-bench"))
    ap.add_argument("--prompts", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = ap.parse_args()
    spec = SPECS["e512"]
    path = args.root / "e512"
    if not (path / "config.json").is_file():
        write_checkpoint(path, spec, dtype=torch.bfloat16, shard_bytes=1 << 30)
    expert_gib = spec.num_hidden_layers * spec.num_experts * spec.expert_bytes() / 2**30
    rows = []
    for n in args.prompts:
        opts = EngineOptions(
            device="cpu", dtype="bfloat16", offline=True, cpu_experts=spec.num_experts // 4, ctx=n + 256
        )
        engine = Engine.load(str(path), opts)
        warm_page_cache(sorted(path.glob("*.safetensors")))
        ids = prompt_ids(spec, n, seed=0)
        before = run(engine, ids, None)
        after = run(engine, ids, engine.plan.prefill_block)
        rows.append((n, engine.plan.prefill_block, before, after))
        engine.provider.close()
    lines = [
        "## Prefill (CPU)",
        "",
        f"`python bench/bench_prefill.py` on {machine()}; {torch.get_num_threads()} threads; e512 synthetic"
        f" checkpoint ({expert_gib:.2f} GiB of bf16 routed experts), RAM slots for a quarter of each layer's"
        " experts, warm page cache.",
        "",
        "| prompt | before: 512-token chunks | GiB read | after: layer by layer (block) | GiB read | speed-up |",
        "|---|---|---|---|---|---|",
    ]
    for n, block, b, a in rows:
        lines.append(
            f"| {n} | {b['tok_s']:.0f} tok/s | {b['gib_read']:.2f} ({b['gib_read'] / expert_gib:.1f}x the experts) "
            f"| {a['tok_s']:.0f} tok/s ({block}) | {a['gib_read']:.2f} ({a['gib_read'] / expert_gib:.1f}x) "
            f"| {a['tok_s'] / b['tok_s']:.2f}x |"
        )
    lines += [
        "",
        "From the page cache a read is a memory copy, so the speed-up here is the copying saved; from an",
        "NVMe (or for the 397B, whose experts do not fit the page cache) the bytes column is what counts.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    write_section(args.out, text, "## Prefill (CPU)")


if __name__ == "__main__":
    main()
