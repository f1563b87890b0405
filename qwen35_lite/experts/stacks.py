"""A layer's expert slots run stacked: the slots of one buffer viewed as [S, ...] tensors without a copy,
and a decode step's top-k experts run by one gather and one batched matmul per projection (formats whose
slots hold quantised bytes gather those and dequantise them together). `ExpertFormat.stack` builds them.

Legend: S = slots, A = experts run (top-k), D = hidden, I = expert FFN width.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from . import int4

if TYPE_CHECKING:
    from .formats import Int4Format, Part


class StackedExperts:
    """All slots of one layer's buffer as stacked dense weights, views without a copy: gate_up [S, 2I, D],
    down [S, D, I]. Runs one token through the experts in given slots with one gather and one batched
    matmul per projection: a decode step's routed experts in a fixed handful of ops, whatever A, and with
    the slot indices on the device (no host read needed to pick them)."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        self._gate_up, self._down = gate_up, down

    def gate_up(self, slots: torch.Tensor) -> torch.Tensor:
        return self._gate_up.index_select(0, slots)  # [A, 2I, D]

    def down(self, slots: torch.Tensor) -> torch.Tensor:
        return self._down.index_select(0, slots)  # [A, D, I]

    def __call__(self, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """x [1, D], slots [A] (long, on x's device) -> the A experts' outputs [A, D], in `slots` order."""
        A = slots.shape[0]
        xs = x.expand(A, -1).unsqueeze(-1)  # [A, D, 1]
        h = torch.bmm(self.gate_up(slots).to(x.dtype), xs).squeeze(-1)  # [A, 2I]
        g, u = h.chunk(2, dim=-1)
        # the gathered gate_up is freed before down's is made: one of them at a time
        return torch.bmm(self.down(slots).to(x.dtype), (F.silu(g) * u).unsqueeze(-1)).squeeze(-1)


class _StackedDequantised(StackedExperts):
    """Slots holding a quantised format's raw parts, stacked: `_dense(i, slots)` gathers and dequantises
    matrix i (gate, up, down) of the given slots together; gate and up meet as one [A, 2I, D]."""

    def _dense(self, i: int, slots: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def gate_up(self, slots: torch.Tensor) -> torch.Tensor:
        return torch.cat([self._dense(0, slots), self._dense(1, slots)], dim=1)

    def down(self, slots: torch.Tensor) -> torch.Tensor:
        return self._dense(2, slots)


class StackedFp8(_StackedDequantised):
    """FP8 slots (weights + block scales) stacked: the A experts' FP8 bytes are gathered (a byte an
    element) and dequantised together, as `Fp8BlockFormat.dense` does one by one (w.float() * scale per
    block, fp32), then cast by the caller."""

    def __init__(self, parts: list[torch.Tensor], block: int) -> None:
        self.parts, self.block = parts, block  # gate, up, down weights; then their scales

    def _dense(self, i: int, slots: torch.Tensor) -> torch.Tensor:
        w, scale = self.parts[i].index_select(0, slots), self.parts[3 + i].index_select(0, slots)
        _, o, n = w.shape
        b = self.block
        full = scale.float().repeat_interleave(b, 1)[:, :o].repeat_interleave(b, 2)[:, :, :n]
        return w.float() * full  # [A, o, n]


class StackedInt4(_StackedDequantised):
    """Packed int4 slots (exact mode) stacked: the A experts' packed words, scales (and zero points)
    gathered and dequantised together by the same steps as one by one (experts.int4.dequantize_int4)."""

    def __init__(self, fmt: Int4Format, parts: list[torch.Tensor]) -> None:
        self.fmt, self.parts = fmt, parts  # packed gate, up, down; scales; zero points when asymmetric

    def _dense(self, i: int, slots: torch.Tensor) -> torch.Tensor:
        fmt = self.fmt
        pick = [p.index_select(0, slots) for p in self.parts[i::3]]  # packed, scale[, zero point]
        shape = fmt.mats[i]
        zp = pick[2] if len(pick) > 2 else None
        return int4.dequantize_int4(pick[0], pick[1], zp, fmt.scheme.group_size or shape[1], fmt.dtype, shape)


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
