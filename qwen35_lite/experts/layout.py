"""Flat byte buffers holding several tensors: where each tensor sits (`Part`), how a format lays its parts
out (`pack_layout`), and every slot of a buffer viewed as stacked tensors (`stack_parts`).

A leaf: the formats, the stacked runners and the slot pools all build on it, and it imports none of them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

ALIGN = 64  # part offsets inside a buffer: every dtype view stays aligned


@dataclass(frozen=True)
class Part:
    """One tensor at a byte offset of a flat uint8 buffer."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def view(self, buf: torch.Tensor) -> torch.Tensor:
        return buf[self.offset : self.offset + self.nbytes].view(self.dtype).view(self.shape)


def pack_layout(specs: Sequence[tuple[torch.dtype, tuple[int, ...]]]) -> tuple[list[Part], int]:
    """Parts back to back while the dtype stays the same (so gate and up form one [2I, D] view), aligned
    where it changes. Returns (parts, total bytes)."""
    parts, pos, dtype = [], 0, specs[0][0]
    for dt, shape in specs:
        if dt != dtype:
            pos = -(-pos // ALIGN) * ALIGN
            dtype = dt
        parts.append(Part(dt, tuple(shape), pos))
        pos += parts[-1].nbytes
    return parts, pos


def stack_parts(parts: Sequence[Part], buffer: torch.Tensor, n_slots: int, stride: int) -> list[torch.Tensor]:
    """Each part of every slot of a flat buffer (slot s at byte s * stride) as one [n_slots, *shape] view."""
    views = []
    for p in parts:
        size = p.dtype.itemsize
        if stride % size or p.offset % size:
            raise ValueError(f"slot stride {stride} / offset {p.offset} not aligned to {p.dtype}")
        inner = [math.prod(p.shape[i + 1 :]) for i in range(len(p.shape))]  # contiguous strides
        base = buffer[: n_slots * stride].view(p.dtype)
        views.append(base.as_strided((n_slots, *p.shape), (stride // size, *inner), p.offset // size))
    return views
