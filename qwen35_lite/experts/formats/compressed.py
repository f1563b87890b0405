"""compressed-tensors `pack-quantized` experts (WnA16, integer), what every bit width shares, bit for bit as
compressed-tensors 0.20.1: its round-to-nearest quantiser and the expert format built on weights/packed.py
(its `quantization_config`, packing and dequantisation order, which the checkpoint reader shares for
resident layers) (`PackedFormat`; a module per bit width, e.g. int4.py, adds the
packing and a CPU kernel).

The on-disk layout and the dequantisation order are written down once, in weights/packed.py.

Legend: D = hidden, I = expert FFN width, G = groups along the input dim, A = experts run (top-k).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar

import torch

from ...errors import ConfigError
from ...kernels.base import GEMM_ROWS
from ...weights.packed import (
    CompressedQuantization,
    QuantScheme,
    dequantize,
    parse_config,
    q_range,
)
from ..layout import pack_layout, stack_parts
from ..stacks import StackedDequantised, StackedExperts, StackedKernel, one_row_by
from .base import Expert, ExpertFormat, dequantised_gather, per_expert

if TYPE_CHECKING:
    from ...weights.checkpoint import Checkpoint, TensorInfo

# ---- quantising and dequantising ----------------------------------------------------------------------


def _qparams(
    min_vals: torch.Tensor, max_vals: torch.Tensor, symmetric: bool, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """compressed-tensors' `calculate_qparams` for INT`bits` from per-group min/max, in the weight's dtype."""
    q_min, q_max = q_range(bits)
    # 0 must stay representable
    min_vals = torch.min(min_vals, torch.zeros_like(min_vals))
    max_vals = torch.max(max_vals, torch.zeros_like(max_vals))
    bit_min, bit_max = torch.tensor(float(q_min)), torch.tensor(float(q_max))
    bit_range = (
        bit_max - bit_min
    )  # 15 at 4 bits: a symmetric scale is absmax / 7.5, as compressed-tensors has it
    if symmetric:
        max_pos = torch.max(torch.abs(min_vals), torch.abs(max_vals))
        scales = max_pos / (bit_range.to(max_pos.dtype) / 2)
        zero_points = torch.zeros(scales.shape, dtype=min_vals.dtype)
    else:
        scales = (max_vals - min_vals) / bit_range.to(max_vals.dtype)
        zero_points = torch.clamp(bit_min - (min_vals / scales), bit_min, bit_max)
    eps = torch.finfo(scales.dtype).eps  # an all-zero group would divide by 0
    scales = torch.where(scales == 0, torch.tensor(eps, dtype=scales.dtype), scales)
    zero_points = torch.round(torch.clamp(zero_points, -128, 127)).to(torch.int8)
    return scales, zero_points


def _round(groups: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, bits: int) -> torch.Tensor:
    """compressed-tensors' `quantize`: x / scale + zp, clamp to the bits' range, round half to even -> int8."""
    q_min, q_max = q_range(bits)
    scaled = groups / scale.unsqueeze(-1)
    scaled += zp.unsqueeze(-1).to(groups.dtype)
    return torch.round(torch.clamp(scaled, float(q_min), float(q_max))).to(torch.int8)


# Clip ratios tried by the MSE search: the group's range shrunk by up to 30%.
CLIP_GRID = tuple(1 - 0.02 * i for i in range(16))


def _mse_qparams(groups: torch.Tensor, symmetric: bool, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group, the clip ratio of CLIP_GRID whose qparams give the least squared weight error."""
    min_vals, max_vals = torch.amin(groups, dim=-1), torch.amax(groups, dim=-1)
    best = None
    for ratio in CLIP_GRID:
        scale, zp = _qparams(min_vals * ratio, max_vals * ratio, symmetric, bits)
        q = _round(groups, scale, zp, bits)
        back = (q.float() - zp.float().unsqueeze(-1)) * scale.float().unsqueeze(-1)
        err = (back - groups.float()).square().sum(-1)  # [out, groups]
        if best is None:
            best = [err, scale, zp]
            continue
        better = err < best[0]
        best = [
            torch.where(better, err, best[0]),
            torch.where(better, scale, best[1]),
            torch.where(better, zp, best[2]),
        ]
    return best[1], best[2]


