"""The exact encoding: a Linear as compressed-tensors `pack-quantized` stores it (W4A16 / W8A16), run by
dequantising it per call in compressed-tensors' order, then the dense kernels: in fp32 exactly what
transformers + compressed-tensors compute. It is what the loader builds from a checkpoint, what `fuse`
concatenates, and what the faster encodings are made from (choose.compact); it runs itself where no kernel
fits (fp32, CUDA, shapes the CPU kernels refuse).

Held: weight_packed int32 [N, ceil(K·bits/32)] as stored, weight_scale [N, G] in the stored dtype, and the
zero points (asymmetric) unpacked to int8 [N, G] (on disk they are packed down the rows, which would tie
rows together: unpacked, rows can be concatenated and permuted freely; N·G bytes, a few KiB a layer).
"""

from __future__ import annotations

import dataclasses

import torch

from .base import CompactLinear
from .packing import UNPACK


@dataclasses.dataclass(frozen=True, eq=False)
class PackedWeight(CompactLinear):
    TENSORS = ("packed", "scale", "zero")

    bits: int
    packed: torch.Tensor  # int32 [N, words]
    scale: torch.Tensor  # [N, G], the stored dtype
    zero: torch.Tensor | None = None  # int8 [N, G] unpacked zero points, None when symmetric

    @classmethod
    def from_stored(
        cls,
        bits: int,
        packed: torch.Tensor,
        scale: torch.Tensor,
        zero_point: torch.Tensor | None,
        shape: tuple[int, int],
    ) -> PackedWeight:
        """From the checkpoint's tensors: weight_packed, weight_scale, weight_zero_point ([ceil(N·bits/32),
        G] packed down the rows) or None."""
        n = int(shape[0])
        zero = None
        if zero_point is not None:
            zero = UNPACK[bits](zero_point.t(), n).t().contiguous()  # [N, G]
        return cls((n, int(shape[1])), bits, packed.contiguous(), scale.contiguous(), zero)

    @property
    def group_size(self) -> int | None:
        """Weights per scale along K; None for the channel strategy (one scale a row)."""
        groups = self.scale.shape[-1]
        return None if groups == 1 else self.shape[1] // groups

    @property
    def symmetric(self) -> bool:
        return self.zero is None

    @property
    def encoding(self) -> str:
        size = f"g{self.group_size}" if self.group_size else "per-channel"
        sym = "symmetric" if self.symmetric else "asymmetric"
        return f"int{self.bits} {size} {sym}, dequantised per call"

    def dequantize(self, dtype: torch.dtype, rows: slice | None = None) -> torch.Tensor:
        """W [N, K] in `dtype`, equal to compressed-tensors' `decompress(...)["weight"].to(dtype)` bit for bit:
        every step in the scale's dtype, only the result cast (weights/packed.dequantize's order)."""
        rows = rows or slice(None)
        packed, scale = self.packed[rows], self.scale[rows]
        k = self.shape[1]
        groups = scale.shape[-1]
        q = UNPACK[self.bits](packed, k).unflatten(-1, (groups, k // groups))  # [n, G, g]
        w = q.to(scale.dtype)
        if self.zero is not None:
            w = w - self.zero[rows].to(scale.dtype).unsqueeze(-1)
        w = w * scale.unsqueeze(-1)
        return w.flatten(start_dim=-2).to(dtype)

    def dequantize_int(self) -> torch.Tensor:
        """The integers q [N, K] (int8) before zero points and scales."""
        return UNPACK[self.bits](self.packed, self.shape[1])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequantized_linear(x)

    # ---- load-time rewriting (model/fuse.py) --------------------------------------------------------

    def same_scheme(self, other: object) -> bool:
        """Whether `other` stores its rows the same way (bits, K, groups, symmetry, scale dtype): then
        their rows concatenate into one weight."""
        return (
            isinstance(other, PackedWeight)
            and (self.bits, self.shape[1], self.scale.shape[1], self.scale.dtype, self.symmetric)
            == (other.bits, other.shape[1], other.scale.shape[1], other.scale.dtype, other.symmetric)
            and self.packed.shape[1] == other.packed.shape[1]
        )

    @staticmethod
    def cat_rows(parts: list[PackedWeight]) -> PackedWeight:
        """The parts' rows one after the other (all of the same scheme: `same_scheme`)."""
        first = parts[0]
        zero = None if first.zero is None else torch.cat([p.zero for p in parts])
        n = sum(p.shape[0] for p in parts)
        packed, scale = torch.cat([p.packed for p in parts]), torch.cat([p.scale for p in parts])
        return PackedWeight((n, first.shape[1]), first.bits, packed, scale, zero)

    def select_rows(self, index: torch.Tensor) -> PackedWeight:
        """Rows `index` (a permutation or a subset), in that order."""
        zero = None if self.zero is None else self.zero[index]
        return PackedWeight(
            (len(index), self.shape[1]), self.bits, self.packed[index], self.scale[index], zero
        )
