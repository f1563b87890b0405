"""int4 experts: compressed-tensors pack-quantized W4A16 (compressed.py has the layout and the scheme),
its packing, and the CPU int4 kernel of the resident layers (kernels/int4.py: the C kernel, or torch's
`aten._weight_int4pack_mm_for_cpu` without a compiler) for bf16 compute.

Packing: eight 4-bit values per int32 word, element i of each 8 at bits 4i..4i+3, each stored as q + 8
(q in [-8, 7]); zero points packed the same way down the rows.

The kernel computes y = x @ W.T with W[n, k] = (u[n, k] - 8) * scale[k // g, n] + zero[k // g, n], from
u packed by `aten._convert_weight_to_int4pack_for_cpu` (uint8 [N, K/2], blocks of 64 rows: for block b and
input column k, 32 bytes whose low nibbles are rows 64b + j and high nibbles rows 64b + 32 + j).
compressed-tensors stores u = q + 8 as int32 [N, K/8], little-endian nibbles along k, so the symmetric
scheme needs zero = 0 and the asymmetric one zero = -(zp) * scale. `to_kernel_layout` converts the bytes
directly; `layout_matches_torch` checks it against torch's own conversion once, and `to_kernel_layout`
falls back to torch's when the layout of this torch build differs.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from ...kernels import int4 as kernel_int4
from ...kernels.int4 import layout_matches_torch
from ...weights.packed import pack_int4, unpack_int4
from ..stacks import StackedExperts
from . import compressed, int4_cpu
from .base import ffn
from .compressed import DEQUANTISE_ROWS, PackedFormat, QuantScheme

BITS = 4
Q_MIN, Q_MAX = compressed.q_range(BITS)
OFFSET = 8  # stored nibble = q + OFFSET
PER_WORD = 32 // BITS
BLOCK_N = kernel_int4.BLOCK_N  # rows per block of the CPU kernel's layout


# ---- packing ----------------------------------------------------------------------------------------


def pack_zero_point(zp: torch.Tensor) -> torch.Tensor:
    """int8 zero-points [out, groups] in [-8, 7] -> int32 [ceil(out/8), groups] (packed down the rows)."""
    return pack_int4(zp.t()).t().contiguous()


def unpack_zero_point(packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """int32 [..., ceil(out/8), groups] -> int8 zero-points [..., out, groups] in [-8, 7]."""
    return unpack_int4(packed.transpose(-1, -2), out_features).transpose(-1, -2)


def dequantize_int4(
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    group_size: int,
    dtype: torch.dtype,
    shape: tuple[int, int],
) -> torch.Tensor:
    """compressed.dequantize for int4 (group_size: implied by the scale's shape, kept for the callers)."""
    return compressed.dequantize(unpack_int4, BITS, packed, scale, zero_point, dtype, shape)


def quantize_int4(
    w: torch.Tensor, group_size: int, symmetric: bool, mse_clip: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest W [out, in] -> (weight_packed, weight_scale [out, in/group] in w's dtype, packed zp or
    None): compressed.quantize at 4 bits, packed."""
    q, scale, zp = compressed.quantize(w, BITS, group_size, symmetric, mse_clip)
    return pack_int4(q), scale, (None if symmetric else pack_zero_point(zp))


# ---- torch's CPU int4 kernel layout -----------------------------------------------------------------


def _bytes(packed: torch.Tensor) -> torch.Tensor:
    """int32 [N, K/8] compressed-tensors packing -> its uint8 [N, K/2] bytes (little-endian nibbles: the
    byte order kernels/int4.py converts)."""
    return packed.contiguous().view(torch.uint8)


def _torch_layout(packed: torch.Tensor) -> torch.Tensor:
    return kernel_int4._torch_layout(_bytes(packed))


def to_kernel_layout(packed: torch.Tensor) -> torch.Tensor:
    """int32 [N, K/8] compressed-tensors packing -> uint8 [N, K/2] in the CPU kernel's layout (the
    conversion the resident layers use, kernels/int4.py; torch's own where N is not whole blocks)."""
    if packed.shape[0] % BLOCK_N == 0:
        return kernel_int4.kernel_layout(_bytes(packed))
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


# ---- the expert format ---------------------------------------------------------------------------


class Int4Format(PackedFormat):
    """compressed-tensors pack-quantized W4A16, per expert: weight_packed int32 [out, in/8], weight_scale
    [out, in/g], and weight_zero_point int32 [out/8, in/g] when asymmetric.

    `kernel=False` (exact): PackedFormat's dequantise-and-run path, what transformers computes.
    `kernel=True` (CPU, bf16, a group size the kernel takes): on entry into a cache the expert is repacked
    into the layout of torch's `_weight_int4pack_mm_for_cpu` (gate and up as one [2I, D] matrix) with its
    (scale, zero) table."""

    bits: ClassVar[int] = BITS
    kernel_name: ClassVar[str] = "CPU int4 kernel"
    pack = staticmethod(pack_int4)
    unpack = staticmethod(unpack_int4)

    @classmethod
    def kernel_fits(
        cls, device: torch.device, dtype: torch.dtype, hidden: int, inter: int, scheme: QuantScheme
    ) -> bool:
        g = scheme.group_size  # the kernel takes group scales only
        return (
            device.type == "cpu"
            and dtype == torch.bfloat16
            and g is not None
            and kernel_fits(hidden, inter, g)
        )

    def kernel_slot(self) -> list[tuple[torch.dtype, tuple[int, ...]]]:
        D, I = self.D, self.I  # gate_up and down in the kernel's uint8 layout, then their [G, N, 2] tables
        return [
            (torch.uint8, (2 * I, D // 2)),
            (torch.uint8, (D, I // 2)),
            (self.dtype, (self.groups(D), 2 * I, 2)),
            (self.dtype, (self.groups(I), D, 2)),
        ]

    def prepare(self, raw: list[torch.Tensor], slot: torch.Tensor) -> None:
        gu_w, down_w, gu_sz, down_sz = (p.view(slot) for p in self.slot)
        (gp, gs, gz, (i_out, _)), (up_, us, uz, _), (dp, ds, dz, (d_out, _)) = self.matrices(raw)
        # gate and up share the input dim: one [2I, D] matrix, rows of gate then up
        gu_w.copy_(to_kernel_layout(torch.cat([gp, up_], dim=0)))
        down_w.copy_(to_kernel_layout(dp))
        gu_zp = None if gz is None else torch.cat([unpack_zero_point(z, i_out) for z in (gz, uz)])
        gu_sz.copy_(scales_zeros(torch.cat([gs, us]), gu_zp, self.dtype))
        down_zp = None if dz is None else unpack_zero_point(dz, d_out)
        down_sz.copy_(scales_zeros(ds, down_zp, self.dtype))

    def kernel_ffn(self, x: torch.Tensor, *parts: torch.Tensor) -> torch.Tensor:
        return kernel_ffn(x, *parts)

    def stack(self, buffer: torch.Tensor, n_slots: int, stride: int) -> StackedExperts | None:
        """Decode through the C kernel (int4_cpu.py) where it builds and the slots are in the layout it
        reads; torch's kernel one expert at a time (StackedKernel) otherwise."""
        D, I = self.D, self.I
        known = self.kernel and (2 * I) % BLOCK_N == 0 and D % BLOCK_N == 0 and layout_matches_torch()
        if known and buffer.device.type == "cpu" and int4_cpu.library() is not None:
            offsets = tuple(p.offset for p in self.slot)  # gate_up, down weights; their tables
            groups = (D // self.groups(D), I // self.groups(I))
            return int4_cpu.StackedInt4Cpu(buffer, stride, D, I, offsets, groups)
        return super().stack(buffer, n_slots, stride)


def kernel_ffn(
    x: torch.Tensor, gu_w: torch.Tensor, down_w: torch.Tensor, gu_sz: torch.Tensor, down_sz: torch.Tensor
) -> torch.Tensor:
    """One expert from its kernel slot's parts: x [T, D] -> [T, D], two calls of the int4 kernel
    (`kernels.int4.matmul`: the C kernel where it builds, torch's otherwise), or for many rows two bf16
    matmuls over the weights dequantised once (`kernel_dense`)."""
    gu_known, down_known = dense_layout_known(gu_w), dense_layout_known(down_w)
    if x.shape[0] >= DEQUANTISE_ROWS and gu_known and down_known:
        return ffn(x, kernel_dense(gu_w, gu_sz), kernel_dense(down_w, down_sz))
    g, u = kernel_int4.matmul(x, gu_w, gu_sz, gu_w.shape[0], gu_known).chunk(2, dim=-1)  # [T, 2I]
    return kernel_int4.matmul(F.silu(g) * u, down_w, down_sz, down_w.shape[0], down_known)  # [T, I] -> [T, D]


def dense_layout_known(w: torch.Tensor) -> bool:
    """The kernel bytes are `_direct_layout`'s (what `from_kernel_layout` inverts)."""
    return w.shape[0] % BLOCK_N == 0 and layout_matches_torch()


def from_kernel_layout(w: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] in the CPU kernel's layout -> the stored nibbles u = q + 8, uint8 [N, K]
    (`_direct_layout` inverted)."""
    n, half = w.shape
    b = w.view(n // BLOCK_N, half, 2, BLOCK_N // 2)  # [NB, K/2, column parity p, row j]
    u = torch.stack([b & 0xF, b >> 4], dim=1)  # [NB, h, K/2, p, j]: rows 32h + j of the block
    return u.permute(0, 1, 4, 2, 3).reshape(n, 2 * half)  # [NB, h, j, K/2, p] -> [N, K]


def kernel_dense(w: torch.Tensor, sz: torch.Tensor) -> torch.Tensor:
    """A kernel slot's matrix dequantised: W = (u - 8) * scale + zero per group, [N, K] in sz's dtype."""
    u = from_kernel_layout(w)
    n, k = u.shape
    groups = sz.shape[0]
    scale, zero = sz[..., 0].t()[:, :, None], sz[..., 1].t()[:, :, None]  # [N, G, 1]
    q = u.view(n, groups, k // groups).to(sz.dtype) - OFFSET
    return q.mul_(scale).add_(zero).view(n, k)  # q is fresh: in place


__all__ = ["Int4Format", "QuantScheme", "dequantize_int4", "quantize_int4"]
