"""An FP8 checkpoint against its bf16 twin on the CPU under the same --cpu-mem: RAM expert slots per
layer and decode speed (bf16 compute), with the FP8 slots run by the CPU FP8 kernel
(experts/formats/fp8_cpu.py).

    python bench/bench_fp8.py [--root /tmp] [--rounds 3] [--cpu-mem 1.2 4]

Writes the e128 synthetic checkpoint (bench/offload_runs.py: hidden 1024, 128 experts top-8, FFN 256,
8 layers) in bf16 and with block-128 FP8 experts if missing; each configuration is one `qwen35-lite
bench` subprocess, rounds alternate them, medians. Writes the "FP8 experts (CPU)" section of
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
SECTION = "## FP8 experts (CPU)"


def bench(model: Path, cpu_mem: float, tokens: int) -> dict:
    cmd = [sys.executable, str(ROOT / "cli.py"), "bench", "-m", str(model), "--device", "cpu", "--json"]
    cmd += ["--dtype", "bfloat16", "--cpu-mem", str(cpu_mem), "--prompt-tokens", "32"]
    cmd += ["--new-tokens", str(tokens)]
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if p.returncode:
        sys.exit(f"bench failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=Path("/tmp"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--cpu-mem", type=float, nargs="+", default=[1.2, 4.0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = ap.parse_args()
    from offload_runs import SPECS, machine

    from qwen35_lite.convert.synthetic import write_checkpoint

    paths = {"bf16": args.root / "qwen35-lite-bench-e128", "fp8": args.root / "qwen35-lite-bench-e128-fp8"}
    for name, path in paths.items():
        if not (path / "config.json").exists():
            write_checkpoint(
                path, SPECS["e128"], dtype=torch.bfloat16, shard_bytes=256 << 20, fp8_experts=name == "fp8"
            )
    res: dict[tuple[str, float], list[dict]] = {}
    loads = []
    for r in range(args.rounds):
        for mem in args.cpu_mem:
            for name, path in paths.items():
                loads.append(os.getloadavg()[0])
                out = bench(path, mem, args.tokens)
                res.setdefault((name, mem), []).append(out)
                print(f"round {r + 1} {name} --cpu-mem {mem}: {out['decode_tok_s']} tok/s", file=sys.stderr)
    lines = [
        SECTION,
        "",
        f"`python bench/bench_fp8.py --rounds {args.rounds}` ({machine()},"
        f" {torch.get_num_threads()} threads, bf16 compute; load average {statistics.median(loads):.1f} at the"
        " starts, other work shares the machine). The e128 checkpoint (hidden 1024, 128 experts top-8, FFN 256,"
        " 8 layers) in bf16 and with FP8 experts; decode tok/s, medians of alternated rounds.",
        "",
        "| --cpu-mem | experts | RAM slots / layer | decode tok/s | FP8 / bf16 | rounds |",
        "|---|---|---:|---:|---:|---|",
    ]
    for mem in args.cpu_mem:
        base = statistics.median(o["decode_tok_s"] for o in res[("bf16", mem)])
        for name in paths:
            runs = res[(name, mem)]
            tok = statistics.median(o["decode_tok_s"] for o in runs)
            lines.append(
                f"| {mem} GiB | {name} | {runs[0]['plan']['cpu_slots']} | {tok:.1f} | {tok / base:.2f} |"
                f" {', '.join(str(o['decode_tok_s']) for o in runs)} |"
            )
    low = min(args.cpu_mem)
    slots = {n: res[(n, low)][0]["plan"]["cpu_slots"] for n in ("bf16", "fp8")}
    speed = {n: statistics.median(o["decode_tok_s"] for o in res[(n, low)]) for n in ("bf16", "fp8")}
    lines += [
        "",
        "FP8 slots hold the checkpoint's bytes (weights + block scales), read once per use by the CPU FP8"
        " kernel (`experts/formats/fp8_cpu.py`: e4m3 to exact bf16 by two byte lookups, then `vdpbf16ps`), the"
        " default wherever its AVX512-BF16 path builds (`QWEN35_LITE_FP8_CPU_KERNEL=0` turns it off). A"
        " prefill dequantises an expert in one pass into fp32 and runs its rows through fp32 matmuls, 64 at"
        f" a time, which the plan counts (`prefill_nbytes`). At {low} GiB: {slots['fp8'] / slots['bf16']:.1f}x"
        f" the slots of bf16 ({slots['fp8']} against {slots['bf16']} a layer) and"
        f" {speed['fp8'] / speed['bf16']:.2f}x its decode.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    from bench_formats import write_section

    write_section(args.out, text, SECTION)


if __name__ == "__main__":
    main()
