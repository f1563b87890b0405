"""Kernel-format expert slots for the tests: a RAM tier whose slots are prepared from random raw bytes, as
a cache fill prepares them."""

from __future__ import annotations

import torch

from qwen35_lite.experts.slots import SlotTier


def kernel_tier(fmt, E: int, seed: int, div: float = 64, floor: float = 1e-3):
    """(a RAM tier of E kernel slots of `fmt`, the generator, each slot's raw bytes): packed words
    random, scales uniform in [floor, floor + 1 / div)."""
    tier = SlotTier("ram", fmt, 1, E, lambda: None, lambda n: torch.empty(n, dtype=torch.uint8))
    g = torch.Generator().manual_seed(seed)
    raws = []
    for s in range(E):
        raw = torch.empty(fmt.raw_nbytes, dtype=torch.uint8)
        for part, view in zip(fmt.raw, fmt.raw_views(raw)):
            if part.dtype == torch.int32:
                view.copy_(torch.randint(-(2**31), 2**31 - 1, part.shape, generator=g, dtype=torch.int64))
            else:
                view.copy_(torch.rand(part.shape, generator=g) / div + floor)
        fmt.prepare(fmt.raw_views(raw), tier.pools[0].slots[s])
        raws.append(raw)
    return tier, g, raws
