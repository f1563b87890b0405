"""Vision encode time on the CPU for a tower with the real Qwen3.5-397B vision dimensions (random weights).

    python bench/bench_vision.py [--sizes 448,1344] [--dtypes float32,bfloat16] [--depth 1]
                                 [--full 448:float32] [--repeats 448:3,1344:1] [--out docs/benchmarks.md]

The tower is `VisionTower` itself, its weights drawn in memory (no checkpoint) with the 397B
`vision_config` (architecture notes §1.1: depth 27, hidden 1152, 16 heads, MLP 4304, patch 16, merge 2,
out 4096, 48x48 position table). The input is a synthetic square image run through our preprocessor
with the release's pixel bounds, so an N x N image gives (N/16)^2 patches and (N/32)^2 image tokens.

A full 27-block encode of a 1344 x 1344 image takes minutes on a 2-core machine, so every (size, dtype)
is timed with 0 blocks (the fixed part: patch embedding, position table, merger) and with `--depth`
blocks, and extrapolated linearly, the blocks being identical: fixed + 27 * per-block time.
`--full SIZE:DTYPE` also times the real 27 blocks for those cases, which checks the extrapolation. Each
timing is the fastest of `--repeats` runs, after one warm-up encode of the same image. The figures
replace the "Vision encode (CPU)" section of docs/benchmarks.md and nothing else.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from bench_offload import write_section  # noqa: E402
from offload_runs import machine  # noqa: E402

from qwen35_lite.model.vision import ImageProcessorConfig, VisionTower, preprocess  # noqa: E402
from qwen35_lite.model.vision.tower import vision_tensor_shapes  # noqa: E402
from qwen35_lite.weights.config import VisionConfig  # noqa: E402

SECTION = "## Vision encode (CPU)"
# Qwen3.5-397B-A17B vision_config (architecture notes §1.1).
REAL = VisionConfig(
    depth=27,
    hidden_size=1152,
    num_heads=16,
    intermediate_size=4304,
    in_channels=3,
    patch_size=16,
    temporal_patch_size=2,
    spatial_merge_size=2,
    out_hidden_size=4096,
    num_position_embeddings=2304,
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def random_tower(depth: int, dtype: torch.dtype, seed: int = 0) -> VisionTower:
    """The real-size tower cut to `depth` blocks, weights ~ N(0, 1/fan_in) (norm weights near 1)."""
    cfg = VisionConfig(**{**REAL.__dict__, "depth": depth})
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in vision_tensor_shapes(cfg).items():
        if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "merger.norm.weight":
            w = 1 + 0.1 * torch.randn(shape, generator=gen)
        elif len(shape) == 1:
            w = 0.02 * torch.randn(shape, generator=gen)
        else:
            fan_in = torch.Size(shape[1:]).numel()
            w = torch.randn(shape, generator=gen) / fan_in**0.5
        weights[name] = w.to(dtype)
    return VisionTower(cfg, weights, "cpu", dtype)


def image_input(side: int) -> tuple[torch.Tensor, torch.Tensor]:
    from PIL import Image

    gen = torch.Generator().manual_seed(side)
    pixels = (torch.rand(side, side, 3, generator=gen) * 255).to(torch.uint8).numpy()
    return preprocess([Image.fromarray(pixels, "RGB")], ImageProcessorConfig())  # release pixel bounds


def time_encode(tower: VisionTower, pv: torch.Tensor, grid: torch.Tensor, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        tower.encode(pv, grid)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="448,1344")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--depth", type=int, default=1, help="blocks timed (besides 0) to extrapolate from")
    ap.add_argument("--full", default="448:float32", help="SIZE:DTYPE cases also timed with all 27 blocks")
    ap.add_argument("--repeats", default="448:3,1344:1", help="SIZE:N timed runs per case (default 1)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = ap.parse_args()
    d1, d2 = 0, args.depth
    repeats = {int(k): int(v) for k, v in (c.split(":") for c in args.repeats.split(",") if c)}
    full = {tuple(c.split(":")) for c in args.full.split(",") if c}
    rows = []
    for side in (int(s) for s in args.sizes.split(",")):
        pv, grid = image_input(side)
        n_patches, n_tokens = pv.shape[0], pv.shape[0] // REAL.spatial_merge_size**2
        n = repeats.get(side, 1)
        for dname in args.dtypes.split(","):
            dtype = DTYPES[dname]
            fixed = random_tower(d1, dtype)
            fixed.encode(pv, grid)  # warm-up: allocator, kernel selection
            t1 = time_encode(fixed, pv, grid, n)
            t2 = time_encode(random_tower(d2, dtype), pv, grid, n)
            per_block = (t2 - t1) / (d2 - d1)
            estimate = t1 + (REAL.depth - d1) * per_block
            measured = None
            if (str(side), dname) in full:
                measured = time_encode(random_tower(REAL.depth, dtype), pv, grid, 1)
            row = dict(side=side, dtype=dname, patches=n_patches, tokens=n_tokens, t1=t1, t2=t2,
                       per_block=per_block, estimate=estimate, measured=measured)  # fmt: skip
            rows.append(row)
            print(row, flush=True)
    write_section(args.out, report(rows, d2, repeats), SECTION)
    print(f"wrote the {SECTION!r} section of {args.out}")


def report(rows: list[dict], depth: int, repeats: dict[int, int]) -> str:
    lines = [
        SECTION,
        "",
        f"Machine: {machine()}, {torch.get_num_threads()} threads; the cores are shared with other work, so figures can vary by tens of "
        f"percent. Written by `python bench/bench_vision.py` on {time.strftime('%Y-%m-%d')}.",
        "",
        "`VisionTower.encode` with the Qwen3.5-397B vision dimensions (27 blocks, hidden 1152, 16 heads, "
        "MLP 4304, merger to 4096; about 0.46 G parameters, 0.9 GB in bf16), random weights in memory, one "
        "square image through our preprocessor. Each case is timed after a warm-up encode (fastest of "
        + ", ".join(f"{n} at {s}²" for s, n in repeats.items())
        + f") with 0 blocks (the fixed part: patch embedding, position table, merger) and with {depth}; "
        "the 27-block time is extrapolated linearly (the blocks are identical): fixed + 27 x per block. "
        "Where a full 27-block run was also timed (once), it is shown beside the estimate.",
        "",
        f"| image | patches → tokens | dtype | fixed part s | {depth} block(s) s | per block s "
        "| 27 blocks, estimated s | 27 blocks, measured s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        measured = f"{r['measured']:.2f}" if r["measured"] is not None else "not run"
        lines.append(
            f"| {r['side']}×{r['side']} | {r['patches']} → {r['tokens']} | {r['dtype']} | {r['t1']:.2f} "
            f"| {r['t2']:.2f} | {r['per_block']:.2f} | {r['estimate']:.1f} | {measured} |"
        )
    lines += [
        "",
        *notes(rows),
        "",
        "On the CPU the runner encodes in fp32 whatever the text dtype (`vision.tower.tower_dtype`): the "
        "float32 rows are what a CPU user waits for.",
    ]
    return "\n".join(lines) + "\n"


def notes(rows: list[dict]) -> list[str]:
    """Ratios read off the table (so a re-run keeps its prose true)."""
    by = {(r["side"], r["dtype"]): r for r in rows}
    out = []
    for side in sorted({r["side"] for r in rows}):
        a, b = by.get((side, "float32")), by.get((side, "bfloat16"))
        if a and b and a["per_block"] > 0:
            flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
            native = any(f in flags for f in ("avx512_bf16", "amx_bf16"))
            out.append(
                f"At {side}², a bf16 block takes {b['per_block'] / a['per_block']:.1f}x the fp32 time "
                f"({'this CPU has' if native else 'this CPU lacks'} native bf16 matrix instructions)."
            )
    sides = sorted({r["side"] for r in rows})
    if len(sides) >= 2:
        lo, hi = by.get((sides[0], "float32")), by.get((sides[-1], "float32"))
        if lo and hi and lo["per_block"] > 0:
            out.append(
                f"From {sides[0]}² to {sides[-1]}² the patches grow {hi['patches'] / lo['patches']:.0f}x and an "
                f"fp32 block {hi['per_block'] / lo['per_block']:.1f}x: attention inside one image is "
                "quadratic in its patches."
            )
    return [" ".join(out)] if out else []


if __name__ == "__main__":
    main()
