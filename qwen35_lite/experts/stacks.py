"""A layer's expert slots run stacked: the slots of one buffer viewed as [S, ...] tensors without a copy,
and a decode step's top-k experts run by one gather and one batched matmul per projection (formats whose
slots hold quantised bytes gather those and dequantise them together). `ExpertFormat.stack` builds them;
the runners of quantised slots (`StackedDequantised` subclasses) live with their format (experts/formats/).

Legend: S = slots, A = experts run (top-k), D = hidden, I = expert FFN width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .layout import stack_parts

__all__ = ["StackedDequantised", "StackedExperts", "stack_parts"]


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


class StackedDequantised(StackedExperts):
    """Slots holding a quantised format's raw parts, stacked: `_dense(i, slots)` gathers and dequantises
    matrix i (gate, up, down) of the given slots together; gate and up meet as one [A, 2I, D]."""

    def _dense(self, i: int, slots: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def gate_up(self, slots: torch.Tensor) -> torch.Tensor:
        return torch.cat([self._dense(0, slots), self._dense(1, slots)], dim=1)

    def down(self, slots: torch.Tensor) -> torch.Tensor:
        return self._dense(2, slots)
