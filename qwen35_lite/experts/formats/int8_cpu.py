"""int8 experts in the kernel slot layout (int8.py: a scale a row or per group, zero points) run by the C kernel of
kernels/int8_cpu.py for decode: one token through a step's A experts in one call and one OpenMP region
(gate_up row blocks, SwiGLU, down row blocks), reading the slots where they are (slot numbers read by the
kernel from the tensor: no host read, no copy). torch's `_weight_int8pack_mm` one expert at a time
(StackedKernel) is the reference and the path without a compiler.

The gate_up outputs and the SwiGLU stay fp32 inside the call (torch's path rounds them to bf16); the
experts' outputs are rounded to bf16 once.
"""

from __future__ import annotations

import torch

from ...kernels import int8_cpu
from ...kernels.cbuild import build

SOURCE = (
    int8_cpu.SOURCE
    + r"""
/* A experts (slot a at base + slots[a] * stride): gate_up int8 [2I][D] and down int8 [D][I], their bf16
   scales [2I][G_gu] and [D][G_d] and int8 zero points of the same shapes (offsets < 0: symmetric), at the
   given byte offsets of a slot; x bf16 [D] -> y bf16 [A][D]. h fp32 [A][2I] scratch. */
void int8_experts(const uint8_t* base, int64_t stride, const int64_t* slots, int A, int64_t D, int64_t I,
                  int64_t off_gu, int64_t off_down, int64_t off_gus, int64_t off_ds, int64_t off_guz,
                  int64_t off_dz, int G_gu, int G_d, const uint16_t* x, float* h, uint16_t* y) {
    int64_t bgu = (2 * I + RB - 1) / RB, bd = (D + RB - 1) / RB;
    float* hsum = off_dz >= 0 ? (float*)malloc(sizeof(float) * A * G_d) : NULL;  /* [A][G_d] */
    #pragma omp parallel
    {
        float* xf = fp32_buffer(D);
        float* xsum = off_guz >= 0 ? (float*)malloc(sizeof(float) * G_gu) : NULL;
        prepare_x(x, 1, D, G_gu, xf, xsum);
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < (int64_t)A * bgu; r++) {
            int64_t a = r / bgu;
            const uint8_t* slot = base + slots[a] * stride;
            const int8_t* zp = off_guz >= 0 ? (const int8_t*)(slot + off_guz) : NULL;
            row_block((const int8_t*)(slot + off_gu), (const uint16_t*)(slot + off_gus), zp, 2 * I, D, G_gu,
                      r % bgu, xf, xsum, 1, h + a * 2 * I, 2 * I, 0);
        }
        #pragma omp for schedule(static)
        for (int64_t a = 0; a < A; a++) {
            float* ha = h + a * 2 * I;
            for (int64_t i = 0; i < I; i++) { float g = ha[i]; ha[i] = g / (1.0f + expf(-g)) * ha[I + i]; }
            if (hsum) group_sums(ha, I, G_d, hsum + a * G_d);
        }
        #pragma omp for schedule(static) nowait
        for (int64_t r = 0; r < (int64_t)A * bd; r++) {
            int64_t a = r / bd;
            const uint8_t* slot = base + slots[a] * stride;
            const int8_t* zp = off_dz >= 0 ? (const int8_t*)(slot + off_dz) : NULL;
            row_block((const int8_t*)(slot + off_down), (const uint16_t*)(slot + off_ds), zp, D, I, G_d,
                      r % bd, h + a * 2 * I, hsum ? hsum + a * G_d : NULL, 1, y + a * D, D, 1);
        }
        free(xf); free(xsum);
    }
    free(hsum);
}
"""
)

ARGS = ("p", "i64", "p", "i", "i64", "i64", "i64", "i64", "i64", "i64", "i64", "i64", "i", "i", "p", "p", "p")


def library():
    """The compiled kernel (kernels/cbuild.py), None without a compiler, when the build fails, or without
    the AVX-512 path (kernels/int8_cpu.fast_path: the plain-C one is slower than torch's kernel)."""
    if not int8_cpu.fast_path():
        return None
    return build("int8_experts", SOURCE, "int8_experts", ARGS)


class StackedInt8Cpu:
    """A layer's int8 kernel slots run by the C kernel for one token; `rows` / `__call__` as the other
    stacks. `offsets`: byte offsets in a slot of gate_up's and down's weights, their scales, and their
    zero points (none: symmetric); `groups`: gate_up's and down's groups a row (1: a scale a row)."""

    def __init__(
        self, buffer: torch.Tensor, stride: int, D: int, I: int, offsets: tuple[int, ...], groups=(1, 1)
    ) -> None:
        self.buffer, self.stride, self.D, self.I = buffer, stride, D, I
        self.offsets = (*offsets, -1, -1)[:6]  # symmetric: no zero points (-1)
        self.groups = groups

    def __call__(self, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """x [1, D] bf16, slots [A] (on the CPU) -> [A, D] bf16, in `slots` order."""
        slots = slots.to(torch.int64).contiguous()
        A = slots.shape[0]
        x = x.reshape(-1).to(torch.bfloat16).contiguous()
        h, y = torch.empty(A, 2 * self.I), torch.empty(A, self.D, dtype=torch.bfloat16)
        library()(
            self.buffer.data_ptr(), self.stride, slots.data_ptr(), A, self.D, self.I, *self.offsets,
            *self.groups, x.data_ptr(), h.data_ptr(), y.data_ptr(),
        )  # fmt: skip
        return y

    def rows(self, x: torch.Tensor, slots: list[int]) -> torch.Tensor:
        return self(x, torch.tensor(slots, dtype=torch.int64))
