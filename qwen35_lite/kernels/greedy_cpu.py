"""A greedy pick over one row of logits on the CPU: the first maximum's index and whether the row holds an
infinity or a NaN, in one C call (the sampler's torch form, runtime/sampling.py, is the reference).

torch takes ~1.7 ms for that on a 248,320-token vocabulary (two threads, torch 2.13: an fp32 copy of the
bf16 logits, argmax 0.6 ms, isinf 0.9 ms, isnan, each result a fresh allocation the heap maps and faults
in); per decode token that is 4-8% of a CPU step of a small model, and it does not shrink with threads.
Here it is one pass over the row, reading bf16 or fp32 as they are.
"""

from __future__ import annotations

import ctypes

import torch

from .cbuild import BF16_C, build

BODY = r"""
#include <math.h>

#define LANES 16

static inline float value(const void* x, int64_t i, int bf16) {
    return bf16 ? bf16_float(((const uint16_t*)x)[i]) : ((const float*)x)[i];
}

/* out[0] = the first index of the maximum (meaningless when a NaN is found), out[1] = an infinity seen,
   out[2] = a NaN seen. Each lane keeps its maximum and where it first saw it (explicit compares: the
   loop vectorises without fast-math); the first index is the least of the lanes holding the maximum. */
void greedy_scan(const void* x, int64_t n, int bf16, int64_t* out) {
    float best[LANES];
    int64_t first[LANES];
    int inf[LANES], nan[LANES];
    for (int l = 0; l < LANES; l++) { best[l] = -INFINITY; first[l] = l; inf[l] = 0; nan[l] = 0; }
    const int64_t full = n / LANES * LANES;
    for (int64_t i = 0; i < full; i += LANES) {
        for (int l = 0; l < LANES; l++) {
            const float v = value(x, i + l, bf16);
            first[l] = v > best[l] ? i + l : first[l];
            best[l] = v > best[l] ? v : best[l];
            inf[l] |= fabsf(v) == INFINITY;
            nan[l] |= v != v;
        }
    }
    float m = -INFINITY;
    int64_t at = n;
    int any_inf = 0, any_nan = 0;
    for (int l = 0; l < LANES; l++) {
        if (best[l] > m || (best[l] == m && first[l] < at)) { m = best[l]; at = first[l]; }
        any_inf |= inf[l]; any_nan |= nan[l];
    }
    for (int64_t i = full; i < n; i++) {  /* the tail comes after every lane's index */
        const float v = value(x, i, bf16);
        if (v > m) { m = v; at = i; }
        any_inf |= fabsf(v) == INFINITY;
        any_nan |= v != v;
    }
    out[0] = at < n ? at : 0; out[1] = any_inf; out[2] = any_nan;
}
"""
SOURCE = BF16_C + BODY


def library():
    """The compiled scan (cbuild.py); None without a compiler or when the build fails."""
    return build("greedy_scan", SOURCE, "greedy_scan", ("p", "i64", "i", "p"))


def usable(logits: torch.Tensor) -> bool:
    """One contiguous bf16 or fp32 row on the CPU, and a built kernel."""
    return (
        logits.device.type == "cpu"
        and logits.dim() == 1
        and logits.dtype in (torch.bfloat16, torch.float32)
        and logits.is_contiguous()
        and library() is not None
    )


def greedy_scan(logits: torch.Tensor) -> tuple[int, bool, bool]:
    """logits [V] (see usable) -> (index of the first maximum, an infinity in the row, a NaN in the row);
    the index means nothing when a NaN is there (torch's argmax would pick the NaN)."""
    out = (ctypes.c_int64 * 3)()  # not a tensor: no op, no allocation the heap maps
    library()(logits.data_ptr(), logits.numel(), int(logits.dtype == torch.bfloat16), ctypes.addressof(out))
    return out[0], bool(out[1]), bool(out[2])
