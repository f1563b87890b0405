"""FP8 block-128 experts computed by the CPU straight from FP8 slots: a small C kernel (compiled once, on
first use, with the machine's C compiler, and loaded through ctypes), and the torch reference beside it.

Why a kernel: converting FP8 to bf16 with torch ops costs several full passes over the weights (torch's
own `.to()` is scalar on x86; the bit-level conversion of weights/fp8.py six elementwise passes), far
slower than the matrix-vector product itself, so FP8 slots used to be dequantised on entry into bf16
slots (twice the bytes, half the slots). The kernel reads each FP8 byte once: the byte is widened to
fp32 by moving its bits (subnormals and all: e4m3's exponent 0 is rebuilt from its mantissa), multiplied
into an fp32 dot product with x, and each 128-column block's partial sum scaled by the block's scale.
A decode step's A experts run in one call (one OpenMP region: gate_up rows, SwiGLU, down rows), the slot
numbers read by the kernel from the device-side tensor: no host read, no copy of any weight.

No compiler, a failed build (kernels/cbuild.py), or shapes that are not whole 128-blocks: `available()` is False
and the format keeps dequantising on entry (the path before).

Legend: A = experts run, D = hidden, I = expert FFN width, B = 128 (block).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...kernels.cbuild import build
from ...weights.fp8 import FP8_BLOCK, dequantize_block

SOURCE = r"""
#include <stdint.h>
#include <math.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

/* e4m3fn byte -> float: exponent e (4 bits, bias 7), mantissa m (3 bits); e = 0 is m * 2^-9. */
static inline float e4m3(uint8_t b) {
    int em = b & 0x7F, e = em >> 3, m = em & 7;
    float v = e ? ldexpf((float)(8 + m), e - 10) : ldexpf((float)m, -9);
    return (b & 0x80) ? -v : v;
}

/* One row: sum over 128-blocks of scale[block] * dot(w[block], x[block]). */
static float row_dot(const uint8_t* w, const float* s, const float* x, int cols) {
    float total = 0.0f;
#ifdef __AVX512F__
    const __m512i low7 = _mm512_set1_epi32(0x7F), sign = _mm512_set1_epi32(0x80);
    const __m512i bias = _mm512_set1_epi32(120 << 23), eight = _mm512_set1_epi32(8);
    const __m512 sub = _mm512_set1_ps(1.0f / 512.0f);
    __m512 acc_all = _mm512_setzero_ps();
    for (int b = 0; b < cols; b += 128) {
        __m512 acc = _mm512_setzero_ps();
        for (int c = b; c < b + 128; c += 16) {
            __m512i u = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(w + c)));
            __m512i em = _mm512_and_si512(u, low7);
            __m512 normal = _mm512_castsi512_ps(_mm512_add_epi32(_mm512_slli_epi32(em, 20), bias));
            __m512 small = _mm512_mul_ps(_mm512_cvtepi32_ps(em), sub);
            __m512 v = _mm512_mask_blend_ps(_mm512_cmplt_epi32_mask(em, eight), normal, small);
            v = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(v),
                                                     _mm512_slli_epi32(_mm512_and_si512(u, sign), 24)));
            acc = _mm512_fmadd_ps(v, _mm512_loadu_ps(x + c), acc);
        }
        acc_all = _mm512_fmadd_ps(_mm512_set1_ps(s[b / 128]), acc, acc_all);
    }
    total = _mm512_reduce_add_ps(acc_all);
#else
    for (int b = 0; b < cols; b += 128) {
        float acc = 0.0f;
        for (int c = b; c < b + 128; c++) acc += e4m3(w[c]) * x[c];
        total += s[b / 128] * acc;
    }
#endif
    return total;
}

/* A experts of one layer's FP8 slots (slot k at base + slots[k] * stride; parts at the given offsets:
   gate_up weights [2I, D], down [D, I], their fp32 block scales [2I/128, D/128] and [D/128, I/128]).
   x [D] fp32 -> y [A, D] fp32; h [A, 2I] scratch. */
