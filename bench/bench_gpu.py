"""Offloading benchmark on a CUDA GPU: qwen35-lite vs transformers (+ accelerate), one script.

    python bench/bench_gpu.py --root /tmp/q35 [--layers 12] [--gpu-mem 24] [--cpu-mem 64] [--only ...]

A synthetic bf16 checkpoint with the real model's routing (top-10 of 512 experts, 9 MiB experts) and
several times larger than --gpu-mem is written once under --root. Each configuration runs in its own
subprocess; its GPU memory is sampled from outside (nvidia-smi) every 50 ms.

- ours, GPU resident:        `qwen35-lite bench` with no budget: every expert in a GPU slot
- ours, --gpu-mem/--cpu-mem: GPU slots in front of RAM slots in front of the safetensors, warm page
                             cache and cold (posix_fadvise(DONTNEED) on every shard first); and with
                             --cpu-mem 16 so that misses go to the NVMe
- transformers, resident:    from_pretrained(device_map="cuda")
- transformers + accelerate: device_map="auto", max_memory={0: gpu-mem, "cpu": cpu-mem}

Figures go to the "Offloading (GPU)" section of docs/benchmarks.md (the rest of the file is kept) and,
raw, to --json. transformers and accelerate are benchmark-only dependencies.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from bench_offload import leading_match, write_section  # noqa: E402
from offload_runs import ckpt_files, hf_greedy, hf_placement, machine, warm_page_cache  # noqa: E402

from qwen35_lite.convert.synthetic import SyntheticSpec, write_checkpoint  # noqa: E402
from qwen35_lite.experts.store import evict_page_cache  # noqa: E402
from qwen35_lite.plan.sizes import tensor_shapes  # noqa: E402
from qwen35_lite.weights.config import parse_config  # noqa: E402

SECTION = "## Offloading (GPU)"
SPEC = dict(
    hidden_size=2048,
    num_attention_heads=16,
    num_key_value_heads=2,
    head_dim=128,
    linear_num_key_heads=8,
    linear_num_value_heads=16,
    linear_key_head_dim=128,
    linear_value_head_dim=128,
    num_experts=512,
    num_experts_per_tok=10,
    moe_intermediate_size=768,
    shared_expert_intermediate_size=768,
)


def configs(gpu_mem: float, cpu_mem: float) -> dict[str, dict]:
    budget = ["--gpu-mem", str(gpu_mem), "--cpu-mem", str(cpu_mem)]
    return {
        "ours-resident": dict(kind="ours", flags=["--cpu-experts", "32", "--profile"], cache="warm"),
        "hf-resident": dict(kind="hf", budget=None, cache="warm"),
        "ours-budget-warm": dict(kind="ours", flags=budget + ["--profile"], cache="warm"),
        # CPU and GPU together against copy-only, same budget: RAM holds most experts
        "ours-budget-cpu-compute": dict(kind="ours", flags=budget + ["--cpu-compute", "on"], cache="warm"),
        "ours-budget-copy-only": dict(kind="ours", flags=budget + ["--cpu-compute", "off"], cache="warm"),
        "hf-accelerate-warm": dict(kind="hf", budget=(gpu_mem, cpu_mem), cache="warm"),
        "ours-budget-cold": dict(kind="ours", flags=budget, cache="cold"),
        "ours-nvme-cold": dict(
            kind="ours", flags=["--gpu-mem", str(gpu_mem), "--cpu-mem", "16"], cache="cold"
        ),
    }


# ---- one configuration, in a subprocess -----------------------------------------------------------


def gpu_used_by(pid: int) -> int:
    out = subprocess.run(
        ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
    ).stdout
    for line in out.splitlines():
        p, used = (x.strip() for x in line.split(","))
        if p == str(pid):
            return int(used) << 20
    return 0


def sampled(args: list[str], timeout: float) -> tuple[dict, int, float]:
    """Run `args`; return its last stdout line as JSON, its peak GPU memory (sampled), and the wall time."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            peak[0] = max(peak[0], gpu_used_by(proc.pid))

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        done.set()
        thread.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{args[2:4]} failed:\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1]), peak[0], time.perf_counter() - t0


def run_ours(path: Path, flags: list[str], prompt: int, n_new: int) -> dict:
    cli = [sys.executable, str(ROOT / "cli.py"), "bench", "-m", str(path), "--device", "cuda", "--json"]
    args = cli + ["--prompt-tokens", str(prompt), "--new-tokens", str(n_new), *flags]
    result, peak, wall = sampled(args, timeout=480)
    return {
        "decode_tok_s": result["decode_tok_s"],
        "tokens": result["tokens"],
        "stats": result,
        "peak_gpu_sampled": peak,
        "wall_s": wall,
    }


