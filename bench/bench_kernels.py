"""The routed experts' CPU decode kernels at the 397B's expert shape (hidden 4096, FFN 1024, top-10):
weight bytes streamed per second by each way of running a decode step's experts, against a plain bf16
matrix-vector product (the machine's memory-read rate for this access pattern), plus FP8 -> bf16
conversion rates (what keeping FP8 slots on the CPU would cost per use).

    python bench/bench_kernels.py [--rounds 5] [--threads 2] [--slots 24]

Rounds alternate the configurations; medians. Writes the "Expert kernels (CPU)" section of
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from qwen35_lite.openmp import wait_passively  # noqa: E402

wait_passively()  # OpenMP threads wait as in a run (spinning, every 2-thread row here read 2-8x slower)
import torch  # noqa: E402

SECTION = "## Expert kernels (CPU)"
D, I, A = 4096, 1024, 10


def timed(fn, repeats: int = 5) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def dense_stack(n: int):
    from qwen35_lite.experts.formats import DenseFormat
    from qwen35_lite.experts.slots import SlotTier

    fmt = DenseFormat(D, I, torch.bfloat16, torch.bfloat16, fused=True)
    tier = SlotTier("ram", fmt, 1, n, lambda: None, lambda k: torch.empty(k, dtype=torch.uint8))
    for s in range(n):
        tier.pools[0].slots[s].view(torch.bfloat16).normal_(0, 0.02)
    return tier


def int4_stack(n: int):
    from qwen35_lite.experts.formats import QuantScheme
    from qwen35_lite.experts.formats.registry import PACKED
    from qwen35_lite.experts.slots import SlotTier
    from qwen35_lite.weights.packed import CompressedQuantization

    quant = CompressedQuantization(QuantScheme(group_size=128), ())
    fmt = PACKED[4].build(quant, D, I, "cpu", torch.bfloat16, torch.bfloat16)
    tier = SlotTier("ram", fmt, 1, n, lambda: None, lambda k: torch.empty(k, dtype=torch.uint8))
    g = torch.Generator().manual_seed(0)
    for s in range(n):
        for p in fmt.slot:  # random kernel-layout bytes, small positive scales and zeros
            v = p.view(tier.pools[0].slots[s])
            if v.dtype == torch.uint8:
                v.copy_(torch.randint(0, 256, v.shape, dtype=torch.uint8, generator=g))
            else:
                v.copy_(torch.rand(v.shape, generator=g) / 64)
    return tier, fmt


# Resident int4 Linears at decode (one row): a projection of the 397B's size and an lm_head-like one
INT4_RESIDENT = ((16384, 4096, 32), (248320, 1024, 32))


def int4_resident_cases() -> dict:
    """name -> (callable, bytes it reads): each INT4_RESIDENT shape through the C kernel
    (kernels/int4_cpu.py, what Int4Kernel runs), torch's int4pack kernel, and the bf16 matvec of the same
    shape (int4: the bytes held, nibbles and the (scale, zero) table)."""
    from qwen35_lite.kernels.int4 import Int4Kernel, torch_matmul

    g = torch.Generator().manual_seed(2)
    out = {}
    for n, k, group in INT4_RESIDENT:
        u = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g)
        scale = torch.rand(n, k // group, generator=g) / 64 + 1e-3
        w4 = Int4Kernel.build((n, k), u, scale, torch.zeros_like(scale), group, torch.bfloat16)
        wb = torch.randn(n, k, generator=g).bfloat16()
        x = torch.randn(1, k, generator=g).bfloat16()
        shape = f"[{n}, {k}]"
        out[f"bf16 matvec {shape}"] = (lambda wb=wb, x=x: torch.mv(wb, x[0]), wb.nbytes)
        out[f"int4 g{group} {shape}, C kernel (int4_cpu.py)"] = (lambda w4=w4, x=x: w4(x), w4.nbytes)
        out[f"int4 g{group} {shape}, torch's int4pack kernel"] = (
            lambda w4=w4, x=x, n=n: torch_matmul(x, w4.weight, w4.table, n),
            w4.nbytes,
        )
    return out


def cases(n_slots: int) -> dict:
    """name -> (callable, weight bytes it reads)."""
    from qwen35_lite.experts.dispatch import dispatch_decode
    from qwen35_lite.experts.formats import Fp8BlockFormat
    from qwen35_lite.experts.formats.int4 import kernel_ffn
    from qwen35_lite.experts.slots import SlotTier
    from qwen35_lite.experts.stacks import StackedKernel, stack_parts

    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, D, generator=g).bfloat16()
    slots = torch.randperm(n_slots, generator=g)[:A]
    host = slots.tolist()
    dense = dense_stack(n_slots)
    stack, experts = dense.stacks[0], dict(enumerate(dense.experts[0]))
    bf16_bytes = A * 3 * D * I * 2
    t4, f4 = int4_stack(n_slots)
    s4, e4 = t4.stacks[0], dict(enumerate(t4.experts[0]))
    int4_bytes = A * f4.slot_nbytes
    stride = t4.buffers[0].numel() // n_slots
    k4 = StackedKernel(stack_parts(f4.slot, t4.buffers[0], n_slots, stride), kernel_ffn)
    ffmt = Fp8BlockFormat.build(D, I, torch.device("cpu"), torch.bfloat16, torch.float8_e4m3fn)
    t8 = SlotTier(
        "ram", ffmt, 1, n_slots, lambda: None, lambda k: torch.randint(0, 120, (k,), dtype=torch.uint8)
    )
    f8 = t8.stacks[0]
    w = torch.randn(16384, 4096, generator=g).bfloat16()  # 128 MiB
    w8 = torch.randn(4096, 4096, generator=g).to(torch.float8_e4m3fn)
    from qwen35_lite.weights.fp8 import e4m3_to_float

    weights = torch.softmax(torch.randn(1, A, generator=g), -1).bfloat16()
    ids = slots[None]
    return {
        "bf16 matvec (reference rate)": (lambda: torch.mv(w, x[0]), w.nbytes),
        "bf16 top-10, grouped matmul over the stack (now)": (lambda: stack(x, slots), bf16_bytes),
        "bf16 top-10, index_select + bmm (before)": (lambda: stack.gathered(x, slots), bf16_bytes),
        "bf16 top-10, one by one (reference)": (
            lambda: dispatch_decode(x, weights, ids, experts),
            bf16_bytes,
        ),
        "int4 top-10, C kernel (int4_cpu.py, now)": (lambda: s4(x, slots), int4_bytes),
        "int4 top-10, torch's kernel, slots on the host (views)": (lambda: k4.rows(x, host), int4_bytes),
        "int4 top-10, torch's kernel, slots on the device (one copy each)": (
            lambda: k4(x, slots),
            int4_bytes,
        ),
        "int4 top-10, one by one (before)": (lambda: dispatch_decode(x, weights, ids, e4), int4_bytes),
        "fp8 top-10, C kernel (fp8_cpu.py, now)": (lambda: f8(x, slots), A * 3 * D * I),
        "fp8 -> bf16, torch .to()": (lambda: w8.to(torch.bfloat16), w8.nbytes),
        "fp8 -> fp32, bit-level (weights/fp8.py)": (lambda: e4m3_to_float(w8), w8.nbytes),
        **int4_resident_cases(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--slots", type=int, default=24)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cs = cases(args.slots)
    res: dict[str, list[float]] = {k: [] for k in cs}
    load = []
    for _ in range(args.rounds):
        load.append(os.getloadavg()[0])
        for name, (fn, nbytes) in cs.items():
            res[name].append(nbytes / timed(fn) / 1e9)
    from bench_formats import write_section
    from offload_runs import machine

    from qwen35_lite.plan.cpu_features import cpu_has_native_bf16

    ref = statistics.median(res["bf16 matvec (reference rate)"])
    lines = [
        SECTION,
        "",
        f"`python bench/bench_kernels.py --rounds {args.rounds} --threads {args.threads}` ({machine()}, native bf16"
        f" {'yes' if cpu_has_native_bf16() else 'no'}, {args.threads} threads; load"
        f" average {statistics.median(load):.1f} at the rounds' starts, on a machine other work shares). Expert"
        f" shape of the 397B (hidden {D}, FFN {I}), {A} experts of {args.slots} slots; GB/s of weight bytes"
        " (int4: its slot bytes), medians of alternated rounds.",
        "",
        "| kernel | GB/s | of the matvec rate | rounds |",
        "|---|---:|---:|---|",
    ]
    for name, v in res.items():
        m = statistics.median(v)
        lines.append(f"| {name} | {m:.1f} | {m / ref:.2f} | {', '.join(f'{x:.1f}' for x in v)} |")
    text = "\n".join(lines) + "\n"
    print(text)
    write_section(args.out, text, SECTION)


if __name__ == "__main__":
    main()