void fp8_experts(const uint8_t* base, int64_t stride, const int64_t* slots, int A, int D, int I,
                 int64_t off_gu, int64_t off_down, int64_t off_gus, int64_t off_ds,
                 const float* x, float* h, float* y) {
    #pragma omp parallel
    {
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < (int64_t)A * 2 * I; r++) {
            int64_t a = r / (2 * I), i = r % (2 * I);
            const uint8_t* slot = base + slots[a] * stride;
            h[r] = row_dot(slot + off_gu + i * D, (const float*)(slot + off_gus) + (i / 128) * (D / 128), x, D);
        }
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < (int64_t)A * I; r++) {
            int64_t a = r / I, i = r % I;
            float g = h[a * 2 * I + i], u = h[a * 2 * I + I + i];
            h[a * 2 * I + i] = g / (1.0f + expf(-g)) * u;  /* silu(g) * u, in gate's place */
        }
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < (int64_t)A * D; r++) {
            int64_t a = r / D, d = r % D;
            const uint8_t* slot = base + slots[a] * stride;
            y[r] = row_dot(slot + off_down + d * I, (const float*)(slot + off_ds) + (d / 128) * (I / 128),
                           h + a * 2 * I, I);
        }
    }
}
"""


ARGS = ("p", "i64", "p", "i", "i", "i", "i64", "i64", "i64", "i64", "p", "p", "p")


def library():
    """The compiled kernel (kernels/cbuild.py), None without a compiler or when the build fails."""
    return build("fp8_experts", SOURCE, "fp8_experts", ARGS)


def fits(hidden: int, inter: int) -> bool:
    """Whole 128-blocks on both sides of every matrix (the kernel has no ragged last block)."""
    return hidden % FP8_BLOCK == 0 and inter % FP8_BLOCK == 0


def available(hidden: int, inter: int) -> bool:
    """The kernel runs these experts here: whole blocks and a library built."""
    return fits(hidden, inter) and library() is not None


class StackedFp8Cpu:
    """A layer's FP8 slots run by the kernel. `offsets`: byte offsets in a slot of gate_up's weights,
    down's weights, gate_up's scales, down's scales (the raw layout puts gate and up back to back)."""

    def __init__(self, buffer: torch.Tensor, stride: int, D: int, I: int, offsets: tuple[int, int, int, int]):
        self.buffer, self.stride, self.D, self.I, self.offsets = buffer, stride, D, I, offsets

    def __call__(self, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """x [1, D], slots [A] (on the CPU) -> [A, D] in x's dtype, slots order."""
        slots = slots.to(torch.int64).contiguous()
        A = slots.shape[0]
        xf = x.reshape(-1).float().contiguous()
        h = torch.empty(A, 2 * self.I)
        y = torch.empty(A, self.D)
        library()(
            self.buffer.data_ptr(), self.stride, slots.data_ptr(), A, self.D, self.I, *self.offsets,
            xf.data_ptr(), h.data_ptr(), y.data_ptr(),
        )  # fmt: skip
        return y.to(x.dtype)

    def rows(self, x: torch.Tensor, slots: list[int]) -> torch.Tensor:
        return self(x, torch.tensor(slots, dtype=torch.int64))


def reference_ffn(x: torch.Tensor, raw: list[torch.Tensor]) -> torch.Tensor:
    """The kernel's reference: the expert's FP8 weights dequantised in fp32 (w * scale per block), then the
    SwiGLU FFN in fp32; raw = gate, up, down weights, then their scales."""
    gate, up, down = (dequantize_block(w, s) for w, s in zip(raw[:3], raw[3:]))
    g, u = F.linear(x.float(), torch.cat([gate, up])).chunk(2, dim=-1)
    return F.linear(F.silu(g) * u, down)