def quantize(
    w: torch.Tensor, bits: int, group_size: int, symmetric: bool, mse_clip: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest W [out, in] -> (q int8 [out, in], scale [out, in/group] in w's dtype, zp int8
    [out, in/group]); the caller packs q (and zp when asymmetric).

    Min/max per group, scale and zero-point as compressed-tensors' `calculate_qparams`, then its
    `quantize` (x / scale + zp, clamp to the range, round half to even), so the result equals what its
    compressor writes for the same w. `mse_clip` instead picks, per group, the clipped range (CLIP_GRID)
    with the least squared error: same format, usually a smaller error, no longer compressed-tensors' choice.
    """
    out_features, in_features = w.shape
    if in_features % group_size:
        raise ValueError(f"in_features {in_features} is not a multiple of group_size {group_size}")
    groups = w.unflatten(-1, (in_features // group_size, group_size))  # [out, groups, g]
    if mse_clip:
        scale, zp = _mse_qparams(groups, symmetric, bits)
    else:
        scale, zp = _qparams(torch.amin(groups, dim=-1), torch.amax(groups, dim=-1), symmetric, bits)
    return _round(groups, scale, zp, bits).flatten(start_dim=-2), scale, zp


# ---- the expert format ---------------------------------------------------------------------------------


# From this many rows (a prefill block's tokens for one expert) a kernel format's expert is dequantised once
# and run by bf16 matmuls (oneDNN, AMX where there is one): the int4/int8 kernels' time grows with the
# rows, the matmul's barely; the resident layers' threshold (kernels.base.GEMM_ROWS).
DEQUANTISE_ROWS = GEMM_ROWS


class PackedFormat(ExpertFormat):
    """compressed-tensors pack-quantized experts, per expert: weight_packed, weight_scale, and
    weight_zero_point when asymmetric (compressed.py's docstring).

    `kernel=False` (exact): slots hold the packed bytes; the expert is dequantised as compressed-tensors
    does (W = q * scale in the scale's dtype, then cast) and runs densely: what transformers computes.
    `kernel=True`: a subclass's CPU kernel runs it from a slot prepared for it on entry into a cache.
    Subclasses set `bits` and `unpack`, and for the kernel `kernel_fits`, `kernel_slot`, `prepare`, `kernel_ffn`
    (and `stack` where a C kernel runs a step's experts in one call).
    """

    bits: ClassVar[int]
    kernel_name: ClassVar[str] = ""

    @staticmethod
    def unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def pack(q: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __init__(
        self,
        hidden: int,
        inter: int,
        dtype: torch.dtype,
        scheme: QuantScheme,
        scale_dtype: torch.dtype,
        kernel: bool,
    ) -> None:
        super().__init__(hidden, inter, dtype)
        D, I = hidden, inter
        self.scheme, self.scale_dtype, self.kernel = scheme, scale_dtype, kernel
        self.mats = ((I, D), (I, D), (D, I))  # (out, in) of gate, up, down
        words = self.bits / 32  # int32 words per value
        specs = [(torch.int32, (o, math.ceil(i * words))) for o, i in self.mats]
        specs += [(scale_dtype, (o, self.groups(i))) for o, i in self.mats]
        if not scheme.symmetric:
            specs += [(torch.int32, (math.ceil(o * words), self.groups(i))) for o, i in self.mats]
        self.raw, self.raw_nbytes = pack_layout(specs)
        self.direct = not kernel
        if kernel:
            self.slot, self.slot_nbytes = pack_layout(self.kernel_slot())
        else:
            self.slot_nbytes = self.raw_nbytes
        size = f"g{scheme.group_size}" if scheme.group_size else "per-channel"
        kind = "symmetric" if scheme.symmetric else "asymmetric"
        self.name = f"int{self.bits} {size} {kind}" + (f" ({self.kernel_name})" if kernel else "")

    # ---- choosing ----

    @classmethod
    def kernel_fits(
        cls, device: torch.device, dtype: torch.dtype, hidden: int, inter: int, scheme: QuantScheme
    ) -> bool:
        """Whether the CPU kernel runs these experts (else the exact path)."""
        return False

    @classmethod
    def build(
        cls,
        quant: CompressedQuantization,
        hidden: int,
        inter: int,
        device: torch.device | str,
        dtype: torch.dtype,
        scale_dtype: torch.dtype | None,
    ) -> PackedFormat:
        """The format for `quant` computing in `dtype` on `device`; scale_dtype None: compressed-tensors
        stores the scales in the original weights' dtype (bf16 unless the config says otherwise)."""
        scheme, g, per_word = quant.scheme, quant.scheme.group_size, 32 // cls.bits
        for name, size in (("hidden_size", hidden), ("moe_intermediate_size", inter)):
            if size % per_word or (g and size % g):
                raise ConfigError(
                    f"{name} {size} is not a multiple of {per_word} and of the int{cls.bits} group size {g}",
                    "this quantised checkpoint does not fit its config.json",
                )
        scale_dtype = scale_dtype or scheme.scale_dtype or torch.bfloat16
        kernel = cls.kernel_fits(torch.device(device), dtype, hidden, inter, scheme)
        return cls(hidden, inter, dtype, scheme, scale_dtype, kernel)

    def for_compute(self, device: torch.device | str, dtype: torch.dtype) -> PackedFormat:
        quant = CompressedQuantization(self.scheme, ())
        return type(self).build(quant, self.D, self.I, device, dtype, self.scale_dtype)

    @property
    def uses_cpu_kernel(self) -> bool:
        return self.kernel

    def groups(self, in_features: int) -> int:
        g = self.scheme.group_size
        return in_features // g if g else 1

    def kernel_slot(self) -> list[tuple[torch.dtype, tuple[int, ...]]]:
        raise NotImplementedError

    # ---- reading and running ----

    def locate(self, ckpt: Checkpoint, layer: int, e: int) -> list[TensorInfo]:
        suffixes = ["weight_packed", "weight_scale"] + (
            [] if self.scheme.symmetric else ["weight_zero_point"]
        )
        return per_expert(ckpt, layer, e, suffixes)

    def matrices(self, raw: list[torch.Tensor]):
        """(packed, scale, zero_point | None, (out, in)) for gate, up, down."""
        zps = raw[6:9] if not self.scheme.symmetric else [None] * 3
        return zip(raw[0:3], raw[3:6], zps, self.mats)

    def dequantize(self, packed, scale, zero_point, shape: tuple[int, int]) -> torch.Tensor:
        """One matrix (or a stack of them) in the compute dtype, as compressed-tensors dequantises it."""
        return dequantize(self.unpack, self.bits, packed, scale, zero_point, self.dtype, shape)

    def dense(self, raw: list[torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up, down = (
            dequantize(self.unpack, self.bits, p, s, z, dtype, shape) for p, s, z, shape in self.matrices(raw)
        )
        return torch.cat([gate, up], dim=0), down

    def bind(self, slot: torch.Tensor) -> Expert:
        if not self.kernel:
            return self._dequantising(self.raw_views(slot))
        parts = [p.view(slot) for p in self.slot]
        stack = self.stack(slot, 1, slot.numel())
        expert = lambda x: self.kernel_ffn(x, *parts)  # noqa: E731
        # where a C kernel runs the layer's stack, one row as that stack runs it: where an expert sits
        # never changes the tokens (a C kernel's sums differ from torch's)
        return expert if isinstance(stack, StackedKernel) else one_row_by(stack, expert)

    def stack(self, buffer: torch.Tensor, n_slots: int, stride: int) -> StackedExperts | None:
        if self.kernel:  # a CPU kernel takes one matrix at a time: the experts run one by one
            return self.kernel_stack(stack_parts(self.slot, buffer, n_slots, stride))
        return StackedPacked(self, stack_parts(self.raw, buffer, n_slots, stride))

    def kernel_stack(self, parts: list[torch.Tensor]) -> StackedKernel:
        return StackedKernel(parts, self.kernel_ffn)

    def kernel_ffn(self, x: torch.Tensor, *parts: torch.Tensor) -> torch.Tensor:
        """One expert from its kernel slot's parts (x [T, D] -> [T, D]): the subclass's CPU kernel."""
        raise NotImplementedError

    def gather_nbytes(self, top_k: int) -> int:
        # kernel: one expert's slot copied out at a time (StackedKernel with slots on the device)
        return self.slot_nbytes if self.kernel else dequantised_gather(self, top_k)

    def prefill_nbytes(self) -> int:
        # kernel formats dequantise an expert run on many rows (int4.kernel_dense): the dense gate_up and
        # down in the compute dtype, and the unpacking's byte and compute-dtype copies of the larger one;
        # the others dequantise every call, as a one-expert gather
        if not self.kernel:
            return dequantised_gather(self, 1)
        big = 2 * self.I * self.D
        return 3 * self.I * self.D * self.dtype.itemsize + big * (3 + self.dtype.itemsize)

    # ---- writing (the `quantize` command) ----

    @classmethod
    def quantize(cls, w: torch.Tensor, scheme: QuantScheme, mse_clip: bool = False) -> list[torch.Tensor]:
        """W [out, in] -> weight_packed, weight_scale, weight_shape (and weight_zero_point), in the order
        `tensor_specs` names them."""
        q, scale, zp = quantize(w, cls.bits, scheme.group_size or w.shape[1], scheme.symmetric, mse_clip)
        parts = [cls.pack(q), scale, torch.tensor(w.shape, dtype=torch.int64)]
        return parts if scheme.symmetric else [*parts, cls.pack(zp.t()).t().contiguous()]

    @classmethod
    def tensor_specs(
        cls, module: str, shape: tuple[int, ...], dtype: torch.dtype, scheme: QuantScheme
    ) -> tuple[tuple[str, torch.dtype, tuple[int, ...]], ...]:
        """(name, dtype, shape) of each tensor `quantize` writes for the Linear `module` of `shape`."""
        out_f, in_f = shape
        group, words = scheme.group_size or in_f, cls.bits / 32
        parts = [
            (f"{module}.weight_packed", torch.int32, (out_f, math.ceil(in_f * words))),
            (f"{module}.weight_scale", dtype, (out_f, in_f // group)),
            (f"{module}.weight_shape", torch.int64, (2,)),
        ]
        if not scheme.symmetric:
            parts.append(
                (f"{module}.weight_zero_point", torch.int32, (math.ceil(out_f * words), in_f // group))
            )
        return tuple(parts)


class StackedPacked(StackedDequantised):
    """Packed slots (exact mode) stacked: the A experts' packed words, scales (and zero points) gathered
    and dequantised together by the same steps as one by one (PackedFormat.dequantize)."""

    def __init__(self, fmt: PackedFormat, parts: list[torch.Tensor]) -> None:
        self.fmt, self.parts = fmt, parts  # packed gate, up, down; scales; zero points when asymmetric

    def _dense(self, i: int, slots: torch.Tensor) -> torch.Tensor:
        pick = [p.index_select(0, slots) for p in self.parts[i::3]]  # packed, scale[, zero point]
        zp = pick[2] if len(pick) > 2 else None
        return self.fmt.dequantize(pick[0], pick[1], zp, self.fmt.mats[i])


__all__ = [
    "CompressedQuantization",
    "PackedFormat",
    "QuantScheme",
    "StackedPacked",
    "dequantize",
    "parse_config",
    "quantize",
]
