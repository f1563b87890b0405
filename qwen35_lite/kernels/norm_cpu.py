"""The zero-centred RMSNorm of one row on the CPU, optionally after the residual add that feeds it, in one C
call (model/layers.py's `rms_norm_1p`, a LayerNorm of [x, −x], and the add before it are the reference,
tested against this on random rows).

A decode step has two norms a layer and a residual add before each; in torch one norm is a multiply and a
layer_norm plus their views, ~15-20 µs of launching for a few hundred ns of work on a 1024-4096 row.

Rounding follows torch's: the add rounds once to the row's dtype, the norm is taken in fp32 (sum of
squares in another order: equal within fp32 rounding) and rounded once after the scale.
"""

from __future__ import annotations

import torch

from .cbuild import BF16_C, build

BODY = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>


/* s = h (+ delta, rounded to the dtype, written to sum) ; y = s * rsqrt(mean(s^2) + eps) * scale, rounded.
   h, delta, sum, y: D values of the row dtype (bf16 or fp32); scale: D fp32. */
void add_rms_norm(const void* h, const void* delta, void* sum, void* y, const float* scale, int D,
                  float eps, int bf16) {
    float s[D];
    float ss = 0.0f;
    for (int i = 0; i < D; i++) {
        float v = bf16 ? bf16_float(((const uint16_t*)h)[i]) : ((const float*)h)[i];
        if (delta) {
            v += bf16 ? bf16_float(((const uint16_t*)delta)[i]) : ((const float*)delta)[i];
            if (bf16) { const uint16_t r = float_bf16(v); ((uint16_t*)sum)[i] = r; v = bf16_float(r); }
            else ((float*)sum)[i] = v;
        }
        s[i] = v;
        ss += v * v;
    }
    const float r = 1.0f / sqrtf(ss / D + eps);
    for (int i = 0; i < D; i++) {
        const float v = s[i] * r * scale[i];
        if (bf16) ((uint16_t*)y)[i] = float_bf16(v); else ((float*)y)[i] = v;
    }
}
"""
SOURCE = BF16_C + BODY


def library():
    """The compiled norm (cbuild.py); None without a compiler or when the build fails."""
    return build("add_rms_norm", SOURCE, "add_rms_norm", ("p", "p", "p", "p", "p", "i", "f", "i"))


def usable(x: torch.Tensor, scale: torch.Tensor) -> bool:
    """One contiguous bf16 or fp32 row on the CPU, an fp32 scale, and a built kernel."""
    return (
        x.device.type == "cpu"
        and x.dim() == 2
        and x.shape[0] == 1
        and x.dtype in (torch.bfloat16, torch.float32)
        and x.is_contiguous()
        and scale.dtype == torch.float32
        and scale.is_contiguous()
        and library() is not None
    )


def add_rms_norm(
    h: torch.Tensor, delta: torch.Tensor | None, scale: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """h [1, D] (+ delta [1, D], h's dtype and contiguous) -> (the sum, or h itself without delta; its
    norm times scale[:D] (fp32), in h's dtype). See usable()."""
    D = h.shape[1]
    y = torch.empty_like(h)
    total = torch.empty_like(h) if delta is not None else h
    library()(
        h.data_ptr(), delta.data_ptr() if delta is not None else None, total.data_ptr(), y.data_ptr(),
        scale.data_ptr(), D, eps, int(h.dtype == torch.bfloat16),
    )  # fmt: skip
    return total, y
