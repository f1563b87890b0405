"""int8 experts: compressed-tensors pack-quantized W8A16 (compressed.py has the layout and the scheme), its
packing, and torch's CPU int8 kernel (`aten._weight_int8pack_mm`) for bf16 compute.

Packing: four 8-bit values per int32 word, element i of each 4 in byte i (little-endian: bits 8i..8i+7),
each stored as q + 128 (q in [-128, 127]); zero points packed the same way down the rows. Half the bytes
of bf16 (plus a scale per group or row): twice the expert slots, and near lossless.

The kernel computes y = x @ (q * scale).T with one scale per output row: the symmetric channel strategy.
A decode step's experts run in one call of the C kernel (int8_cpu.py) where it builds, from their slots;
a few rows of one expert through kernels/int8_cpu.py's matmul, a prefill block's rows (DEQUANTISE_ROWS
and up) dequantised once and run by the bf16 matmul; torch's `_weight_int8pack_mm` without a compiler.
Other schemes (group scales, zero points) run the exact path: the slot keeps the packed bytes and the
expert is dequantised as compressed-tensors does when it runs (`PackedFormat`), still half the bytes.
`dequantised_ffn` is the kernel's reference: the same expert dequantised, then F.linear.

Legend: D = hidden, I = expert FFN width.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from ...kernels import int8_cpu as kernel_int8
from ...weights.packed import pack_int8, unpack_int8
from ..stacks import StackedExperts, StackedKernel, one_row_by
from . import compressed, int8_cpu
from .base import Expert, ffn
from .compressed import PackedFormat, QuantScheme

BITS = 8
OFFSET = 128  # stored byte = q + OFFSET


class Int8Format(PackedFormat):
    """compressed-tensors pack-quantized W8A16, per expert: weight_packed int32 [out, in/4], weight_scale
    [out, in/g] (channel: [out, 1]), and weight_zero_point int32 [out/4, in/g] when asymmetric.

    `kernel=True` (CPU, bf16, symmetric channel strategy): on entry into a cache the expert's bytes are
    unpacked into int8 [2I, D] / [D, I] matrices with their per-row scales in the compute dtype, and run by
    `_weight_int8pack_mm`. Otherwise PackedFormat's exact dequantise-and-run path."""

    bits: ClassVar[int] = BITS
    kernel_name: ClassVar[str] = "CPU int8 kernel"
    pack = staticmethod(pack_int8)
    unpack = staticmethod(unpack_int8)

    @classmethod
    def kernel_fits(
        cls, device: torch.device, dtype: torch.dtype, hidden: int, inter: int, scheme: QuantScheme
    ) -> bool:
        # one scale per row and no zero points: what the kernel computes
        channel = scheme.group_size is None and scheme.symmetric
        return device.type == "cpu" and dtype == torch.bfloat16 and channel

    def kernel_slot(self) -> list[tuple[torch.dtype, tuple[int, ...]]]:
        D, I = self.D, self.I  # gate_up and down as int8 matrices, then their per-row scales
        return [(torch.int8, (2 * I, D)), (torch.int8, (D, I)), (self.dtype, (2 * I,)), (self.dtype, (D,))]

    def prepare(self, raw: list[torch.Tensor], slot: torch.Tensor) -> None:
        gu_w, down_w, gu_s, down_s = (p.view(slot) for p in self.slot)
        (gp, gs, _, (_, d_in)), (up_, us, _, _), (dp, ds, _, (_, i_in)) = self.matrices(raw)
        gu_w[: self.I].copy_(unpack_int8(gp, d_in))
        gu_w[self.I :].copy_(unpack_int8(up_, d_in))
        down_w.copy_(unpack_int8(dp, i_in))
        gu_s.copy_(torch.cat([gs, us]).view(-1))  # [2I, 1] channel scales -> [2I]
        down_s.copy_(ds.view(-1))

    def bind(self, slot: torch.Tensor) -> Expert:
        if not self.kernel:
            return super().bind(slot)
        parts = [p.view(slot) for p in self.slot]
        stack = self.stack(slot, 1, slot.numel())
        expert = lambda x: kernel_ffn(x, *parts)  # noqa: E731
        # one row as the layer's stack runs it: where an expert sits never changes the tokens
        return one_row_by(stack, expert) if isinstance(stack, int8_cpu.StackedInt8Cpu) else expert

    def kernel_stack(self, parts: list[torch.Tensor]) -> StackedKernel:
        return StackedKernel(parts, kernel_ffn)

    def stack(self, buffer: torch.Tensor, n_slots: int, stride: int) -> StackedExperts | None:
        """Decode through the C kernel (int8_cpu.py) where it builds; torch's kernel one expert at a time
        (StackedKernel) otherwise."""
        if self.kernel and buffer.device.type == "cpu" and int8_cpu.library() is not None:
            offsets = tuple(p.offset for p in self.slot)  # gate_up, down weights; their scales
            return int8_cpu.StackedInt8Cpu(buffer, stride, self.D, self.I, offsets)
        return super().stack(buffer, n_slots, stride)

    def dequantised_ffn(self, slot: torch.Tensor) -> Expert:
        """The kernel slot's expert by the reference path: q * scale dequantised, then F.linear."""
        gu_w, down_w, gu_s, down_s = (p.view(slot) for p in self.slot)

        def run(x: torch.Tensor) -> torch.Tensor:
            gate_up = gu_w.to(x.dtype) * gu_s[:, None].to(x.dtype)  # [2I, D]
            down = down_w.to(x.dtype) * down_s[:, None].to(x.dtype)  # [D, I]
            return ffn(x, gate_up, down)

        return run


# From this many rows (a prefill block's tokens for one expert) the weights are dequantised once and run by
# the bf16 matmul (oneDNN, AMX where there is one): the int8 kernels' time grows with the rows.
DEQUANTISE_ROWS = 32


def kernel_ffn(
    x: torch.Tensor, gu_w: torch.Tensor, down_w: torch.Tensor, gu_s: torch.Tensor, down_s: torch.Tensor
) -> torch.Tensor:
    """One expert from its kernel slot's parts: x [T, D] -> [T, D], two calls of an int8 kernel (the C
    one where it builds, else torch's), or for many rows two bf16 matmuls over the weights dequantised."""
    if x.shape[0] >= DEQUANTISE_ROWS:
        return ffn(x, gu_w.to(x.dtype) * gu_s[:, None], down_w.to(x.dtype) * down_s[:, None])
    if x.dtype == torch.bfloat16 and gu_s.dtype == torch.bfloat16 and kernel_int8.library() is not None:
        mm = kernel_int8.int8_linear
    else:
        mm = torch.ops.aten._weight_int8pack_mm
    g, u = mm(x.contiguous(), gu_w, gu_s).chunk(2, dim=-1)  # [T, I] each
    return mm(F.silu(g) * u, down_w, down_s)


def dequantize_int8(packed, scale, zero_point, dtype: torch.dtype, shape: tuple[int, int]) -> torch.Tensor:
    """compressed.dequantize for int8: what compressed-tensors' decompress gives, cast to `dtype`."""
    return compressed.dequantize(unpack_int8, BITS, packed, scale, zero_point, dtype, shape)
