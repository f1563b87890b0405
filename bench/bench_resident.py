"""Compact resident layers on the CPU (issue 18 items 1 and 3): the matvec rate of each encoding, and e512
decode with its resident Linears in bf16, int8 and int4 (routed experts bf16 in all, every expert resident).

    python bench/bench_resident.py [--rounds 3] [--tokens 32]

Matvec: one [16384, 4096] weight (128 MiB in bf16) times one row, each encoding through `kernels.linear`,
rounds alternated, medians; GB/s of the bytes the encoding holds. Decode: the e512 synthetic checkpoint
(bench/offload_runs.py) and copies whose resident Linears are quantised with the community recipe's
targets (every Linear but the router, the shared-expert gate, DeltaNet's in_proj_a/b, lm_head unless
"lm_head too", the routed experts here), round-to-nearest; each configuration a fresh process per round,
rounds alternated, medians. A token's weight bytes are the resident tensors as held in memory (the plan's
figure) but the embedding table, plus the top-10 experts a layer. Writes the "Resident layers (CPU)"
section of docs/benchmarks.md.
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
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench")]
SECTION = "## Resident layers (CPU)"
# name -> (bits, group size or None, quantise lm_head too)
VARIANTS = {
    "bf16": None,
    "int8 per-channel": (8, None, False),
    "int8 g32": (8, 32, False),
    "int4 g32": (4, 32, False),
    "int4 g32, lm_head too": (4, 32, True),
}
IGNORE = [r"re:.*mlp\.gate$", r"re:.*shared_expert_gate$", r"re:.*linear_attn\.in_proj_[ab]$"]
IGNORE += [r"re:.*mlp\.experts.*", r"re:.*visual.*", r"re:.*mtp.*"]


# ---- matvec -----------------------------------------------------------------------------------------


def encodings(n: int, k: int) -> dict:
    """The same random weight in each encoding (kernels.compact on a bf16 CPU)."""
    from qwen35_lite.experts.formats.compressed import quantize
    from qwen35_lite.kernels import PackedWeight, compact
    from qwen35_lite.weights.packed import pack_int4, pack_int8

    w = torch.randn(n, k).to(torch.bfloat16)
    out = {"bf16": w}
    for name, (bits, group) in {
        "int8 per-channel": (8, None),
        "int8 g32": (8, 32),
        "int4 g32": (4, 32),
    }.items():
        q, scale, _ = quantize(w, bits, group or k, True)
        packed = (pack_int4 if bits == 4 else pack_int8)(q)
        pw = PackedWeight.from_stored(bits, packed, scale, None, (n, k))
        out[name] = compact(pw, "cpu", torch.bfloat16)
    return out


def matvec_rates(rounds: int, n: int = 16384, k: int = 4096) -> tuple[dict[str, float], dict[str, float]]:
    """(GB/s each encoding streams its bytes at in a one-row product, ms of a 512-row product), medians
    over alternated rounds."""
    from qwen35_lite.kernels import linear

    enc = encodings(n, k)
    x = torch.randn(1, k).to(torch.bfloat16)
    xs = torch.randn(512, k).to(torch.bfloat16)
    times: dict[str, list[float]] = {name: [] for name in enc}
    block: dict[str, list[float]] = {name: [] for name in enc}
    for _ in range(rounds * 5):
        for name, w in enc.items():
            linear(x, w)
            t = time.perf_counter()
            linear(x, w)
            times[name].append(time.perf_counter() - t)
    for _ in range(rounds):
        for name, w in enc.items():
            t = time.perf_counter()
            linear(xs, w)
            block[name].append(time.perf_counter() - t)
    nbytes = {name: (w.numel() * 2 if isinstance(w, torch.Tensor) else w.nbytes) for name, w in enc.items()}
    gbs = {name: nbytes[name] / statistics.median(ts) / 1e9 for name, ts in times.items()}
    return gbs, {name: 1e3 * statistics.median(ts) for name, ts in block.items()}


# ---- checkpoints --------------------------------------------------------------------------------------


def quantize_resident(src: Path, dst: Path, bits: int, group: int | None, head: bool) -> Path:
    """A copy of `src` whose resident Linears (the recipe's targets, lm_head when `head`) are W{bits}A16
    symmetric pack-quantized, round-to-nearest; the routed experts and everything else as they were."""
    import shutil

    from safetensors.torch import load_file, save_file

    from qwen35_lite.convert.quantize import quantization_config
    from qwen35_lite.experts.formats.compressed import quantize
    from qwen35_lite.weights.packed import QuantScheme, covers, pack_int4, pack_int8

    ignore = IGNORE + ([] if head else ["lm_head"])
    dst.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for shard in sorted(src.glob("*.safetensors")):
        out = {}
        for name, t in load_file(shard).items():
            module = name.removesuffix(".weight")
            if (
                t.dim() == 2
                and module != name
                and "embed_tokens" not in name
                and covers(["Linear"], ignore, module)
            ):
                q, scale, _ = quantize(t.float(), bits, group or t.shape[1], True)
                out[module + ".weight_packed"] = (pack_int4 if bits == 4 else pack_int8)(q)
                out[module + ".weight_scale"] = scale.to(torch.bfloat16).contiguous()
                out[module + ".weight_shape"] = torch.tensor(t.shape, dtype=torch.int64)
            else:
                out[name] = t
        save_file(out, str(dst / shard.name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(out, shard.name))
    for f in src.iterdir():
        if f.suffix in (".json", ".jinja", ".txt") and f.name != "model.safetensors.index.json":
            shutil.copy(f, dst / f.name)
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = json.loads((dst / "config.json").read_text())
    qc = quantization_config(QuantScheme(bits=bits, group_size=group, symmetric=True))
    qc["config_groups"]["group_0"]["targets"] = ["Linear"]
    qc["ignore"] = ignore
    config["quantization_config"] = qc
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


def checkpoints(root: Path) -> dict[str, Path]:
    from offload_runs import SPECS

    from qwen35_lite.convert.synthetic import write_checkpoint

    base = root / "qwen35-lite-bench-offload-e512"
    if not (base / "config.json").exists():
        print(f"writing the e512 checkpoint to {base} ...", file=sys.stderr)
        write_checkpoint(base, SPECS["e512"], dtype=torch.bfloat16, shard_bytes=256 << 20)
    out = {}
    for name, v in VARIANTS.items():
        if v is None:
            out[name] = base
            continue
        bits, group, head = v
        path = root / f"qwen35-lite-bench-resident-w{bits}-g{group}-head{int(head)}"
        if not (path / "config.json").exists():
            print(f"writing {path} ...", file=sys.stderr)
            quantize_resident(base, path, bits, group, head)
        out[name] = path
    return out


# ---- decode -------------------------------------------------------------------------------------------


def one(path: Path, tokens: int, repeats: int) -> dict:
    """In the subprocess: load (every expert resident), warm up, the best of `repeats` decodes."""
    from offload_runs import SPECS, greedy_ours, prompt_ids

    from qwen35_lite.experts.cache import TieredExperts
    from qwen35_lite.experts.store import ExpertStore
    from qwen35_lite.model.qwen35 import Qwen35Model
    from qwen35_lite.plan.memory import MemoryPlan
    from qwen35_lite.weights.checkpoint import Checkpoint
    from qwen35_lite.weights.config import load_config

    spec = SPECS["e512"]
    config = load_config(path)
    cfg, ckpt = config.text, Checkpoint(path)
    bf16 = torch.bfloat16
    store = ExpertStore(ckpt, cfg, raw_config=config.raw)
    provider = TieredExperts(store, "cpu", bf16, cpu_slots=cfg.num_experts)
    provider.preload()
    model = Qwen35Model.load(ckpt, cfg, provider, torch.device("cpu"), bf16)
    greedy_ours(model, prompt_ids(spec, 32, seed=1), 3)
    ids = prompt_ids(spec, 32, seed=0)
    best = 0.0
    for _ in range(repeats):
        _, times, _ = greedy_ours(model, ids, tokens)
        best = max(best, (len(times) - 1) / (times[-1] - times[0]))
    prompt = prompt_ids(spec, 512, seed=2)
    prefill = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        model.prefill(model.make_cache(), prompt)
        prefill = max(prefill, len(prompt) / (time.perf_counter() - t))
    plan = MemoryPlan.build(cfg, device="cpu", dtype=bf16, ckpt=ckpt, raw_config=config.raw, cpu_mem=64)
    resident = sum(v for n, v in plan._resident_memory.items() if n != "embed_tokens.weight")
    experts = cfg.num_hidden_layers * cfg.num_experts_per_tok * plan.slot_bytes
    return {
        "tok_s": best,
        "prefill_tok_s": prefill,
        "bytes_per_token": resident + experts,
        "resident_bytes": resident,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    ap.add_argument("--one", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(one(args.one, args.tokens, args.repeats)))
        return
    from bench_offload import write_section
    from offload_runs import machine

    from qwen35_lite.plan.cpu_features import cpu_has_native_bf16

    paths = checkpoints(args.root)
    rates, block_ms = matvec_rates(args.rounds)
    print("matvec GB/s:", {k: round(v, 1) for k, v in rates.items()}, file=sys.stderr)
    print("512 rows, ms:", {k: round(v, 1) for k, v in block_ms.items()}, file=sys.stderr)
    results: dict[str, list[dict]] = {name: [] for name in paths}
    for r in range(args.rounds):
        for name, path in paths.items():
            env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'bench'}")
            cmd = [sys.executable, __file__, "--one", str(path), "--threads", str(args.threads)]
            cmd += ["--tokens", str(args.tokens), "--repeats", str(args.repeats)]
            p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
            if p.returncode:
                sys.exit(f"{name} failed:\n{p.stderr[-3000:]}")
            results[name].append(json.loads(p.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1} {name}: {results[name][-1]['tok_s']:.2f} tok/s", file=sys.stderr)
    text = report(results, rates, block_ms, machine(), cpu_has_native_bf16(), args)
    write_section(args.out, text, SECTION)
    print(text)


def report(results: dict, rates: dict, block_ms: dict, where: str, bf16: bool | None, args) -> str:
    med = {n: statistics.median(r["tok_s"] for r in runs) for n, runs in results.items()}
    amx = "AMX" if "amx_bf16" in Path("/proc/cpuinfo").read_text() else "no AMX"
    lines = [
        SECTION,
        "",
        f"Machine: {where}; bf16 {'native' if bf16 else 'not native'} ({amx}); {args.threads} threads. "
        f"Written by `python bench/bench_resident.py` on {time.strftime('%Y-%m-%d')}; a shared machine: "
        f"{args.rounds} rounds alternating the configurations, medians.",
        "",
        "Matvec: one [16384, 4096] weight times one row through `kernels.linear`, GB/s of the bytes each "
        "encoding holds (int4 and int8 g32 include their (scale, zero) tables); and times 512 rows (a prefill "
        "chunk: the weight dequantised once, a block of rows at a time, then the bf16 GEMM):",
        "",
        "| encoding | one-row kernel | GB/s | 512 rows, ms |",
        "|---|---|---|---|",
    ]
    kernels = {  # where the C kernels build (kernels/cbuild.py); torch's kernels otherwise
        "bf16": "kernels/dense_cpu.py (torch.mv without AVX512-BF16)",
        "int8 per-channel": "kernels/int8_cpu.py (`_weight_int8pack_mm` without a compiler)",
        "int8 g32": "kernels/int8_cpu.py, group scales (two int4 kernel calls without a compiler)",
        "int4 g32": "kernels/int4_cpu.py (`_weight_int4pack_mm_for_cpu` without a compiler)",
    }
    lines += [f"| {n} | {kernels[n]} | {g:.1f} | {block_ms[n]:.1f} |" for n, g in rates.items()]
    lines += [
        "",
        f"Decode: e512 synthetic checkpoint (8 layers, hidden 1024, vocab 32768, 512 experts top-10 in bf16, "
        f"every expert resident), resident Linears as named (lm_head bf16 unless said), bf16 compute; greedy "
        f"decode of {args.tokens} tokens after a 32-token prompt, best of {args.repeats} a process; prefill: a "
        f"512-token prompt through `Qwen35Model.prefill`, best of {args.repeats}.",
        "",
        "| resident Linears | median tok/s | vs bf16 | resident MiB (held) | MiB a token | GB/s of weights "
        "| of its matvec rate | prefill tok/s (512) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n, runs in results.items():
        per_tok = runs[0]["bytes_per_token"]
        g = per_tok * med[n] / 1e9
        rate = rates["bf16" if n == "bf16" else n.split(",")[0]]
        lines.append(
            f"| {n} | {med[n]:.2f} | {med[n] / med['bf16']:.2f}x | {runs[0]['resident_bytes'] / 2**20:.0f} | "
            f"{per_tok / 2**20:.0f} | {g:.1f} | {100 * g / rate:.0f}% | "
            f"{statistics.median(r['prefill_tok_s'] for r in runs):.0f} |"
        )
    lines += [
        "",
        "GB/s of weights: a token's bytes (resident as held, the embedding table excepted, plus its top-10 "
        "experts a layer) times tok/s; against the matvec rate of the resident encoding (the experts and, "
        "but in the last row, the head stay bf16).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
