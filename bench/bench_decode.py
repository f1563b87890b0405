"""Resident decode on the CPU: qwen35-lite against transformers (and, optionally, an earlier qwen35-lite
source tree), in rounds that alternate the configurations so a shared machine's slow spells hit all of them.

    python bench/bench_decode.py [--rounds 3] [--tokens 32] [--before /path/to/older/checkout]

On the e512 synthetic checkpoint (bench/offload_runs.py: the real model's top-10 of 512 routing, bf16),
every expert resident. Each configuration runs in its own subprocess per round (fresh memory): load,
a warm-up, then `--repeats` greedy decodes of --tokens tokens after a 32-token prompt; tok/s from the first
generated token to the last. Also counted for ours (and transformers): kernel-launching ops and host reads
per decode token (qwen35_lite.runtime.op_profile), and the weight bytes a token reads, as a fraction of the
machine's memory-read rate (a bf16 matrix-vector product over 256 MiB). Writes the "Decode (CPU)" section
of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench")]
SECTION = "## Decode (CPU)"


def one(kind: str, path: Path, tokens: int, repeats: int) -> dict:
    """In the subprocess: load, warm up, time `repeats` decodes; count ops per token."""
    from offload_runs import SPECS, greedy_ours, hf_greedy, prompt_ids

    from qwen35_lite.runtime.op_profile import _kineto_quiet, _launches, count_host_reads

    spec = SPECS["e512"]
    ids = prompt_ids(spec, 32, seed=0)
    if kind == "hf":
        from transformers import Qwen3_5MoeForCausalLM
        from transformers.utils import logging

        logging.set_verbosity_error()
        model = Qwen3_5MoeForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
        hf_greedy(model, prompt_ids(spec, 32, seed=1), 3)

        def run():
            s = hf_greedy(model, ids, tokens)
            return s.tokens, s.times
    else:
        from qwen35_lite.experts.cache import TieredExperts
        from qwen35_lite.experts.store import ExpertStore
        from qwen35_lite.model.qwen35 import Qwen35Model
        from qwen35_lite.weights.checkpoint import Checkpoint
        from qwen35_lite.weights.config import load_config

        cfg, ckpt = load_config(path).text, Checkpoint(path)
        provider = TieredExperts(ExpertStore(ckpt, cfg), "cpu", torch.bfloat16, cpu_slots=cfg.num_experts)
        provider.preload()
        model = Qwen35Model.load(ckpt, cfg, provider, torch.device("cpu"), torch.bfloat16)
        greedy_ours(model, prompt_ids(spec, 32, seed=1), 3)

        def run():
            toks, times, _ = greedy_ours(model, ids, tokens)
            return toks, times

    best, out_tokens = 0.0, []
    for _ in range(repeats):
        toks, times = run()
        best = max(best, (len(times) - 1) / (times[-1] - times[0]))
        out_tokens = toks
    # ops and host reads of one decode step: (prefill 8 + 1 step) minus (prefill 8)
    counts = []
    for n in (1, 2):
        from torch.profiler import ProfilerActivity, profile

        with count_host_reads() as reads, _kineto_quiet(), profile(activities=[ProfilerActivity.CPU]) as prof:
            if kind == "hf":
                hf_greedy(model, ids[:8], n)
            else:
                greedy_ours(model, ids[:8], n)
        counts.append(
            (sum(Counter(e.name for e in prof.events() if _launches(e)).values()), sum(reads.values()))
        )
    return {
        "tok_s": best,
        "tokens": out_tokens,
        "ops_per_token": counts[1][0] - counts[0][0],
        "host_reads_per_token": counts[1][1] - counts[0][1],
    }


def read_gbs(nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """GB/s a bf16 matrix-vector product streams its matrix at (decode's access pattern), all threads."""
    w = torch.ones(nbytes // 2 // 4096, 4096, dtype=torch.bfloat16)
    x = torch.ones(4096, dtype=torch.bfloat16)
    best = float("inf")
    torch.mv(w, x)
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mv(w, x)
        best = min(best, time.perf_counter() - t)
    return nbytes / best / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--before", type=Path, help="an earlier qwen35-lite checkout to time alongside")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    ap.add_argument("--one", choices=["ours", "hf"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    path = args.root / "qwen35-lite-bench-offload-e512"
    if args.one:
        torch.set_num_threads(os.cpu_count() or 1)
        print(json.dumps(one(args.one, path, args.tokens, args.repeats)))
        return
    from bench_offload import write_section
    from offload_runs import SPECS, machine

    from qwen35_lite.convert.synthetic import write_checkpoint
    from qwen35_lite.plan.cpu_features import cpu_has_native_bf16

    if not (path / "config.json").exists():
        print(f"writing the e512 checkpoint to {path} ...", file=sys.stderr)
        write_checkpoint(path, SPECS["e512"], dtype=torch.bfloat16, shard_bytes=256 << 20)
    configs = {"ours": (ROOT, "ours"), "transformers": (ROOT, "hf")}
    if args.before:
        configs = {"ours": configs["ours"], "ours-before": (args.before.resolve(), "ours"), **configs}
        configs.pop("transformers")
        configs["transformers"] = (ROOT, "hf")
    results: dict[str, list[dict]] = {name: [] for name in configs}
    for r in range(args.rounds):
        for name, (src, kind) in configs.items():
            env = dict(os.environ, PYTHONPATH=f"{src}{os.pathsep}{ROOT / 'bench'}")
            cmd = [sys.executable, __file__, "--one", kind, "--root", str(args.root)]
            cmd += ["--tokens", str(args.tokens), "--repeats", str(args.repeats)]
            p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=src)
            if p.returncode:
                sys.exit(f"{name} failed:\n{p.stderr[-3000:]}")
            results[name].append(json.loads(p.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1} {name}: {results[name][-1]['tok_s']:.2f} tok/s", file=sys.stderr)
    torch.set_num_threads(os.cpu_count() or 1)
    text = report(results, path, read_gbs(), machine(), cpu_has_native_bf16(), args)
    write_section(args.out, text, SECTION)
    print(text)


def report(results: dict, path: Path, gbs: float, where: str, bf16: bool | None, args) -> str:
    from bench_offload import weight_bytes_per_token

    per_tok = weight_bytes_per_token(path)
    best = {n: max(r["tok_s"] for r in runs) for n, runs in results.items()}
    med = {n: statistics.median(r["tok_s"] for r in runs) for n, runs in results.items()}
    lines = [
        SECTION,
        "",
        f"Machine: {where}; bf16 {'native' if bf16 else 'not native' if bf16 is False else 'unknown'}; "
        f"{torch.get_num_threads()} threads. Written by `python bench/bench_decode.py` on "
        f"{time.strftime('%Y-%m-%d')}.",
        "",
        f"e512 synthetic checkpoint (8 layers, hidden 1024, 512 experts top-10, bf16), every expert resident; "
        f"greedy decode of {args.tokens} tokens after a 32-token prompt, {args.rounds} rounds alternating the "
        "configurations (each a fresh process, best of its repeats); ops and host reads per decode token "
        "counted with torch.profiler and qwen35_lite.runtime.op_profile.",
        "",
        "| configuration | best tok/s | median tok/s | ops / token | host reads / token | GB/s of weights "
        "| of the read rate |",
        "|---|---|---|---|---|---|---|",
    ]
    for n, runs in results.items():
        g = per_tok * best[n] / 1e9
        lines.append(
            f"| {n} | {best[n]:.2f} | {med[n]:.2f} | {runs[0]['ops_per_token']} | "
            f"{runs[0]['host_reads_per_token']} | {g:.1f} | {100 * g / gbs:.0f}% |"
        )
    hf = "transformers"
    if args.before:
        rev = subprocess.run(
            ["git", "-C", str(args.before), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        )
        lines += [
            "",
            f"ours-before: the checkout at {args.before} ({rev.stdout.strip() or 'not a git tree'}).",
        ]
    lines += [
        "",
        f"A token reads {per_tok / 2**20:.0f} MiB of weights; the machine streams a bf16 matrix-vector "
        f"product at {gbs:.1f} GB/s (the roofline: {gbs * 1e9 / per_tok:.0f} tok/s).",
        "",
        f"Ratios (median rounds): ours / transformers = **{med['ours'] / med[hf]:.1f}x** "
        f"(best: {best['ours'] / best[hf]:.1f}x)"
        + (
            f"; ours / ours-before = **{med['ours'] / med['ours-before']:.2f}x**; ops per token "
            f"{results['ours-before'][0]['ops_per_token']} -> {results['ours'][0]['ops_per_token']} "
            f"(**{results['ours-before'][0]['ops_per_token'] / results['ours'][0]['ops_per_token']:.1f}x** "
            "fewer)"
            if "ours-before" in results
            else ""
        )
        + ".",
        "",
        "The Qwen3.5-397B projection (CPU and GPU together against copy-only): `bench/bench_projection.py`.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
