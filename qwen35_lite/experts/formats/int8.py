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
from ...kernels.int8 import c_kernel_takes, dequantize_groups
from ...weights.packed import pack_int8, unpack_int8
from ..stacks import StackedExperts
from . import compressed, int8_cpu
from .base import Expert, ffn
from .compressed import DEQUANTISE_ROWS, PackedFormat, QuantScheme

BITS = 8
OFFSET = 128  # stored byte = q + OFFSET


class Int8Format(PackedFormat):
    """compressed-tensors pack-quantized W8A16, per expert: weight_packed int32 [out, in/4], weight_scale
    [out, in/g] (channel: [out, 1]), and weight_zero_point int32 [out/4, in/g] when asymmetric.

    `kernel=True` (CPU, bf16; the symmetric channel strategy, or with the C kernel any group of 16k inputs
    and zero points): on entry into a cache the expert's bytes are unpacked into int8 [2I, D] / [D, I]
    matrices with their scales (per row, or [rows, groups]) in the compute dtype and their zero points as
    int8 [rows, groups], and run by the int8 kernels. Otherwise PackedFormat's exact dequantise-and-run
    path."""

    bits: ClassVar[int] = BITS
    kernel_name: ClassVar[str] = "CPU int8 kernel"
    pack = staticmethod(pack_int8)
    unpack = staticmethod(unpack_int8)

    @classmethod
    def kernel_fits(
        cls, device: torch.device, dtype: torch.dtype, hidden: int, inter: int, scheme: QuantScheme
    ) -> bool:
        if device.type != "cpu" or dtype != torch.bfloat16:
            return False
        if scheme.group_size is None and scheme.symmetric:
            return True  # one scale per row and no zero points: torch's kernel too
        g = scheme.group_size  # group scales and zero points: the C kernel's groups of 16k inputs
        fits = g is None or all(n % g == 0 and kernel_int8.fits(n, n // g) for n in (hidden, inter))
        return fits and kernel_int8.library() is not None

    def kernel_slot(self) -> list[tuple[torch.dtype, tuple[int, ...]]]:
        D, I = self.D, self.I  # gate_up and down as int8 matrices, then their scales (and zero points)
        mats = [(torch.int8, (2 * I, D)), (torch.int8, (D, I))]
        if self.scheme.group_size is None and self.scheme.symmetric:  # per-row scales, as torch's kernel
            return [*mats, (self.dtype, (2 * I,)), (self.dtype, (D,))]
        gd, gi = self.groups(D), self.groups(I)
        scales = [(self.dtype, (2 * I, gd)), (self.dtype, (D, gi))]
        zeros = [] if self.scheme.symmetric else [(torch.int8, (2 * I, gd)), (torch.int8, (D, gi))]
        return [*mats, *scales, *zeros]

    def prepare(self, raw: list[torch.Tensor], slot: torch.Tensor) -> None:
        gu_w, down_w, gu_s, down_s, *zeros = (p.view(slot) for p in self.slot)
        (gp, gs, gz, (_, d_in)), (up_, us, uz, _), (dp, ds, dz, (d_out, i_in)) = self.matrices(raw)
        gu_w[: self.I].copy_(unpack_int8(gp, d_in))
        gu_w[self.I :].copy_(unpack_int8(up_, d_in))
        down_w.copy_(unpack_int8(dp, i_in))
        gu_s.copy_(torch.cat([gs, us]).view(gu_s.shape))  # channel: [2I, 1] scales -> [2I]
        down_s.copy_(ds.view(down_s.shape))
        if zeros:
            zeros[0].copy_(torch.cat([unpack_zero_point(z, self.I) for z in (gz, uz)]))
            zeros[1].copy_(unpack_zero_point(dz, d_out))

    def kernel_ffn(self, x: torch.Tensor, *parts: torch.Tensor) -> torch.Tensor:
        return kernel_ffn(x, *parts)

    def stack(self, buffer: torch.Tensor, n_slots: int, stride: int) -> StackedExperts | None:
        """Decode through the C kernel (int8_cpu.py) where it builds; torch's kernel one expert at a time
        (StackedKernel) otherwise."""
        if self.kernel and buffer.device.type == "cpu" and int8_cpu.library() is not None:
            offsets = tuple(p.offset for p in self.slot)  # gate_up, down weights; scales; zero points
            groups = (self.groups(self.D), self.groups(self.I))
            return int8_cpu.StackedInt8Cpu(buffer, stride, self.D, self.I, offsets, groups)
        return super().stack(buffer, n_slots, stride)

    def dequantised_ffn(self, slot: torch.Tensor) -> Expert:
        """The kernel slot's expert by the reference path: (q - zero) * scale dequantised, then F.linear."""
        gu_w, down_w, gu_s, down_s, *zeros = (p.view(slot) for p in self.slot)
        gu_z, down_z = zeros or (None, None)
        return lambda x: ffn(
            x,
            dequantize_groups(gu_w, gu_s, gu_z, x.dtype),
            dequantize_groups(down_w, down_s, down_z, x.dtype),
        )


def kernel_ffn(
    x: torch.Tensor,
    gu_w: torch.Tensor,
    down_w: torch.Tensor,
    gu_s: torch.Tensor,
    down_s: torch.Tensor,
    gu_z: torch.Tensor | None = None,
    down_z: torch.Tensor | None = None,
) -> torch.Tensor:
    """One expert from its kernel slot's parts: x [T, D] -> [T, D], two calls of an int8 kernel (the C
    one where it builds, else torch's: symmetric channel only), or for many rows two bf16 matmuls over the
    weights dequantised."""
    if x.shape[0] >= DEQUANTISE_ROWS:
        return ffn(
            x,
            dequantize_groups(gu_w, gu_s, gu_z, x.dtype),
            dequantize_groups(down_w, down_s, down_z, x.dtype),
        )
    if c_kernel_takes(x, gu_s) and kernel_int8.library() is not None:
        x = x.contiguous()
        g, u = kernel_int8.int8_linear(x, gu_w, gu_s, gu_z).chunk(2, dim=-1)  # [T, I] each
        return kernel_int8.int8_linear(F.silu(g) * u, down_w, down_s, down_z)
    mm = torch.ops.aten._weight_int8pack_mm
    g, u = mm(x.contiguous(), gu_w, gu_s).chunk(2, dim=-1)
    return mm(F.silu(g) * u, down_w, down_s)


def unpack_zero_point(packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """int32 [ceil(out/4), groups] (packed down the rows) -> int8 zero points [out, groups]."""
    return unpack_int8(packed.transpose(-1, -2), out_features).transpose(-1, -2)


def dequantize_int8(packed, scale, zero_point, dtype: torch.dtype, shape: tuple[int, int]) -> torch.Tensor:
    """compressed.dequantize for int8: what compressed-tensors' decompress gives, cast to `dtype`."""
    return compressed.dequantize(unpack_int8, BITS, packed, scale, zero_point, dtype, shape)
