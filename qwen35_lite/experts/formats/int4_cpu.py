"""int4 experts in the CPU kernel's slot layout run by a small C kernel for decode (one token through a
step's A experts in one call), beside torch's `_weight_int4pack_mm_for_cpu` (the reference, and the path
without a compiler).

torch's kernel takes one matrix a call: a decode step's experts cost 2A calls from Python, each with its
own OpenMP region. This kernel runs the A experts of a layer in one call and one OpenMP region (gate_up
row blocks, SwiGLU, down row blocks), reading the slots where they are (slot numbers read by the kernel
from the device-side tensor: no host read, no copy). Per group of g inputs and block of 64 rows it sums
(u - 8) * x in fp32 and adds scale * sum + zero * (sum of x over the group): W = (u - 8) * scale + zero,
as torch's kernel computes it. Written as plain loops that the compiler vectorises (-O3 -march=native).

Slot layout (int4.py): block b of 64 rows, input column pair m: 64 bytes, 32 for column 2m then 32 for
2m + 1; byte j holds row 64b + j in its low nibble and row 64b + 32 + j in its high one.
"""

from __future__ import annotations

import torch

from ...kernels.cbuild import build

SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>

static inline float bf16(uint16_t b) { uint32_t u = (uint32_t)b << 16; float f; memcpy(&f, &u, 4); return f; }

/* 64 rows (block nb) of W x: w the kernel layout [N/64][K/2][2][32], sz [G][N][2] bf16 (scale, zero). */
static void block_rows(const uint8_t* w, const uint16_t* sz, int N, int K, int g, int nb,
                       const float* x, const float* xsum, float* out) {
    float total[64] = {0};
    for (int gi = 0; gi < K / g; gi++) {
        float acc[64] = {0};
        for (int m = gi * g / 2; m < (gi + 1) * g / 2; m++) {
            const uint8_t* b = w + ((int64_t)nb * (K / 2) + m) * 64;
            float x0 = x[2 * m], x1 = x[2 * m + 1];
            for (int j = 0; j < 32; j++) {
                acc[j] += ((int)(b[j] & 15) - 8) * x0 + ((int)(b[32 + j] & 15) - 8) * x1;
                acc[32 + j] += ((int)(b[j] >> 4) - 8) * x0 + ((int)(b[32 + j] >> 4) - 8) * x1;
            }
        }
        const uint16_t* s = sz + ((int64_t)gi * N + (int64_t)nb * 64) * 2;
        for (int r = 0; r < 64; r++) total[r] += bf16(s[2 * r]) * acc[r] + bf16(s[2 * r + 1]) * xsum[gi];
    }
    memcpy(out, total, sizeof total);
}

static void group_sums(const float* x, int K, int g, float* xsum) {
    for (int gi = 0; gi < K / g; gi++) {
        float s = 0; for (int k = gi * g; k < (gi + 1) * g; k++) s += x[k]; xsum[gi] = s;
    }
}

/* A experts (slot k at base + slots[k] * stride): gate_up [2I, D] and down [D, I] in the kernel layout,
   their [G, N, 2] bf16 tables; x [D] fp32 -> y [A, D] fp32. h [A, 2I], xs [D/g_gu + A * I/g_d] scratch. */
void int4_experts(const uint8_t* base, int64_t stride, const int64_t* slots, int A, int D, int I,
                  int64_t off_gu, int64_t off_down, int64_t off_gusz, int64_t off_dsz, int g_gu, int g_d,
                  const float* x, float* h, float* xs, float* y) {
    float* xs_gu = xs;
    float* xs_d = xs + D / g_gu;
    group_sums(x, D, g_gu, xs_gu);
    #pragma omp parallel
    {
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < (int64_t)A * (2 * I / 64); r++) {
            int64_t a = r / (2 * I / 64), nb = r % (2 * I / 64);
            const uint8_t* slot = base + slots[a] * stride;
            block_rows(slot + off_gu, (const uint16_t*)(slot + off_gusz), 2 * I, D, g_gu, nb, x, xs_gu,
                       h + a * 2 * I + nb * 64);
        }
        #pragma omp for schedule(static)
        for (int64_t a = 0; a < A; a++) {
            float* ha = h + a * 2 * I;
            for (int i = 0; i < I; i++) { float gt = ha[i]; ha[i] = gt / (1.0f + expf(-gt)) * ha[I + i]; }
            group_sums(ha, I, g_d, xs_d + a * (I / g_d));
        }
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < (int64_t)A * (D / 64); r++) {
            int64_t a = r / (D / 64), nb = r % (D / 64);
            const uint8_t* slot = base + slots[a] * stride;
            block_rows(slot + off_down, (const uint16_t*)(slot + off_dsz), D, I, g_d, nb, h + a * 2 * I,
                       xs_d + a * (I / g_d), y + a * D + nb * 64);
        }
    }
}
"""

ARGS = ("p", "i64", "p", "i", "i", "i", "i64", "i64", "i64", "i64", "i", "i", "p", "p", "p", "p")


def library():
    """The compiled kernel (kernels/cbuild.py), None without a compiler or when the build fails."""
    return build("int4_experts", SOURCE, "int4_experts", ARGS)


class StackedInt4Cpu:
    """A layer's int4 kernel slots run by the C kernel for one token; `rows` / `__call__` as the other
    stacks. `offsets`: byte offsets in a slot of gate_up's and down's weights and tables."""

    def __init__(self, buffer: torch.Tensor, stride: int, D: int, I: int, offsets, groups: tuple[int, int]):
        self.buffer, self.stride, self.D, self.I = buffer, stride, D, I
        self.offsets, self.groups = offsets, groups

    def __call__(self, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """x [1, D] bf16, slots [A] (on the CPU) -> [A, D] in x's dtype, slots order."""
        slots = slots.to(torch.int64).contiguous()
        A, (g_gu, g_d) = slots.shape[0], self.groups
        xf = x.reshape(-1).float().contiguous()
        h, y = torch.empty(A, 2 * self.I), torch.empty(A, self.D)
        xs = torch.empty(self.D // g_gu + A * (self.I // g_d))
        library()(
            self.buffer.data_ptr(), self.stride, slots.data_ptr(), A, self.D, self.I, *self.offsets,
            g_gu, g_d, xf.data_ptr(), h.data_ptr(), xs.data_ptr(), y.data_ptr(),
        )  # fmt: skip
        return y.to(x.dtype)

    def rows(self, x: torch.Tensor, slots: list[int]) -> torch.Tensor:
        return self(x, torch.tensor(slots, dtype=torch.int64))
