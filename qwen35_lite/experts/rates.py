"""The cost model for CPU and GPU together: on a CUDA run, is a decode step's GPU miss cheaper to copy
over PCIe or to compute in place by the CPU from its RAM slot?

Both rates are measured at load on this machine and this format (a CPU's speed on an expert depends on
its cores, threads, bf16 support and the format's kernel; the bus on its generation and lanes): the time
the CPU takes to run one token through one expert held in a RAM slot, and the time one slot takes to
reach the GPU from pinned memory. Computing in place wins when the first is shorter; the GPU slots then
fill in the background from the misses (TieredExperts.compute_in_place).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .cache import TieredExperts


@dataclass(frozen=True)
class ExpertRates:
    cpu_s: float  # one token through one expert, by the CPU from a RAM slot
    copy_s: float  # one expert's slot, pinned RAM -> GPU
    slot_nbytes: int

    @property
    def compute_in_place(self) -> bool:
        return self.cpu_s < self.copy_s

    def as_dict(self) -> dict:
        gb = self.slot_nbytes / 1e9
        return {
            "cpu_ms_per_expert": round(self.cpu_s * 1e3, 3),
            "copy_ms_per_expert": round(self.copy_s * 1e3, 3),
            "cpu_expert_gb_s": round(gb / self.cpu_s, 2) if self.cpu_s else None,
            "pcie_gb_s": round(gb / self.copy_s, 2) if self.copy_s else None,
            "gpu_misses_computed_by": "cpu" if self.compute_in_place else "copy to gpu",
        }


def _best(run: Callable[[], None], repeats: int) -> float:
    run()  # warm-up: kernel set-up, first touch
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return min(times)


def measure_rates(
    provider: TieredExperts,
    layer: int = 0,
    repeats: int = 5,
    sync: Callable[[], None] | None = None,
    gpu_scratch: torch.Tensor | None = None,
) -> ExpertRates:
    """Time one expert of `layer` computed by the CPU from a RAM slot and one slot copied to the GPU.
    sync: waits for the GPU (torch.cuda.synchronize by default; a test passes a stand-in); gpu_scratch:
    where the copy lands (a fresh GPU buffer of one slot by default, freed afterwards)."""
    sync = sync or torch.cuda.synchronize
    ram = provider.ram
    pool = ram.pools[layer]
    if not pool.where:  # nothing read into this layer's RAM tier yet (the GPU tier was filled through it)
        provider.get_ram(layer, [0])
    s = next(iter(pool.where.values()))  # any resident expert: they all cost the same
    x = torch.randn(1, provider.store.cfg.hidden_size).to(provider.dtype)
    stack = ram.stacks[layer]
    if stack is not None:
        slots = [s]
        cpu_s = _best(lambda: stack.rows(x, slots), repeats)
    else:
        expert = ram.experts[layer][s]
        cpu_s = _best(lambda: expert(x), repeats)
    dst = gpu_scratch if gpu_scratch is not None else torch.empty_like(pool.slots[s], device=provider.device)

    def copy() -> None:
        dst.copy_(pool.slots[s], non_blocking=True)
        sync()

    copy_s = _best(copy, repeats)
    return ExpertRates(cpu_s, copy_s, provider.slot_nbytes)
