"""What an expert provider's lookup hands out: the experts as callables with the layer's stack and their
slots (`Acquired`), an expert the CPU runs for a caller on the GPU (`OnCpu`), and a layer whose experts
all stay resident, looked up on the device (`StaticSlots`)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .formats import Expert
from .stacks import StackedExperts


class Acquired(dict):
    """{expert: callable} of one `get`, plus what runs them grouped: the layer's StackedExperts (None when
    the format runs experts one by one) and each expert's slot in it. A decode step on a CUDA run gets
    its GPU misses `late`: placed by `finish()` (called once the hits' compute is queued), in GPU slots or,
    when the CPU computes them in place, in RAM slots (`cpu_slot`: expert -> RAM slot, run by the CPU
    from `cpu_stack`); their callables take and return tensors on the compute device."""

    def __init__(
        self,
        experts: dict[int, Expert],
        stack: StackedExperts | None,
        slot: dict[int, int],
        cpu_slot: dict[int, int] | None = None,
        cpu_stack: StackedExperts | None = None,
    ) -> None:
        super().__init__(experts)
        self.stack, self.slot = stack, slot
        self.cpu_slot, self.cpu_stack = cpu_slot or {}, cpu_stack
        self.late: list[int] = []  # experts not placed yet: `finish()` places them (in `slot` or `cpu_slot`)
        self.late_on_cpu = False  # `finish()` leaves the late ones to the CPU (compute_in_place)
        self.finish: Callable[[], None] = lambda: None


class OnCpu:
    """An expert in a RAM slot run by the CPU for a caller on another device: x there -> CPU -> back."""

    def __init__(self, expert: Expert) -> None:
        self.expert = expert

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.expert(x.to("cpu")).to(x.device)


class StaticSlots:
    """A layer whose compute tier holds every expert: the stack and the expert -> slot map [E] as a tensor
    on the compute device, so a decode step picks its slots there, with no host read."""

    def __init__(self, stack: StackedExperts, slot_of: torch.Tensor | None) -> None:
        self.stack, self.slot_of = stack, slot_of  # None: expert e sits in slot e (a preload's order)

    def slots(self, ids: torch.Tensor) -> torch.Tensor:
        """The slots of expert ids [A] (on the compute device)."""
        return ids if self.slot_of is None else self.slot_of[ids]
