"""int4 experts in the CPU kernel's slot layout run by the C kernel of kernels/int4_cpu.py for decode (one
token through a step's A experts in one call), beside torch's `_weight_int4pack_mm_for_cpu` (the
reference, and the path without a compiler).

torch's kernel takes one matrix a call: a decode step's experts cost 2A calls from Python, each with its
own OpenMP region. `int4_experts` runs the A experts of a layer in one call and one OpenMP region (gate_up
row blocks, SwiGLU, down row blocks) on the inner block function the resident layers' matvec uses, reading
the slots where they are (slot numbers read by the kernel from the tensor: no host read, no copy).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ...kernels import int4_cpu


def library() -> Callable | None:
    """The compiled kernel (kernels/int4_cpu.py), None without a compiler or when the build fails."""
    return int4_cpu.experts_library()


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
        xb = x.reshape(-1).to(torch.bfloat16).contiguous()
        h, hb = torch.empty(A, 2 * self.I), torch.empty(A, self.I, dtype=torch.bfloat16)
        y = torch.empty(A, self.D)
        xs = torch.empty(self.D // g_gu + A * (self.I // g_d))
        library()(
            self.buffer.data_ptr(), self.stride, slots.data_ptr(), A, self.D, self.I, *self.offsets,
            g_gu, g_d, xb.data_ptr(), h.data_ptr(), hb.data_ptr(), xs.data_ptr(), y.data_ptr(),
            int(int4_cpu.AMX),
        )  # fmt: skip
        return y.to(x.dtype)

    def rows(self, x: torch.Tensor, slots: list[int]) -> torch.Tensor:
        return self(x, torch.tensor(slots, dtype=torch.int64))
