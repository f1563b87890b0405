"""A layer's expert slots run stacked: the slots of one buffer viewed as [S, ...] tensors without a copy,
and a decode step's top-k experts run in a fixed handful of ops whatever the routing.

- `StackedExperts` (dense slots): on a bf16 CPU with AVX512-BF16 one C kernel call per projection over
  the routed slots where they are (`kernel`: kernels/dense_cpu.py); otherwise on the CPU one grouped
  matmul per projection over the whole stack (`torch._grouped_mm`, the routed slots' rows grouped by
  slot: no copy of any weight) where it pays; elsewhere the top-k gathered and run by one batched matmul
  (`gathered`, also the reference).
- `StackedKernel` (slots a CPU kernel runs one matrix at a time: int4, int8): the experts run one by
  one from their slot views (`rows`, when the slots are on the host already) or, with the slots given
  on the device, each expert's slot copied out first (no host read).
- `StackedDequantised` (slots holding a quantised format's raw parts): gathered and dequantised together;
  its subclasses live with their format (experts/formats/).

Legend: S = slots, A = experts run (top-k), D = hidden, I = expert FFN width.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ..kernels import dense_cpu
from .layout import stack_parts

__all__ = ["StackedDequantised", "StackedExperts", "StackedKernel", "one_row_by", "stack_parts"]

GROUPED_MM = hasattr(torch, "_grouped_mm")
GROUP_COST_BYTES = (
    64 << 10
)  # a gather copying this much costs about what the grouped matmul spends on a group


def grouped_ffn(
    x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, slots: torch.Tensor
) -> torch.Tensor:
    """x [1, D] through the experts in `slots` [A] (distinct) of the stacks gate_up [S, 2I, D] and down
    [S, D, I] -> [A, D] in `slots` order, by one grouped matmul per projection over the whole stack: a
    slot's row group is the one row routed to it (empty for the others), so no weight is copied and no
    value read back."""
    A = slots.shape[0]
    order = torch.argsort(slots)  # rows grouped by ascending slot, as the offsets count them
    offs = torch.bincount(slots, minlength=gate_up.shape[0]).cumsum(0).to(torch.int32)  # [S] row ends
    h = torch._grouped_mm(x.expand(A, -1).contiguous(), gate_up.transpose(1, 2), offs=offs)  # [A, 2I]
    g, u = h.chunk(2, dim=-1)
    y = torch._grouped_mm(F.silu(g) * u, down.transpose(1, 2), offs=offs)  # [A, D], ascending slots
    return torch.empty_like(y).index_copy_(0, order, y)


class StackedExperts:
    """All slots of one layer's buffer as stacked dense weights, views without a copy: gate_up [S, 2I, D],
    down [S, D, I]. Runs one token through the experts in given slots (on x's device: no host read needed
    to pick them) in a fixed handful of ops, whatever A."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        self._gate_up, self._down = gate_up, down

    def gate_up(self, slots: torch.Tensor) -> torch.Tensor:
        return self._gate_up.index_select(0, slots)  # [A, 2I, D]

    def down(self, slots: torch.Tensor) -> torch.Tensor:
        return self._down.index_select(0, slots)  # [A, D, I]

    def __call__(self, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """x [1, D], slots [A] (long, on x's device, distinct) -> the A experts' outputs [A, D], in `slots`
        order."""
        if x.device.type == "cpu" and dense_cpu.stacked_usable(self._gate_up, x):
            return self.kernel(x, slots)
        if self._grouped_pays(slots.shape[0]) and x.device.type == "cpu" and self._gate_up.dtype == x.dtype:
            return grouped_ffn(x, self._gate_up, self._down, slots)
        return self.gathered(x, slots)

    def kernel(self, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """`__call__` on a bf16 CPU by dense_cpu's kernel: each projection one call over the A slots where
        they are (no weight copied), each row summed as a bound expert's one-row `linear` sums it, so a
        step's arithmetic does not depend on where its experts sit."""
        h = dense_cpu.bf16_stacked(self._gate_up, slots, x[0])  # [A, 2I]
        g, u = h.chunk(2, dim=-1)
        return dense_cpu.bf16_stacked(self._down, slots, F.silu(g) * u)  # [A, D]

    def _grouped_pays(self, A: int) -> bool:
        """torch's CPU grouped matmul visits every group (a few µs each, routed or not): it pays where
        the A experts' weights that a gather would copy outweigh GROUP_COST_BYTES per slot (the 397B's
        25 MiB bf16 experts, not the e512 bench's 384 KiB ones, measured in bench/bench_kernels.py)."""
        S = self._gate_up.shape[0]
        expert = (self._gate_up[0].numel() + self._down[0].numel()) * self._gate_up.element_size()
        return GROUPED_MM and A * expert >= S * GROUP_COST_BYTES

    def gathered(self, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """`__call__` by a gather of the A experts' weights and one batched matmul per projection: the
        path off the CPU, and the reference of the grouped one."""
        A = slots.shape[0]
        xs = x.expand(A, -1).unsqueeze(-1)  # [A, D, 1]
        h = torch.bmm(self.gate_up(slots).to(x.dtype), xs).squeeze(-1)  # [A, 2I]
        g, u = h.chunk(2, dim=-1)
        # the gathered gate_up is freed before down's is made: one of them at a time
        return torch.bmm(self.down(slots).to(x.dtype), (F.silu(g) * u).unsqueeze(-1)).squeeze(-1)

    def rows(self, x: torch.Tensor, slots: Sequence[int]) -> torch.Tensor:
        """`__call__` for slots already on the host (a lookup that read the routing back)."""
        return self(x, torch.tensor(list(slots), device=x.device))


class StackedDequantised(StackedExperts):
    """Slots holding a quantised format's raw parts, stacked: `_dense(i, slots)` gathers and dequantises
    matrix i (gate, up, down) of the given slots together; gate and up meet as one [A, 2I, D]."""

    def _dense(self, i: int, slots: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def gate_up(self, slots: torch.Tensor) -> torch.Tensor:
        return torch.cat([self._dense(0, slots), self._dense(1, slots)], dim=1)

    def down(self, slots: torch.Tensor) -> torch.Tensor:
        return self._dense(2, slots)

    def __call__(self, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        return self.gathered(x, slots)


KernelFfn = Callable[..., torch.Tensor]  # (x [1, D], *one slot's parts) -> [1, D]


class StackedKernel(StackedExperts):
    """Slots whose experts a CPU kernel runs one matrix at a time (int4, int8): `parts` [S, ...] are the
    slot layout's parts, views of the buffer; `ffn(x, *parts of one slot)` runs one expert. The kernel
    takes no stack, so the experts run one after another, each from its own slot."""

    def __init__(self, parts: list[torch.Tensor], ffn: KernelFfn) -> None:
        self.parts, self.ffn = parts, ffn

    def __call__(self, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Slots on the device: each expert's slot is copied out (index_select of one slot, the kernel
        then reads the copy) instead of reading its number back to the host."""
        picks = [slots[a : a + 1] for a in range(slots.shape[0])]  # views, no read
        return torch.cat([self.ffn(x, *(p.index_select(0, s)[0] for p in self.parts)) for s in picks])

    def rows(self, x: torch.Tensor, slots: Sequence[int]) -> torch.Tensor:
        """Slots on the host: each expert straight from its slot's views, no copy."""
        return torch.cat([self.ffn(x, *(p[s] for p in self.parts)) for s in slots])


def one_row_by(stack: Callable, expert: Callable) -> Callable:
    """One expert bound alone (the uncached provider, a prefill's experts) that runs a single row as
    `stack` runs its slot 0 and more rows as `expert`: a decode step then does the same arithmetic
    whether the expert sat in a cache slot (run by the layer's stack) or was read for this step alone,
    so where an expert lives never changes the tokens (a C kernel's fp32 sums differ from torch's)."""
    zero = torch.zeros(1, dtype=torch.int64)

    def run(x: torch.Tensor) -> torch.Tensor:
        return stack(x, zero) if x.shape[0] == 1 else expert(x)

    return run
