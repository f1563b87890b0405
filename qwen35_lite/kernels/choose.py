"""Which encoding a packed Linear runs in, from the compute device and dtype: the fastest whose constraints
hold, else the exact one it was loaded in (PackedWeight: dequantised per call).

| weight              | CPU, bf16                                           | otherwise (fp32, CUDA)  |
|---------------------|-----------------------------------------------------|-------------------------|
| int4, group or row  | Int4Kernel (group 32-256 dividing K, or K % 32 = 0) | PackedWeight            |
| int8 sym., a row    | Int8Kernel (K % 32 = 0)                             | PackedWeight            |
| int8, other         | Int8Group (C kernel builds, groups of 16k), else    | PackedWeight            |
|                     | Int8Split (as int4)                                 |                         |

fp32 keeps the exact path on purpose: it computes what transformers + compressed-tensors compute (the
kernels round their weights and sums otherwise). `compact_nbytes` is what `compact` will hold, from the
scheme alone, for the memory plan.
"""

from __future__ import annotations

import math

import torch

from .base import CompactLinear
from .blocks import RowBlocks
from .int4 import Int4Kernel, kernel_group, pad_rows
from .int8 import K_MULTIPLE, Int8Group, Int8Kernel, Int8Split
from .int8_cpu import fits as int8_c_fits
from .int8_cpu import library as int8_c_library
from .packed import PackedWeight

Weight = torch.Tensor | CompactLinear


def _kernel(bits: int, group_size: int | None, symmetric: bool, k: int, device: torch.device, dtype) -> str:
    """The kernel for this scheme and K on device/dtype: int4, int8, int8group, int8split, or "" (the
    exact path)."""
    if torch.device(device).type != "cpu" or dtype != torch.bfloat16:
        return ""
    if bits == 8 and symmetric and group_size is None and k % K_MULTIPLE == 0:
        return "int8"
    groups = 1 if group_size is None else k // group_size if k % group_size == 0 else 0
    if bits == 8 and groups and int8_c_fits(k, groups) and int8_c_library() is not None:
        return "int8group"
    if kernel_group(k, group_size) is None:
        return ""
    return "int4" if bits == 4 else "int8split"


def compact(w: Weight, device: torch.device | str, dtype: torch.dtype) -> Weight:
    """The weight as it will run on `device` in `dtype` (built on the host, moved by the caller): a packed
    Linear in its kernel's encoding where one fits, dense tensors as they are."""
    if isinstance(w, RowBlocks):
        return RowBlocks(w.shape, tuple(compact(p, device, dtype) for p in w.parts))
    if not isinstance(w, PackedWeight):
        return w
    n, k = w.shape
    kind = _kernel(w.bits, w.group_size, w.symmetric, k, device, dtype)
    if not kind:
        return w
    scale = w.scale.float()
    if kind == "int8":
        q = w.dequantize_int()  # int8 [N, K]
        return Int8Kernel(w.shape, q, scale.view(n).to(dtype))
    if kind == "int8group":
        zero = None if w.zero is None else w.zero.contiguous()
        return Int8Group(w.shape, w.dequantize_int(), scale.to(dtype).contiguous(), zero)
    group = kernel_group(k, w.group_size)
    zp = None if w.zero is None else w.zero.float()
    if kind == "int4":
        u_bytes = w.packed.view(torch.uint8)[:, : k // 2]  # nibbles q + 8, as the kernel wants them
        zero = torch.zeros_like(scale) if zp is None else -zp * scale
        return Int4Kernel.build(w.shape, u_bytes, scale, zero, group, dtype)
    u = w.packed.view(torch.uint8)[:, :k]  # bytes q + 128
    return Int8Split.build(w.shape, u, scale, None if zp is None else zp, group, dtype)


def compact_nbytes(
    bits: int,
    group_size: int | None,
    symmetric: bool,
    shape: tuple[int, int],
    device: torch.device | str,
    dtype: torch.dtype,
    scale_dtype: torch.dtype,
) -> int:
    """Bytes `compact` holds for a packed Linear of this scheme and shape [N, K] (no weight needed)."""
    n, k = shape
    kind = _kernel(bits, group_size, symmetric, k, device, dtype)
    if kind == "int8":
        return n * k + n * dtype.itemsize
    if kind == "int8group":
        groups = k // group_size if group_size else 1
        return n * k + n * groups * (dtype.itemsize + (0 if symmetric else 1))
    if kind:
        n_pad, groups = pad_rows(n), k // kernel_group(k, group_size)
        one = n_pad * k // 2 + groups * n_pad * 2 * dtype.itemsize  # layout + (scale, zero) table
        return one if kind == "int4" else 2 * one
    groups = k // group_size if group_size else 1
    packed = n * math.ceil(k * bits / 32) * 4
    return packed + n * groups * scale_dtype.itemsize + (0 if symmetric else n * groups)
