"""How to load a model: the one options dataclass the command line, the server and the engine share.

Kept free of heavy imports (no torch): the command line builds its flags from these fields before anything
heavy is imported, so `--help` stays instant.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class EngineOptions:
    """How to load: device, dtype and the memory budgets the plan fits everything into."""

    device: str = "auto"
    dtype: str = "auto"
    offline: bool = False
    ctx: int | None = None  # --ctx: the context the KV cache is reserved for
    context: int | None = None  # without --ctx: the workload's context (bench), else the plan's rule
    gpu_mem: float | None = None  # GiB; None: free memory minus a margin
    cpu_mem: float | None = None
    gpu_experts: int | None = None  # slots per layer instead of what the budget fits
    cpu_experts: int | None = None
    cpu_threads: int | None = None  # torch.set_num_threads at load; None: torch's default
    # CUDA runs: a decode step's GPU misses computed by the CPU from RAM ("on"), copied to the GPU ("off"),
    # or whichever the rates measured at load favour ("auto": experts/rates.py)
    cpu_compute: str = "auto"
    # GiB for `serve`'s kept model states (state_cache.PrefixCache), on the compute device; None: a share
    # of what the budget leaves after the smallest expert cache (MemoryPlan._keep_states_from_what_is_left)
    state_cache: float | None = 0.0
    # the images of a `run` (() for a text run: nothing reserved for images, the tower never loaded);
    # None where images may come at any turn (chat, serve): MemoryPlan.build says what each reserves
    image_paths: tuple[Path, ...] | None = None
