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

from qwen35_lite.openmp import set_openmp_wait  # noqa: E402

set_openmp_wait()  # OpenMP threads wait as in a run (with torch first they spin 300,000 polls)
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
        "bf16 top-10, the stack (now: dense_cpu kernel on AVX512-BF16, else grouped matmul)": (
            lambda: stack(x, slots),
            bf16_bytes,
        ),
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


def int8_stack(n: int, group: int | None = None):
    """A RAM tier of n int8 symmetric kernel slots (a scale a row, or per group), random bytes and small
    scales."""
    from qwen35_lite.experts.formats import QuantScheme
    from qwen35_lite.experts.formats.registry import PACKED
    from qwen35_lite.experts.slots import SlotTier
    from qwen35_lite.weights.packed import CompressedQuantization

    quant = CompressedQuantization(QuantScheme(bits=8, group_size=group, symmetric=True), ())
    fmt = PACKED[8].build(quant, D, I, "cpu", torch.bfloat16, torch.bfloat16)
    tier = SlotTier("ram", fmt, 1, n, lambda: None, lambda k: torch.empty(k, dtype=torch.uint8))
    g = torch.Generator().manual_seed(2)
    for s in range(n):
        for p in fmt.slot:
            v = p.view(tier.pools[0].slots[s])
            if v.dtype == torch.int8:
                v.copy_(torch.randint(-128, 128, v.shape, dtype=torch.int8, generator=g))
            else:
                v.copy_(torch.rand(v.shape, generator=g) / 256)
    return tier, fmt