def hf_main(path: Path, budget: list[float] | None, prompt: int, n_new: int) -> None:
    """Subprocess entry: transformers' greedy decode of the same workload; prints one JSON line."""
    from transformers import Qwen3_5MoeForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    if budget is None:
        kw: dict = dict(device_map="cuda")
    else:
        kw = dict(device_map="auto", max_memory={0: f"{budget[0]}GiB", "cpu": f"{budget[1]}GiB"})
    t0 = time.perf_counter()
    model = Qwen3_5MoeForCausalLM.from_pretrained(path, dtype=torch.bfloat16, **kw).eval()
    load_s = time.perf_counter() - t0
    placement = hf_placement(model)
    ids = workload_ids(path, prompt).cuda()
    hf_greedy(model, ids, 2)  # warm-up
    s = hf_greedy(model, ids, n_new)
    tok_s = (len(s.times) - 1) / (s.times[-1] - s.times[0])
    print(
        json.dumps(
            {
                "decode_tok_s": tok_s,
                "tokens": s.tokens,
                "placement": placement,
                "load_s": load_s,
                "peak_gpu_bytes": torch.cuda.max_memory_allocated(),
            }
        )
    )


def workload_ids(path: Path, n: int) -> torch.Tensor:
    """The ids `qwen35-lite bench` uses (benchmark.prompt_ids: seed 0, below the first stop id)."""
    gen = json.loads((path / "generation_config.json").read_text())
    high = min(248320, *gen["eos_token_id"])
    return torch.randint(0, high, (n,), generator=torch.Generator().manual_seed(0))


def run_hf(path: Path, budget, prompt: int, n_new: int) -> dict:
    args = [sys.executable, __file__, "--hf", str(path), "--prompt", str(prompt), "--tokens", str(n_new)]
    if budget is not None:
        args += ["--hf-budget", str(budget[0]), str(budget[1])]
    result, peak, wall = sampled(args, timeout=540)
    return {**result, "peak_gpu_sampled": peak, "wall_s": wall}


# ---- the report ------------------------------------------------------------------------------------


def spec_bytes(spec: SyntheticSpec) -> tuple[int, int]:
    """(checkpoint bytes, weight bytes one resident decode step reads) of the bf16 checkpoint, from the
    spec alone: every resident tensor but the embedding table (one row is gathered), plus top-k experts."""
    cfg = parse_config({"model_type": "qwen3_5_moe", "text_config": spec.text_config()}).text
    resident = {n: 2 * math.prod(s) for n, s in tensor_shapes(cfg).items()}
    experts = spec.num_hidden_layers * spec.num_experts * spec.expert_bytes()
    active = spec.num_hidden_layers * spec.num_experts_per_tok * spec.expert_bytes()
    return sum(resident.values()) + experts, sum(resident.values()) - resident["embed_tokens.weight"] + active


