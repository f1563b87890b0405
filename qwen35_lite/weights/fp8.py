"""FP8 block-128, the numbers: the official FP8 release stores float8_e4m3fn weights with an fp32
`weight_scale_inv` [ceil(out/128), ceil(in/128)] per matrix; a value is w[r, c] * scale_inv[r // 128, c // 128]
in fp32. The checkpoint reader dequantises resident FP8 tensors with this, `quantize` reads FP8 sources,
`synthetic` writes FP8 experts, and the FP8 expert format (experts/formats/fp8.py) runs its slots with it.
"""

from __future__ import annotations

import torch

FP8_BLOCK = 128
FP8_MAX = 448.0  # float8_e4m3fn's largest finite value
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# quantization_config of the official FP8 release (block-wise, 128 x 128)
FP8_CONFIG = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": [128, 128],
}


def dequantize_fp8(w: torch.Tensor, scale_inv: torch.Tensor, block: int = FP8_BLOCK) -> torch.Tensor:
    """Block-wise FP8: value = w[r, c] * scale_inv[r // block, c // block] (scale_inv [ceil(out/b), ceil(in/b)])."""
    s = (
        scale_inv.float()
        .repeat_interleave(block, 0)[: w.shape[0]]
        .repeat_interleave(block, 1)[:, : w.shape[1]]
    )
    return w.float() * s


def e4m3_to_float(w: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn -> float32, exactly (NaN aside), by moving the bits: torch's own conversion runs
    ~3x slower on the CPU. The sign and the 7 exponent/mantissa bits go to a bf16's top and bottom bits,
    which read as the value scaled by 2^-120 (subnormals included), and the scale is exact to undo."""
    u = w.view(torch.uint8).to(torch.int16)
    bits = ((u & 0x7F) << 4) | ((u & 0x80) << 8)  # s | 0eeeemmm << 4 as bf16: value * 2^-120
    out = bits.view(torch.bfloat16).float().mul_(2.0**120)
    if out.abs().amax() > 448:  # e4m3fn's NaN code S.1111.111 reads as 480 here; every finite value <= 448
        out.masked_fill_((u & 0x7F) == 0x7F, float("nan"))
    return out


def dequantize_block(w: torch.Tensor, scale_inv: torch.Tensor, block: int = FP8_BLOCK) -> torch.Tensor:
    """dequantize_fp8 (w.float() * scale_inv per block, fp32), the same bits, faster: no repeated scale
    matrix when the blocks tile exactly, and the bit-level e4m3 conversion."""
    o, i = w.shape
    if o % block or i % block or w.dtype != torch.float8_e4m3fn:
        return dequantize_fp8(w, scale_inv, block)
    # the bit-level conversion pays on the CPU; on a GPU torch's own is fast and needs no NaN check (a sync)
    wf = e4m3_to_float(w) if w.device.type == "cpu" else w.float()
    blocks = wf.view(o // block, block, i // block, block)  # [O/b, b, I/b, b]
    return blocks.mul_(scale_inv.float()[:, None, :, None]).view(o, i)


def quantize_block(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [out, in] -> (float8_e4m3fn weight, fp32 weight_scale_inv per 128x128 block), scale = block
    absmax / 448 (the format's largest value), as the official release's layout holds them."""
    out, inp = w.shape
    rows, cols = -(-out // FP8_BLOCK), -(-inp // FP8_BLOCK)
    padded = torch.zeros(rows * FP8_BLOCK, cols * FP8_BLOCK)
    padded[:out, :inp] = w.float()
    blocks = padded.view(rows, FP8_BLOCK, cols, FP8_BLOCK)  # [R, b, C, b]
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / FP8_MAX  # [R, C]
    q = (blocks / scale[:, None, :, None]).view_as(padded)[:out, :inp].to(torch.float8_e4m3fn)
    return q, scale
