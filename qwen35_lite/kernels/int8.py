"""int8 on the CPU with bf16 activations, three ways:

- `Int8Kernel`: symmetric, one scale a row: the C kernel of int8_cpu.py for decode rows where it builds,
  else torch's `aten._weight_int8pack_mm` (int8 [N, K] and a scale per row: exactly that scheme; compute-
  bound, no faster than the bf16 matvec of the same shape). torch's bf16 path needs K a multiple of 16
  (torch 2.13 crashes otherwise): taken for K a multiple of 32.
- `Int8Group`: any int8 scheme (group scales, zero points) through the C kernel: int8 [N, K], a bf16 scale
  and an int8 zero point per row and group. Chosen only where the kernel builds.
- `Int8Split` (without a C compiler): any group size the int4 kernel takes, symmetric or not: the stored byte u = q + 128 split
  into its nibbles u = 16·h + l, so W = (q - zp)·s = (h - 8)·16s + (l - 8)·s + (8 - zp)·s: two calls of the
  int4 kernel (int4.py) over the same input, one reading the high nibbles with (16s, (8 - zp)·s), the
  other the low ones with (s, 0). One byte a weight read, as int8, through a kernel that runs at memory
  speed, where dequantising per call reads and writes the whole matrix in bf16 again.

Rows from base.GEMM_ROWS up are dequantised a block at a time and run by the bf16 GEMM.
"""

from __future__ import annotations

import dataclasses

import torch

from . import int8_cpu
from .base import GEMM_ROWS, CompactLinear
from .int4 import BLOCK_N, Int4Kernel, apply_table, nibble_bytes, unpack_layout

K_MULTIPLE = 32  # Int8Kernel's K


@dataclasses.dataclass(frozen=True, eq=False)
class Int8Kernel(CompactLinear):
    """int8 symmetric, a scale per row, for `_weight_int8pack_mm`."""

    TENSORS = ("q", "scale")

    q: torch.Tensor  # int8 [N, K]
    scale: torch.Tensor  # [N] in the compute dtype

    @property
    def encoding(self) -> str:
        return "int8 per-channel, CPU int8 kernel"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] >= GEMM_ROWS:
            return self.dequantized_linear(x)
        if c_kernel_takes(x, self.scale) and int8_cpu.library() is not None:
            return int8_cpu.int8_linear(x, self.q, self.scale)
        return torch.ops.aten._weight_int8pack_mm(x.contiguous(), self.q, self.scale)

    def dequantize(self, dtype: torch.dtype, rows: slice | None = None) -> torch.Tensor:
        """q · scale in `dtype` (one rounding: q has 8 bits)."""
        rows = rows or slice(None)
        return self.q[rows].to(dtype).mul_(self.scale[rows].to(dtype).unsqueeze(-1))


def c_kernel_takes(x: torch.Tensor, scale: torch.Tensor) -> bool:
    """The C kernel's inputs: bf16 activations and scales on the CPU."""
    return x.device.type == "cpu" and x.dtype == torch.bfloat16 and scale.dtype == torch.bfloat16


@dataclasses.dataclass(frozen=True, eq=False)
class Int8Group(CompactLinear):
    """int8 with a scale (and a zero point when asymmetric) per row and group of K / G inputs, run by the C
    kernel (int8_cpu.py): W = (q - zero) * scale."""

    TENSORS = ("q", "scale", "zero")

    q: torch.Tensor  # int8 [N, K]
    scale: torch.Tensor  # bf16 [N, G]
    zero: torch.Tensor | None = None  # int8 [N, G], None when symmetric

    @property
    def encoding(self) -> str:
        groups = self.scale.shape[1]
        size = "per-channel" if groups == 1 else f"g{self.shape[1] // groups}"
        sym = "symmetric" if self.zero is None else "asymmetric"
        return f"int8 {size} {sym}, CPU int8 C kernel"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] >= GEMM_ROWS or not c_kernel_takes(x, self.scale) or int8_cpu.library() is None:
            return self.dequantized_linear(x)
        return int8_cpu.int8_linear(x, self.q, self.scale, self.zero)

    def dequantize(self, dtype: torch.dtype, rows: slice | None = None) -> torch.Tensor:
        rows = rows or slice(None)
        zero = None if self.zero is None else self.zero[rows]
        return dequantize_groups(self.q[rows], self.scale[rows], zero, dtype)


