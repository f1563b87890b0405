"""Expert providers: hand the MoE layers the routed experts they ask for.

`UncachedExperts` reads every requested expert from the checkpoint each time (the page cache is the
only cache): the simplest correct provider, used as the reference for the tiered caches.
"""

from __future__ import annotations

import torch

from .expert_store import ExpertStore
from .moe import ExpertWeights


class UncachedExperts:
    def __init__(self, store: ExpertStore, device: torch.device, dtype: torch.dtype) -> None:
        self.store, self.device, self.dtype = store, device, dtype
        self.bytes_read = 0

    def get(self, layer: int, experts: list[int]) -> dict[int, ExpertWeights]:
        out = {}
        for e in experts:
            gate_up, down = self.store.read(layer, e, self.dtype)
            self.bytes_read += self.store.expert_nbytes
            out[e] = (gate_up.to(self.device), down.to(self.device))
        return out

    def hint(self, layer: int, experts: list[int]) -> None:
        pass