def int8_cases(n_slots: int) -> dict:
    """name -> (callable, weight bytes it reads, the bf16 row it is compared with): the int8 matvec of
    the bench checkpoint's lm_head [248320, 1024] and of a [16384, 4096] layer by the C kernel
    (kernels/int8_cpu.py) and torch's `_weight_int8pack_mm`, against the bf16 matvec of the same shape;
    a decode step's top-10 int8 experts at the 397B shape by the C stacked kernel and by torch's kernel
    one by one, against bf16's grouped matmul."""
    from qwen35_lite.experts.stacks import StackedKernel, stack_parts
    from qwen35_lite.kernels import Int8Group, Int8Split, int8_cpu

    g = torch.Generator().manual_seed(3)
    mm = torch.ops.aten._weight_int8pack_mm
    out = {}
    for n, k in ((248320, 1024), (16384, 4096)):
        q = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
        scale = (torch.rand(n, generator=g) / 256).bfloat16()
        w = torch.randn(n, k, generator=g).bfloat16()
        x = torch.randn(1, k, generator=g).bfloat16()
        bf16 = f"bf16 [{n}, {k}] torch.mv"
        out[bf16] = (lambda w=w, x=x: torch.mv(w, x[0]), w.nbytes, bf16)
        out[f"int8 [{n}, {k}] C kernel (now)"] = (
            lambda x=x, q=q, s=scale: int8_cpu.int8_linear(x, q, s),
            q.nbytes,
            bf16,
        )
        out[f"int8 [{n}, {k}] _weight_int8pack_mm (before)"] = (
            lambda x=x, q=q, s=scale: mm(x, q, s),
            q.nbytes,
            bf16,
        )
        if k == 4096:  # group scales (what quantize writes): the C kernel against two int4 calls
            s128 = (torch.rand(n, k // 128, generator=g) / 256).bfloat16()
            group = Int8Group((n, k), q, s128)
            split = Int8Split.build(
                (n, k), (q.view(torch.uint8) ^ 128), s128.float(), None, 128, torch.bfloat16
            )
            out[f"int8 g128 [{n}, {k}] C kernel (now)"] = (lambda x=x, w=group: w(x), q.nbytes, bf16)
            out[f"int8 g128 [{n}, {k}] two int4 kernel calls (before)"] = (
                lambda x=x, w=split: w(x),
                q.nbytes,
                bf16,
            )
    x = torch.randn(1, D, generator=g).bfloat16()
    slots = torch.randperm(n_slots, generator=g)[:A]
    dense = dense_stack(n_slots).stacks[0]
    tier, fmt = int8_stack(n_slots)
    stride = tier.buffers[0].numel() // n_slots

    def torch_ffn(x, gu_w, down_w, gu_s, down_s):
        gate, up = mm(x, gu_w, gu_s).chunk(2, dim=-1)
        return mm(torch.nn.functional.silu(gate) * up, down_w, down_s)

    one_by_one = StackedKernel(stack_parts(fmt.slot, tier.buffers[0], n_slots, stride), torch_ffn)
    bf16 = "bf16 top-10 experts, grouped matmul over the stack"
    out[bf16] = (lambda: dense(x, slots), A * 3 * D * I * 2, bf16)
    out["int8 top-10 experts, C kernel, one call (now)"] = (
        lambda: tier.stacks[0](x, slots),
        A * fmt.slot_nbytes,
        bf16,
    )
    out["int8 top-10 experts, torch's kernel one by one (before)"] = (
        lambda: one_by_one.rows(x, slots.tolist()),
        A * fmt.slot_nbytes,
        bf16,
    )
    g128, fmt128 = int8_stack(n_slots, 128)  # what `quantize --bits 8` writes (before: dequantised per use)
    out["int8 g128 top-10 experts, C kernel, one call (now)"] = (
        lambda: g128.stacks[0](x, slots),
        A * fmt128.slot_nbytes,
        bf16,
    )
    return out


def int8_main(args) -> None:
    """`--int8`: the int8 rows alone, printed (docs/benchmarks.md is left as it is)."""
    cs = int8_cases(args.slots)
    secs: dict[str, list[float]] = {k: [] for k in cs}
    load = []
    for _ in range(args.rounds):
        load.append(os.getloadavg()[0])
        for name, (fn, _, _) in cs.items():
            secs[name].append(timed(fn))
    med = {k: statistics.median(v) for k, v in secs.items()}
    print(
        f"int8 kernels, {args.threads} threads, {args.rounds} alternated rounds (medians), load average at the"
        f" rounds' starts: {', '.join(f'{v:.1f}' for v in load)}\n"
    )
    print("| kernel | ms | GB/s | speed-up over its bf16 row | rounds (ms) |\n|---|---:|---:|---:|---|")
    for name, (_, nbytes, ref) in cs.items():
        ms = [1e3 * t for t in secs[name]]
        print(
            f"| {name} | {1e3 * med[name]:.2f} | {nbytes / med[name] / 1e9:.1f} | {med[ref] / med[name]:.2f} |"
            f" {', '.join(f'{v:.1f}' for v in ms)} |"
        )


KERNELS_EXPLAINED = [
    "What runs a decode step's experts, where the C kernels build (`kernels/cbuild.py`: the machine's cc on",
    "first use; torch's paths otherwise):",
    "",
    "- **bf16** (`StackedExperts` → `kernels/dense_cpu.py`): one call per projection over the routed slots",
    "  where they are, `vdpbf16ps` over each weight row, rows ~32 KiB ahead prefetched; the gather + batched",
    "  matmul it replaced copied the ten experts' weights first.",
    "- **int4** (`kernels/int4_cpu.py`, shared with the resident int4 Linears): nibbles turned into bf16",
    "  `128 + u` by one byte permute, `vdpbf16ps` against x's pairs, a group's (scale, zero) applied once",
    "  per group; AMX tiles for several rows.",
    "- **int8** (`kernels/int8_cpu.py`, `python bench/bench_kernels.py --int8`): int8 widened to fp32 in",
    "  registers, scales per row or group; torch's `_weight_int8pack_mm` was not faster than bf16 at all.",
    "- **FP8** (`experts/formats/fp8_cpu.py`): e4m3 bytes to exact bf16 by two byte lookups, then",
    "  `vdpbf16ps` (the default where this fast path builds).",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--slots", type=int, default=24)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    ap.add_argument("--int8", action="store_true", help="only the int8 rows, printed")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.int8:
        return int8_main(args)
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
    lines += ["", *KERNELS_EXPLAINED]
    text = "\n".join(lines) + "\n"
    print(text)
    write_section(args.out, text, SECTION)


if __name__ == "__main__":
    main()
