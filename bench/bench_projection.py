"""Qwen3.5-397B on the reference box (RTX 4090 24 GB, 128 GB dual-channel DDR5, PCIe 4.0, one PCIe 4.0
NVMe: docs/offloading-anchors §3.2), projected from the memory plan and the CPU kernel rates measured on
this machine (issue 18: "the 397B projection redone with compact resident layers and the measured CPU
kernel rates, CPU+GPU against copy-only").

    python bench/bench_projection.py [--rounds 5] [--threads 2]

1. Measured here: the byte rate of each CPU kernel a decode step runs (a resident Linear's matvec, a
   step's top-10 experts at the 397B shape: hidden 4096, FFN 1024) as a fraction of a plain bf16
   matrix-vector product's (the machine's memory-read rate for this access pattern); rounds alternated,
   medians.
2. Projected: `MemoryPlan` for the 397B (`info --device cuda --gpu-mem 22.5 --cpu-mem 110|230 --ctx 8192`,
   and `--device cpu --cpu-mem 110`) per checkpoint format, uniform routing (hit = slots / experts). The
   reference box's CPU kernels are taken to stream at 50 GB/s (its DDR5 read rate) times the fraction
   measured here for that kernel: a kernel that reaches a third of the matvec rate here is assumed to
   reach a third of 50 GB/s there.

Writes the "Qwen3.5-397B, projected" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
SECTION = "## Qwen3.5-397B, projected"
# the reference box (anchors §3.2): GPU memory, PCIe 4.0 x16 pinned copies, NVMe reads, DDR5 reads (GB/s)
GPU_GBS, PCIE_GBS, NVME_GBS, DDR5_GBS = 1008.0, 25.0, 6.5, 50.0
D, I, A = 4096, 1024, 10


# ---- 1. kernel rates, measured ----------------------------------------------------------------------------


def kernels() -> dict[str, tuple]:
    """name -> (callable, weight bytes it reads). The stacks as a decode step runs them (bench_kernels)."""
    from bench_kernels import dense_stack, int4_stack
    from bench_resident import encodings

    from qwen35_lite.experts.formats import Fp8BlockFormat
    from qwen35_lite.experts.slots import SlotTier
    from qwen35_lite.kernels import linear

    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, D, generator=g).bfloat16()
    slots = torch.randperm(24, generator=g)[:A]
    dense = dense_stack(24).stacks[0]
    t4, f4 = int4_stack(24)
    fmt8 = Fp8BlockFormat.build(D, I, torch.device("cpu"), torch.bfloat16, torch.float8_e4m3fn)
    t8 = SlotTier("ram", fmt8, 1, 24, lambda: None, lambda k: torch.randint(0, 120, (k,), dtype=torch.uint8))
    enc = encodings(16384, 4096)
    xr = torch.randn(1, 4096, generator=g).bfloat16()
    return {
        "matvec": (lambda: torch.mv(enc["bf16"], xr[0]), enc["bf16"].nbytes),
        "resident bf16": (lambda: linear(xr, enc["bf16"]), enc["bf16"].nbytes),
        "resident int4": (lambda: linear(xr, enc["int4 g32"]), enc["int4 g32"].nbytes),
        "resident int8": (lambda: linear(xr, enc["int8 per-channel"]), enc["int8 per-channel"].nbytes),
        "experts bf16": (lambda: dense(x, slots), A * 3 * D * I * 2),
        "experts fp8": (lambda: t8.stacks[0](x, slots), A * 3 * D * I),
        "experts int4": (lambda: t4.stacks[0](x, slots), A * f4.slot_nbytes),
    }


def rates(rounds: int) -> dict[str, float]:
    """name -> GB/s, medians over alternated rounds (each the median of 5 calls after a warm-up)."""
    from bench_kernels import timed

    ks = kernels()
    got: dict[str, list[float]] = {k: [] for k in ks}
    for _ in range(rounds):
        for name, (fn, nbytes) in ks.items():
            got[name].append(nbytes / timed(fn) / 1e9)
    return {k: statistics.median(v) for k, v in got.items()}


# ---- 2. the projection ------------------------------------------------------------------------------------


def configs() -> dict[str, tuple[dict | None, torch.dtype, str, str]]:
    """name -> (quantization_config, stored dtype, its experts' kernel, its resident kernel)."""
    from bench_formats import W4_G128

    from qwen35_lite.convert.recipe import RECIPE_IGNORE
    from qwen35_lite.convert.synthetic import FP8_CONFIG

    all_linear = {**W4_G128, "config_groups": {"group_0": {**W4_G128["config_groups"]["group_0"]}}}
    all_linear["config_groups"]["group_0"]["targets"] = ["Linear"]
    all_linear["ignore"] = RECIPE_IGNORE
    return {
        "bf16": (None, torch.bfloat16, "experts bf16", "resident bf16"),
        "FP8 experts": (FP8_CONFIG, torch.float8_e4m3fn, "experts fp8", "resident bf16"),
        "int4 g128 experts, rest bf16": (W4_G128, torch.bfloat16, "experts int4", "resident bf16"),
        "int4 g128 every Linear (W4A16 community)": (
            all_linear,
            torch.bfloat16,
            "experts int4",
            "resident int4",
        ),
    }


def plan(qc: dict | None, stored: torch.dtype, device: str, ram: int):
    from qwen35_lite.plan.memory import MemoryPlan
    from qwen35_lite.weights.config import TextConfig

    return MemoryPlan.build(
        TextConfig(), device=device, dtype=torch.bfloat16, stored_dtype=stored,
        raw_config={"quantization_config": qc} if qc else {}, gpu_mem=22.5, cpu_mem=ram, context=8192,
    )  # fmt: skip


def gpu_rows(fraction: dict[str, float]) -> list[str]:
    """CUDA plans: copy-only (the GPU computes all 600 experts a token, every miss copied over PCIe)
    against CPU and GPU together (the GPU its hits, the CPU the RAM tier's experts in place, disk misses
    read into RAM first); serial: the terms one after another, overlapped: the slowest alone."""
    from qwen35_lite.plan.table import expert_split

    rows = []
    for name, (qc, stored, ekernel, _) in configs().items():
        for ram in (110, 230):
            p = plan(qc, stored, "cuda", ram)
            split = expert_split(p)
            lookups = p.cfg.num_experts_per_tok * p.moe_layers
            slot = p.slot_bytes
            resident_s = p.weights_gpu / (GPU_GBS * 1e9)
            disk_s = lookups * split["disk"] * p.expert_disk_bytes / (NVME_GBS * 1e9)
            gpu_all = resident_s + lookups * slot / (GPU_GBS * 1e9)
            pcie_s = lookups * (1 - split["gpu"]) * slot / (PCIE_GBS * 1e9)
            copy = (1 / (gpu_all + disk_s + pcie_s), 1 / max(gpu_all, disk_s, pcie_s))
            cpu_gbs = DDR5_GBS * fraction[ekernel]
            gpu_hits = resident_s + lookups * split["gpu"] * slot / (GPU_GBS * 1e9)
            cpu_s = lookups * (1 - split["gpu"]) * slot / (cpu_gbs * 1e9)
            both = (1 / max(gpu_hits, cpu_s + disk_s), 1 / max(gpu_hits, cpu_s, disk_s))
            n = {k: round(lookups * v) for k, v in split.items()}
            rows.append(
                f"| {name} | {ram} GB | {p.weights_gpu / 2**30:.1f} | {p.gpu_slots} / {p.cpu_slots} | "
                f"{n['gpu']} / {n['ram']} / {n['disk']} | {cpu_gbs:.0f} | {copy[0]:.2f} / {copy[1]:.2f} | "
                f"{both[0]:.2f} / {both[1]:.2f} |"
            )
    return rows


def cpu_rows(fraction: dict[str, float]) -> list[str]:
    """CPU-only plans (no GPU, 110 GiB for the runner): a token reads its resident Linears (all but the
    embedding table, one row of which it gathers) and its RAM-tier experts at the kernels' rates, and its
    disk misses at the NVMe's; serial, and overlapped (disk reads beside compute)."""
    from qwen35_lite.plan.table import expert_split

    rows = []
    for name, (qc, stored, ekernel, rkernel) in configs().items():
        p = plan(qc, stored, "cpu", 110)
        split = expert_split(p)
        lookups = p.cfg.num_experts_per_tok * p.moe_layers
        embed = p.cfg.vocab_size * p.cfg.hidden_size * 2
        resident = p.weights_cpu - embed
        res_s = resident / (DDR5_GBS * fraction[rkernel] * 1e9)
        exp_s = lookups * (1 - split["disk"]) * p.slot_bytes / (DDR5_GBS * fraction[ekernel] * 1e9)
        disk_s = lookups * split["disk"] * p.expert_disk_bytes / (NVME_GBS * 1e9)
        rows.append(
            f"| {name} | {resident / 2**30:.1f} | {p.cpu_slots} | {100 * (1 - split['disk']):.0f}% | "
            f"{1 / (res_s + exp_s + disk_s):.2f} / {1 / max(res_s + exp_s, disk_s):.2f} |"
        )
    return rows


def report(gbs: dict[str, float], fraction: dict[str, float], args) -> str:
    from offload_runs import machine

    from qwen35_lite.plan.cpu_features import cpu_has_native_bf16

    load = os.getloadavg()[0]
    kernel_rows = [f"| {k} | {gbs[k]:.1f} | {fraction[k]:.2f} |" for k in gbs]
    lines = [
        SECTION,
        "",
        f"`python bench/bench_projection.py --rounds {args.rounds} --threads {args.threads}` on {machine()}; "
        f"bf16 native: {cpu_has_native_bf16()}; {args.threads} threads; load average {load:.1f} at the end.",
        "",
        "Measured here: each CPU kernel's byte rate (resident Linears: one [16384, 4096] weight times one row "
        "through `kernels.linear`, int4 g32 and int8 per-channel; experts: a decode step's top-10 at the 397B "
        "shape through their layer's stack) against a bf16 `torch.mv` of the same size:",
        "",
        "| kernel | GB/s here | of the matvec rate |",
        "|---|---:|---:|",
        *kernel_rows,
        "",
        "Projected, GPU and CPU (`--device cuda --gpu-mem 22.5 --cpu-mem` as shown, 8K context, uniform "
        "routing). The reference box's CPU kernel rate is 50 GB/s times the fraction above for the "
        "format's expert kernel:",
        "",
        "| checkpoint | RAM | resident on the GPU, GiB | GPU / RAM slots a layer | experts a token: GPU / "
        "RAM / disk | CPU GB/s | copy-only tok/s (serial / overlapped) | CPU+GPU tok/s (serial / overlapped) |",
        "|---|---|---:|---|---|---:|---|---|",
        *gpu_rows(fraction),
        "",
        "Projected, CPU only (`--device cpu --cpu-mem 110`, the same box without its GPU): a token reads its "
        "resident Linears (the embedding table aside) and its experts at the kernels' rates above times 50 "
        "GB/s, and its misses from the NVMe:",
        "",
        "| checkpoint | resident read a token, GiB | RAM slots a layer | experts from RAM | tok/s (serial / "
        "overlapped) |",
        "|---|---:|---:|---:|---|",
        *cpu_rows(fraction),
        "",
        f"Rates: GPU {GPU_GBS:g} GB/s (RTX 4090), PCIe {PCIE_GBS:g} GB/s (4.0 x16, pinned), NVMe {NVME_GBS:g} "
        f"GB/s, DDR5 {DDR5_GBS:g} GB/s (dual channel). Serial: the terms one after another (CPU+GPU: the "
        "GPU beside the CPU's reads and compute); overlapped: the slowest alone. GPU-side dequantisation "
        "and per-op overheads are not counted (no GPU here); real routing has more locality than uniform, "
        "so the hit rates are floors.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gbs = rates(args.rounds)
    fraction = {k: min(1.0, v / gbs["matvec"]) for k, v in gbs.items()}
    from bench_formats import write_section

    text = report(gbs, fraction, args)
    write_section(args.out, text, SECTION)
    print(text)


if __name__ == "__main__":
    main()