def report(results: dict, args, spec: SyntheticSpec) -> str:
    ckpt_bytes, per_token = spec_bytes(spec)
    ckpt_gb = ckpt_bytes / 1e9

    def tps(name: str) -> str:
        r = results.get(name)
        return f"{r['decode_tok_s']:.2f}" if r else "–"

    def ratio(a: str, b: str) -> str:
        ra, rb = results.get(a), results.get(b)
        return f"**{ra['decode_tok_s'] / rb['decode_tok_s']:.1f}x**" if ra and rb else "–"

    lines = [
        SECTION,
        "",
        f"`python bench/bench_gpu.py --layers {args.layers} --gpu-mem {args.gpu_mem} --cpu-mem {args.cpu_mem}`"
        f" on {results.get('_machine') or machine()}.",
        f"Checkpoint: synthetic bf16, {spec.num_hidden_layers} layers, hidden {spec.hidden_size}, top-"
        f"{spec.num_experts_per_tok} of {spec.num_experts} experts of "
        f"{spec.expert_bytes() / 2**20:.0f} MiB, {ckpt_gb:.1f} GB on disk "
        f"({ckpt_gb * 1e9 / 2**30 / args.gpu_mem:.1f}x the --gpu-mem cap). Workload: {args.prompt} prompt "
        f"tokens, {args.tokens} greedy tokens; decode tok/s from the first new token to the last.",
        "",
        "| configuration | decode tok/s | GPU hit rate | RAM hit rate | GPU MB/token copied | disk MB/token"
        " | peak GPU (sampled) | leading tokens = ours resident |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    base = results.get("ours-resident", {}).get("tokens", [])
    for name, r in results.items():
        if name.startswith("_"):
            continue
        ex = r.get("stats", {})  # ours only: `qwen35-lite bench --json` counters

        def mb(key: str, ex=ex) -> str:
            v = ex.get(key)
            return f"{v / 1e6:.0f}" if v is not None else "–"

        def rate(key: str, ex=ex) -> str:
            v = ex.get(key)
            return f"{v:.2f}" if v is not None else "–"

        match = f"{leading_match(r['tokens'], base)}/{len(base)}" if base else "–"
        lines.append(
            f"| {name} | {r['decode_tok_s']:.2f} | {rate('gpu_hit_rate')} | {rate('ram_hit_rate')} | "
            f"{mb('gpu_bytes_per_token')} | {mb('disk_bytes_per_token')} | "
            f"{r['peak_gpu_sampled'] / 2**30:.1f} GiB | {match} |"
        )
    resident = results.get("ours-resident")
    frac = ""
    if resident:
        gbs = per_token * resident["decode_tok_s"] / 1e9
        frac = f" Resident decode reads {per_token / 1e9:.2f} GB of weights a token: {gbs:.0f} GB/s."
    lines += [
        "",
        f"Resident on the GPU: ours {tps('ours-resident')} vs transformers {tps('hf-resident')} tok/s = "
        f"{ratio('ours-resident', 'hf-resident')}.{frac}",
        f"Under --gpu-mem {args.gpu_mem} --cpu-mem {args.cpu_mem}, warm: ours {tps('ours-budget-warm')} vs "
        f"transformers + accelerate {tps('hf-accelerate-warm')} tok/s = "
        f"{ratio('ours-budget-warm', 'hf-accelerate-warm')}; cold: ours {tps('ours-budget-cold')} tok/s; "
        f"RAM tier capped at 16 GiB, cold (misses read from the NVMe): {tps('ours-nvme-cold')} tok/s.",
        "Tokens of transformers in bf16 on the GPU are not expected to equal ours bit for bit (other "
        "kernels); the last column shows how long they agree.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=Path("/tmp/q35-gpu-bench"))
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--experts", type=int, default=512)
    ap.add_argument("--gpu-mem", type=float, default=24)
    ap.add_argument("--cpu-mem", type=float, default=64)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--only", nargs="*", help="configurations to run (default: all)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    ap.add_argument("--json", type=Path, help="also write the raw results here (merged with earlier ones)")
    ap.add_argument("--hf", type=Path, help=argparse.SUPPRESS)  # the transformers subprocess
    ap.add_argument("--hf-budget", type=float, nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--report-only", action="store_true", help="re-render the section from --json")
    args = ap.parse_args()
    if args.hf:
        hf_main(args.hf, args.hf_budget, args.prompt, args.tokens)
        return
    spec = SyntheticSpec(**SPEC, num_hidden_layers=args.layers)
    spec.num_experts = args.experts
    if args.report_only:
        text = report(json.loads(args.json.read_text()), args, spec)
        write_section(args.out, text, SECTION)
        print(text)
        return
    path = args.root / f"gpu-{args.layers}x{args.experts}"
    if not (path / "model.safetensors.index.json").is_file():
        t0 = time.perf_counter()
        write_checkpoint(path, spec, dtype=torch.bfloat16, shard_bytes=4 << 30)
        print(f"wrote {path} in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    results = json.loads(args.json.read_text()) if args.json and args.json.is_file() else {}
    results["_machine"] = machine()
    for name, cfg in configs(args.gpu_mem, args.cpu_mem).items():
        if args.only and name not in args.only:
            continue
        files = ckpt_files(path)
        warm_page_cache(files) if cfg["cache"] == "warm" else evict_page_cache(files)
        try:
            if cfg["kind"] == "ours":
                results[name] = run_ours(path, cfg["flags"], args.prompt, args.tokens)
            else:
                results[name] = run_hf(path, cfg["budget"], args.prompt, args.tokens)
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            print(f"{name}: {e}", file=sys.stderr, flush=True)
            continue
        r = results[name]
        print(f"{name}: {r['decode_tok_s']:.2f} tok/s, wall {r['wall_s']:.0f} s", file=sys.stderr, flush=True)
        if args.json:
            args.json.write_text(json.dumps(results))
    text = report(results, args, spec)
    write_section(args.out, text, SECTION)
    print(text)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
