"""compressed-tensors int4 -> the layout of torch's CPU int4 kernel (`aten._weight_int4pack_mm_for_cpu`).

The kernel computes y = x @ W.T with W[n, k] = (u[n, k] - 8) * scale[k // g, n] + zero[k // g, n], from
u packed by `aten._convert_weight_to_int4pack_for_cpu` (uint8 [N, K/2], blocks of 64 rows: for block b and
input column k, 32 bytes whose low nibbles are rows 64b + j and high nibbles rows 64b + 32 + j).
compressed-tensors stores u = q + 8 as int32 [N, K/8], little-endian nibbles along k, so the symmetric
scheme needs zero = 0 and the asymmetric one zero = -(zp) * scale.

`to_kernel_layout` converts the bytes directly (no int32 [N, K] detour: a few byte ops per matrix);
`layout_matches_torch` checks it against torch's own conversion once, and `to_kernel_layout` falls back
to torch's when the layout of this torch build differs.
"""

from __future__ import annotations

import functools

import torch

from .int4 import OFFSET, unpack_int4

BLOCK_N = 64


def _direct_layout(packed: torch.Tensor) -> torch.Tensor:
    b = packed.contiguous().view(torch.uint8)  # [N, K/2]
    n, half = b.shape
    rows = b.view(n // BLOCK_N, 2, BLOCK_N // 2, half)  # [NB, 2, 32, K/2]: rows j and 32 + j of a block
    lo_rows, hi_rows = rows[:, 0], rows[:, 1]
    out = torch.empty(n // BLOCK_N, half, 2, BLOCK_N // 2, dtype=torch.uint8)  # [NB, K/2, 2, 32]
    by_row = out.permute(0, 3, 1, 2)  # [NB, 32, K/2, 2]: the same bytes, indexed like the inputs
    # input column 2m sits in the low nibbles, 2m + 1 in the high ones; written straight into place
    torch.bitwise_or(lo_rows & 0xF, hi_rows << 4, out=by_row[..., 0])
    torch.bitwise_or(lo_rows >> 4, hi_rows & 0xF0, out=by_row[..., 1])
    return out.view(n, half)


def _torch_layout(packed: torch.Tensor) -> torch.Tensor:
    u = unpack_int4(packed, 8 * packed.shape[1]).int() + OFFSET  # the stored nibbles q + 8
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 1)


@functools.cache
def layout_matches_torch() -> bool:
    """Our byte conversion gives torch's layout (probed once on a random matrix)."""
    g = torch.Generator().manual_seed(0)
    packed = torch.randint(-(2**31), 2**31 - 1, (2 * BLOCK_N, 32), dtype=torch.int32, generator=g)
    try:
        return torch.equal(_direct_layout(packed), _torch_layout(packed))
    except RuntimeError:
        return False


def to_kernel_layout(packed: torch.Tensor) -> torch.Tensor:
    """int32 [N, K/8] compressed-tensors packing -> uint8 [N, K/2] in the CPU kernel's layout."""
    if packed.shape[0] % BLOCK_N == 0 and layout_matches_torch():
        return _direct_layout(packed)
    return _torch_layout(packed)


def scales_zeros(scale: torch.Tensor, zero_point: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """scale [N, G] and unpacked zero points zp [N, G] in [-8, 7] (or None) -> [G, N, 2] (scale, zero) in
    `dtype`, so that (u - 8) * scale + zero = (q - zp) * scale."""
    s = scale.to(dtype)
    zero = torch.zeros_like(s) if zero_point is None else -(zero_point.to(dtype) * s)
    return torch.stack([s, zero], dim=-1).transpose(0, 1).contiguous()  # [G, N, 2]


def kernel_fits(hidden: int, inter: int, group_size: int) -> bool:
    """The CPU kernel wants K a multiple of the group size and groups of 32..256 (powers of two)."""
    return group_size in (32, 64, 128, 256) and hidden % group_size == 0 and inter % group_size == 0
