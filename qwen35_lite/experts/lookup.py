"""What an expert provider's `get` hands out: one `Lookup`, a layer's routed experts for one call in two
steps. The experts ready to run now (a mapping of callables, with the layer's stack and their slots in
it when the format runs stacked); and, on a decode step of a CUDA run, the GPU's misses, which
`place_misses` puts in GPU slots or leaves in RAM slots for the CPU (`OnCpu`) once the hits' compute is
queued, so their disk reads and copies overlap it. The lookup runs its experts (`run`: several tokens,
`run_one`: a decode step) and returns their weighted sum; the MoE layer only routes and adds the shared
expert. A layer whose experts all stay resident is one static lookup, its slots picked on the device.

Legend: T = tokens, D = hidden, A = experts per token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch

from .dispatch import dispatch_decode, dispatch_grouped, dispatch_stacked, stacked_rows, weighted_sum
from .formats import Expert
from .stacks import StackedExperts


class OnCpu:
    """An expert in a RAM slot run by the CPU for a caller on another device: x there -> CPU -> back."""

    def __init__(self, expert: Expert) -> None:
        self.expert = expert

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.expert(x.to("cpu")).to(x.device)


@dataclass
class Placed:
    """Where `place_misses` put a lookup's misses: GPU slots of the lookup's stack (`slot`), or RAM slots
    the CPU runs from `cpu_stack` (`cpu_slot`); `experts` are their callables either way."""

    experts: dict[int, Expert]
    slot: dict[int, int] = field(default_factory=dict)
    cpu_slot: dict[int, int] = field(default_factory=dict)
    cpu_stack: StackedExperts | None = None


class Streamed(Mapping):
    """Lazy {expert: weights} for a call that needs more experts than the layer has slots: each lookup
    brings the expert in through `fetch(e, self)` (the provider's, given at construction), and its
    weights stay valid until the next lookup. `loaded_here`: experts this call read ahead (already
    counted as misses)."""

    def __init__(self, need: list[int], fetch: Callable[[int, Streamed], Expert]) -> None:
        self.need, self._fetch = need, fetch
        self.pos = {e: i for i, e in enumerate(need)}
        self.loaded_here: set[int] = set()

    def __getitem__(self, e: int) -> Expert:
        if e not in self.pos:
            raise KeyError(e)
        return self._fetch(e, self)

    def __iter__(self) -> Iterator[int]:
        return iter(self.need)

    def __len__(self) -> int:
        return len(self.need)

    def __contains__(self, e: object) -> bool:
        return e in self.pos


class Lookup(Mapping):
    """One `get`: {expert: callable} of the experts ready to run, the layer's StackedExperts (None when
    the format runs experts one by one) and each ready expert's slot in it.

    `misses` (a decode step's GPU misses on a CUDA run) are not placed yet: `place_misses()` places them
    by the provider's `place` (given at construction) and adds them; `misses_on_cpu` says beforehand that
    they will stay in RAM slots for the CPU. A static lookup (`static`) holds a layer whose every expert
    stays resident: its expert -> slot map `slot_of` is a tensor on the compute device (None: expert e
    in slot e), so a decode step picks its slots there, with no host read."""

    def __init__(
        self,
        experts: Mapping[int, Expert],
        stack: StackedExperts | None = None,
        slot: dict[int, int] | None = None,
        *,
        misses: list[int] | None = None,
        place: Callable[[], Placed] | None = None,
        misses_on_cpu: bool = False,
        static: bool = False,
        slot_of: torch.Tensor | None = None,
    ) -> None:
        if misses and place is None:
            raise ValueError("misses need a `place` to place them")
        self._experts, self.stack, self.slot = experts, stack, dict(slot or {})
        self.misses, self._place, self.misses_on_cpu = list(misses or []), place, misses_on_cpu
        self.cpu_slot: dict[int, int] = {}  # after place_misses: the misses the CPU runs, expert -> RAM slot
        self.cpu_stack: StackedExperts | None = None
        self.static, self._slot_of = static, slot_of

    def __getitem__(self, e: int) -> Expert:
        return self._experts[e]

    def __iter__(self) -> Iterator[int]:
        return iter(self._experts)

    def __len__(self) -> int:
        return len(self._experts)

    def __contains__(self, e: object) -> bool:
        return e in self._experts

    def place_misses(self) -> Placed:
        """Place the misses (disk read, copy to the GPU, or RAM slots for the CPU) and add them; what was
        placed (nothing once placed)."""
        if not self.misses:
            return Placed({})
        placed = self._place()
        self._experts = {**self._experts, **placed.experts}
        self.slot.update(placed.slot)
        self.cpu_slot, self.cpu_stack = placed.cpu_slot, placed.cpu_stack
        self.misses = []
        return placed

    def run(
        self,
        x: torch.Tensor,
        weights: torch.Tensor,
        ids: torch.Tensor,
        chunk: int | None = None,
        inter: int | None = None,
    ) -> torch.Tensor:
        """Several tokens x [T, D] (weights, ids [T, A]): each expert once on its rows -> [T, D]; inter:
        the experts' FFN width (small experts then run on one thread: dispatch_grouped)."""
        self.place_misses()
        return dispatch_grouped(x, weights, ids, self, chunk, inter)

    def run_one(
        self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, picked: list[int] | None = None
    ) -> torch.Tensor:
        """One token x [1, D] (decode) -> [1, D]. picked: ids[0] read back to the host (None for a
        static lookup, which picks its slots on the device)."""
        if self.stack is None:  # a format run one by one: place everything first
            self.place_misses()
            return dispatch_decode(x, weights, ids, self)
        if self.static:
            slots = ids[0] if self._slot_of is None else self._slot_of[ids[0]]
            return dispatch_stacked(x, weights, slots, self.stack)
        if picked is None:
            raise ValueError("a lookup that is not static needs the routing read back (picked)")
        if self.misses:
            return self._run_split(x, weights, picked)
        return weighted_sum(self.stack.rows(x, [self.slot[e] for e in picked]), weights)

    def _run_split(self, x: torch.Tensor, weights: torch.Tensor, picked: list[int]) -> torch.Tensor:
        """The hits' rows are queued first; `place_misses` then reads and copies the misses (overlapping
        that compute), or leaves them in RAM slots for the CPU to compute meanwhile. The rows meet in
        slot order for one weighting and reduction, so the sum's order never depends on which side
        finished first."""
        # before the hits are queued: the routing was just read back, so x is ready and this copy waits for
        # nothing; after them it would wait for their compute, which the CPU's share is meant to overlap
        x_host = x.to("cpu") if self.misses_on_cpu else None
        out = torch.empty(len(picked), x.shape[-1], dtype=x.dtype, device=x.device)  # [A, D], slot order
        stacked_rows(out, x, picked, self.slot, self.stack)  # queued: runs while the rest is placed
        placed = self.place_misses()
        stacked_rows(out, x, picked, placed.slot, self.stack)
        if placed.cpu_slot:
            rows = [a for a, e in enumerate(picked) if e in placed.cpu_slot]
            ram_slots = [placed.cpu_slot[picked[a]] for a in rows]
            out[rows] = placed.cpu_stack.rows(x_host, ram_slots).to(x.device)
        return weighted_sum(out, weights)
