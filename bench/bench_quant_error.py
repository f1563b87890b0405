"""The int4 quantiser's error on Qwen3.5-397B-shaped experts, written into docs/quantization.md.

    python bench/bench_quant_error.py [--experts 2] [--tokens 256] [--no-write]

For each expert matrix (gate and up [1024, 4096], down [4096, 1024], bf16 as the release stores them) the
relative output error ||W x - W_q x|| / ||W x|| over a batch of random inputs x, for group 32/64/128,
symmetric and asymmetric, round-to-nearest (compressed-tensors' min/max) and with the MSE clip search.
The real weights cannot be downloaded here: W is Gaussian N(0, 1/fan_in), x is N(0, 1). Gaussian weights
have lighter tails than trained ones, so treat the figures as a comparison between the options.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qwen35_lite.experts.formats.int4 import dequantize_int4, quantize_int4  # noqa: E402

HIDDEN, EXPERT_WIDTH = 4096, 1024  # Qwen3.5-397B-A17B: hidden_size, moe_intermediate_size
MATRICES = {"gate": (EXPERT_WIDTH, HIDDEN), "up": (EXPERT_WIDTH, HIDDEN), "down": (HIDDEN, EXPERT_WIDTH)}
DOC = ROOT / "docs" / "quantization.md"
BEGIN, END = "<!-- quant-error:begin -->", "<!-- quant-error:end -->"


def relative_error(w: torch.Tensor, x: torch.Tensor, group: int, symmetric: bool, mse_clip: bool) -> float:
    packed, scale, zp = quantize_int4(w, group, symmetric, mse_clip)
    w_q = dequantize_int4(packed, scale, zp, group, torch.float32, tuple(w.shape))
    exact = w.float() @ x  # [out, tokens]
    return float((exact - w_q @ x).norm() / exact.norm())


def expert_mb(group: int, symmetric: bool) -> float:
    """One expert's bytes: 4-bit weights, a bf16 scale per group, a 4-bit zero-point per group if asymmetric."""
    params = sum(o * i for o, i in MATRICES.values())
    per_group = 2 + (0 if symmetric else 0.5)
    return (params / 2 + params / group * per_group) / 2**20


def measure(experts: int, tokens: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    weights = [
        (proj, (torch.randn(shape, generator=gen) / shape[1] ** 0.5).to(torch.bfloat16))
        for _ in range(experts)
        for proj, shape in MATRICES.items()
    ]
    inputs = {n: torch.randn(n, tokens, generator=gen) for n in (HIDDEN, EXPERT_WIDTH)}
    rows = []
    for group in (32, 64, 128):
        for symmetric in (True, False):
            for mse_clip in (False, True):
                errors: dict[str, list[float]] = {p: [] for p in MATRICES}
                for proj, w in weights:
                    errors[proj].append(relative_error(w, inputs[w.shape[1]], group, symmetric, mse_clip))
                rows.append(
                    dict(
                        group=group,
                        symmetric=symmetric,
                        mse_clip=mse_clip,
                        mb=expert_mb(group, symmetric),
                        **{p: sum(v) / len(v) for p, v in errors.items()},
                    )
                )
                print(rows[-1], file=sys.stderr)
    return rows


def table(rows: list[dict], experts: int, tokens: int) -> str:
    lines = [
        f"Mean over {experts} random experts ({3 * experts} matrices), {tokens} random tokens; "
        f"bf16 experts are {sum(o * i for o, i in MATRICES.values()) * 2 / 2**20:.1f} MiB.",
        "",
        "| group | scheme | scales | expert MiB | gate | up | down |",
        "|---:|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        scheme = "symmetric" if r["symmetric"] else "asymmetric"
        scales = "MSE clip" if r["mse_clip"] else "min/max (RTN)"
        lines.append(
            f"| {r['group']} | {scheme} | {scales} | {r['mb']:.2f} | "
            f"{r['gate']:.2%} | {r['up']:.2%} | {r['down']:.2%} |"
        )
    return "\n".join(lines)


def write_doc(section: str) -> None:
    text = DOC.read_text()
    block = f"{BEGIN}\n{section}\n{END}"
    DOC.write_text(re.sub(re.escape(BEGIN) + r".*?" + re.escape(END), lambda _: block, text, flags=re.S))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--no-write", action="store_true", help="print the table, leave docs/quantization.md")
    args = ap.parse_args()
    start = time.perf_counter()
    section = table(measure(args.experts, args.tokens), args.experts, args.tokens)
    print(section)
    print(f"({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    if not args.no_write:
        write_doc(section)


if __name__ == "__main__":
    main()
