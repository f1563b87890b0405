"""int4 on the CPU (bf16 activations), a weight of 4-bit values u in [0, 15] with a (scale, zero) pair per
group of K: W[n, k] = (u - 8) · scale + zero, in the layout of torch's `aten._weight_int4pack_mm_for_cpu`.
Decode rows run the C kernel of int4_cpu.py where it builds (at memory speed; torch's kernel is
compute-bound), torch's kernel otherwise (`matmul`: the one entry the resident layers and the experts use).

The kernel's layout (`aten._convert_weight_to_int4pack_for_cpu`: uint8 [N, K/2] in blocks of 64 rows: for
block b and input column k, 32 bytes whose low nibbles are rows 64b + j and high nibbles rows 64b + 32 + j)
is a byte shuffle of compressed-tensors' packing (nibbles along k), so `kernel_layout` converts the bytes
directly, checked once against torch's own conversion (`layout_matches_torch`; torch's is used where they
differ). N is padded to a multiple of 64 (rows of u = 8, scale 0: outputs 0, cut off), so the layout is
always whole blocks and `unpack_layout` can undo it for the prefill path.

Its constraints (torch 2.13): group size 32, 64, 128 or 256, K a multiple of it, N a multiple of 16.
`Int4Kernel` holds the layout and the [G, N, 2] (scale, zero) table in the compute dtype; rows from
base.GEMM_ROWS up are dequantised a block at a time and run by the bf16 GEMM (AMX where the CPU has it).
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from . import int4_cpu
from .base import GEMM_ROWS, CompactLinear

BLOCK_N = 64  # rows per block of the kernel's layout
GROUPS = (256, 128, 64, 32)  # the group sizes the kernel takes, largest first


def kernel_group(k: int, group_size: int | None) -> int | None:
    """The kernel's group size for K = k: the scheme's own, or for one scale a row the largest group
    that divides K (the row's scale repeated); None where the kernel cannot take it."""
    if group_size is not None:
        return group_size if group_size in GROUPS and k % group_size == 0 else None
    return next((g for g in GROUPS if k % g == 0), None)


def pad_rows(n: int) -> int:
    return -(-n // BLOCK_N) * BLOCK_N


def nibble_bytes(u: torch.Tensor) -> torch.Tensor:
    """uint8 nibbles u [N, K] (K even) -> uint8 [N, K/2], column 2m in the low nibble of byte m, 2m + 1 in
    the high one (compressed-tensors' int4 byte order)."""
    return u[:, 0::2] | (u[:, 1::2] << 4)


def _direct_layout(b: torch.Tensor) -> torch.Tensor:
    n, half = b.shape
    rows = b.view(n // BLOCK_N, 2, BLOCK_N // 2, half)  # [NB, 2, 32, K/2]: rows j and 32 + j of a block
    lo_rows, hi_rows = rows[:, 0], rows[:, 1]
    out = torch.empty(n // BLOCK_N, half, 2, BLOCK_N // 2, dtype=torch.uint8)  # [NB, K/2, 2, 32]
    by_row = out.permute(0, 3, 1, 2)  # [NB, 32, K/2, 2]: the same bytes, indexed like the inputs
    # input column 2m sits in the low nibbles, 2m + 1 in the high ones; written straight into place
    torch.bitwise_or(lo_rows & 0xF, hi_rows << 4, out=by_row[..., 0])
    torch.bitwise_or(lo_rows >> 4, hi_rows & 0xF0, out=by_row[..., 1])
    return out.view(n, half)


def _torch_layout(b: torch.Tensor) -> torch.Tensor:
    u = torch.stack((b & 0xF, b >> 4), dim=-1).view(b.shape[0], -1).to(torch.int32)  # [N, K]
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 1)


@functools.cache
def layout_matches_torch() -> bool:
    """`_direct_layout` gives torch's layout on this build (probed once on random bytes)."""
    g = torch.Generator().manual_seed(0)
    b = torch.randint(0, 256, (2 * BLOCK_N, 64), dtype=torch.uint8, generator=g)
    try:
        return torch.equal(_direct_layout(b), _torch_layout(b))
    except RuntimeError:
        return False


def kernel_layout(b: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] in compressed-tensors' byte order (N a multiple of 64) -> the kernel's layout."""
    return _direct_layout(b) if layout_matches_torch() else _torch_layout(b)


def unpack_layout(w: torch.Tensor, rows: slice, dtype: torch.dtype) -> torch.Tensor:
    """The kernel's layout uint8 [N, K/2] -> the nibbles u [n, K] of `rows` (whole 64-row blocks) as
    `dtype` (exact: 0..15): byte (block b, column k, j) holds u[64b + j, k] low and u[64b + 32 + j, k] high.
    Written in place: two strided copies that convert as they go, the fewest passes over the weight."""
    n, half = w.shape
    blocks = w.view(n // BLOCK_N, 2 * half, BLOCK_N // 2)[rows.start // BLOCK_N : -(-rows.stop // BLOCK_N)]
    u = torch.empty(blocks.shape[0], 2, BLOCK_N // 2, 2 * half, dtype=dtype, device=w.device)
    u[:, 0].copy_((blocks & 0xF).transpose(-1, -2))  # rows 64b + j
    u[:, 1].copy_((blocks >> 4).transpose(-1, -2))  # rows 64b + 32 + j
    return u.view(-1, 2 * half)


def torch_matmul(x: torch.Tensor, weight: torch.Tensor, table: torch.Tensor, n: int) -> torch.Tensor:
    """x [T, K] @ Wᵀ -> [T, n] through torch's kernel (the reference and the path without a compiler)."""
    group = x.shape[-1] // table.shape[0]
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), weight, group, table)
    return y if y.shape[-1] == n else y[:, :n]


def matmul(x: torch.Tensor, weight: torch.Tensor, table: torch.Tensor, n: int, direct: bool) -> torch.Tensor:
    """x [T, K] @ Wᵀ -> [T, n] in x's dtype for W uint8 [N_pad, K/2] in the kernel layout and its
    [G, N_pad, 2] (scale, zero) table: the C kernel where it takes the call (bf16, the bytes in
    `_direct_layout`'s order: `direct`), torch's otherwise."""
    if direct and int4_cpu.fits(x, weight, table):
        y = int4_cpu.matvec(x, weight, table, n)
        if y is not None:
            return y
    return torch_matmul(x, weight, table, n)


def scale_zero_table(scale: torch.Tensor, zero: torch.Tensor, n_pad: int, dtype: torch.dtype) -> torch.Tensor:
    """scale, zero [N, G] (fp32) -> the kernel's [G, N_pad, 2] (scale, zero) table in `dtype` (padded rows 0)."""
    n, groups = scale.shape
    table = torch.zeros(groups, n_pad, 2, dtype=dtype)
    table[:, :n, 0] = scale.t()
    table[:, :n, 1] = zero.t()
    return table


@dataclasses.dataclass(frozen=True, eq=False)
class Int4Kernel(CompactLinear):
    """int4 group-wise (symmetric or not): decode rows through `matmul`, more dequantised a block at a time."""

    TENSORS = ("weight", "table")

    group: int  # the kernel's group size
    weight: torch.Tensor  # uint8 [N_pad, K/2], the kernel's layout
    table: torch.Tensor  # [G, N_pad, 2] (scale, zero) in the compute dtype
    direct: bool = True  # the layout is `_direct_layout`'s (unpack_layout can undo it)

    @classmethod
    def build(
        cls,
        shape: tuple[int, int],
        u_bytes: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor,
        group: int,
        dtype,
    ) -> Int4Kernel:
        """u_bytes uint8 [N, K/2] (nibbles u = q + 8 in compressed-tensors' order), scale and zero [N, G']
        (fp32; G' = K / group, or 1: a scale a row, repeated) such that W = (u - 8) · scale + zero."""
        n, k = shape
        n_pad = pad_rows(n)
        if n_pad != n:  # nibbles of 8 (0x88): value 0
            u_bytes = torch.cat([u_bytes, u_bytes.new_full((n_pad - n, k // 2), 0x88)])
        groups = k // group
        scale, zero = scale.expand(n, groups), zero.expand(n, groups)
        table = scale_zero_table(scale, zero, n_pad, dtype)
        return cls(shape, group, kernel_layout(u_bytes.contiguous()), table, layout_matches_torch())

    @property
    def encoding(self) -> str:
        return f"int4 g{self.group}, CPU int4 kernel"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] >= GEMM_ROWS and self.direct:
            return self.dequantized_linear(x, BLOCK_N)
        return matmul(x, self.weight, self.table, self.shape[0], self.direct)

    def dequantize(self, dtype: torch.dtype, rows: slice | None = None) -> torch.Tensor:
        """(u - 8) · scale (+ zero) computed in `dtype`: in bf16 each product is rounded once, so a
        symmetric weight has the bits of compressed-tensors' q · scale (scales stored in bf16)."""
        n = self.shape[0]
        rows = slice(0, n) if rows is None else slice(rows.start or 0, min(rows.stop, n))
        if not self.direct:  # another layout: through the kernel on the identity (slow, tests only)
            k = self.shape[1]
            eye = torch.eye(k, dtype=self.table.dtype, device=self.weight.device)
            w = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.weight, self.group, self.table).t()
            return w[rows].to(dtype)
        start = rows.start // BLOCK_N * BLOCK_N
        u = unpack_layout(self.weight, rows, dtype)[rows.start - start : rows.stop - start]  # [n, K]
        return apply_table(u, self.table[:, rows], 8)


def apply_table(u: torch.Tensor, table: torch.Tensor, offset: int) -> torch.Tensor:
    """u [n, K] (integers in a float dtype, written over) -> (u - offset) · scale + zero, the (scale, zero)
    table [G, n, 2] applied per group of K, in u's dtype."""
    n, k = u.shape
    g = u.view(n, table.shape[0], k // table.shape[0])  # [n, G, group]
    g.sub_(offset).mul_(table[..., 0].t().to(u.dtype).unsqueeze(-1))
    if table[..., 1].any():  # asymmetric: the folded zero points
        g.add_(table[..., 1].t().to(u.dtype).unsqueeze(-1))
    return u