def dequantize_groups(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """int8 q [N, K] with a scale (and a zero point) per row and group ([N, G] or [N]) -> (q - zero) *
    scale [N, K] in `dtype` (bf16 or fp32), made in one matrix of `dtype`: q - zero (at most 255) is exact
    in bf16 and the product rounds once, the bits of computing it in fp32 and casting."""
    n, k = q.shape
    groups = scale.numel() // n
    w = q.view(n, groups, k // groups).to(dtype)  # fresh: the steps in place
    if zero is not None:
        w.sub_(zero.reshape(n, groups, 1).to(dtype))
    return w.mul_(scale.reshape(n, groups, 1).to(dtype)).view(n, k)


@dataclasses.dataclass(frozen=True, eq=False)
class Int8Split(CompactLinear):
    """int8 as its high and low nibbles, each an Int4Kernel over the same rows."""

    TENSORS = ()

    high: Int4Kernel
    low: Int4Kernel
    symmetric: bool = True

    @classmethod
    def build(
        cls,
        shape: tuple[int, int],
        u: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor | None,
        group: int,
        dtype,
    ) -> Int8Split:
        """u uint8 [N, K] (the stored bytes q + 128), scale [N, G'] and zero points zp [N, G'] or None, with
        G' = K / group or 1 (a scale a row, repeated)."""
        s = scale.float()
        zp = torch.zeros_like(s) if zero is None else zero.float()
        high = Int4Kernel.build(shape, nibble_bytes(u >> 4), 16 * s, (8 - zp) * s, group, dtype)
        low = Int4Kernel.build(shape, nibble_bytes(u & 0xF), s, torch.zeros_like(s), group, dtype)
        return cls(shape, high, low, zero is None)

    @property
    def encoding(self) -> str:
        return f"int8 g{self.high.group}, two CPU int4 kernel calls"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] >= GEMM_ROWS and self.high.direct:
            return self.dequantized_linear(x, BLOCK_N)
        return self.high(x) + self.low(x)

    def dequantize(self, dtype: torch.dtype, rows: slice | None = None) -> torch.Tensor:
        """The byte u = 16·h + l rebuilt from the two layouts (exact in bf16: at most 255), then
        (u - 128) · s when symmetric (one rounding: compressed-tensors' q · s), else (u - 136) · s + (8 - zp) · s
        (u - 136 = 16(h - 8) + (l - 8)), in `dtype`."""
        n = self.shape[0]
        rows = slice(0, n) if rows is None else slice(rows.start or 0, min(rows.stop, n))
        if not self.high.direct:
            return (self.high.dequantize(torch.float32, rows) + self.low.dequantize(torch.float32, rows)).to(
                dtype
            )
        start = rows.start // BLOCK_N * BLOCK_N
        cut = slice(rows.start - start, rows.stop - start)
        u = unpack_layout(self.high.weight, rows, dtype)[cut].mul_(16)
        u.add_(unpack_layout(self.low.weight, rows, dtype)[cut])
        low = self.low.table[:, rows]  # (s, 0)
        if self.symmetric:
            return apply_table(u, low, 128)
        return apply_table(u, torch.stack([low[..., 0], self.high.table[:, rows, 1]], dim=-1), 136)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            **{f"high.{k}": v for k, v in self.high.tensors().items()},
            **{f"low.{k}": v for k, v in self.low.tensors().items()},
        }

    def with_tensors(self, tensors: dict[str, torch.Tensor]) -> Int8Split:
        part = {
            p: {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(p + ".")}
            for p in ("high", "low")
        }
        return dataclasses.replace(
            self, high=self.high.with_tensors(part["high"]), low=self.low.with_tensors(part["low"])
        )
