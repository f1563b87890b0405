"""The MoE block: fp32-softmax router, top-k renormalised, routed experts from a provider, gated shared expert.

Routed experts are never held here: an ExpertProvider hands over the experts a layer needs as one
`Lookup` (experts/lookup.py), from wherever they live (the checkpoint, a RAM tier, a GPU tier, the CPU
computing a GPU miss) and in whatever format (dense, FP8, int4: experts.formats); the lookup runs them
and returns their weighted sum. This layer routes, asks, and adds the gated shared expert.
Legend: T = tokens, D = hidden, E = experts, A = experts per token, I = expert FFN width.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from ..experts.lookup import Lookup
from ..weights.config import TextConfig
from .layers import linear, swiglu


class ExpertProvider(Protocol):
    lookahead: bool  # True when the provider wants hints (the model computes them only then)

    def get(self, layer: int, experts: list[int], *, one_token: bool = False) -> Lookup:
        """The given experts of one layer, as a Lookup that runs them on the compute device (one_token:
        for a decode step, whose misses a provider may place after the hits are queued, or run on the
        CPU: tensors still go in and out on the compute device)."""
        ...

    def hint(self, layer: int, experts: list[int]) -> None:
        """Experts that will probably be asked for soon (prefetch); may be ignored."""
        ...

    def stats(self) -> dict:
        """Counters since load (bytes read, hits and misses per tier...)."""
        ...

    def static_slots(self, layer: int) -> Lookup | None:
        """The layer's experts as a static Lookup (one stack with a device-side slot map) when all of them
        stay resident (a decode step then needs no host read); None when they must come through `get`."""
        ...


def route(x: torch.Tensor, router_w: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, D] -> (weights [T, A] in x's dtype, expert ids [T, A]): the top-k of the fp32 softmax over
    all experts, renormalised, which is the softmax (fp32) over the top-k logits: the same ids (softmax
    keeps the order) and weights equal up to fp32 rounding, in three ops instead of six (`route_reference`
    is the reference's order)."""
    top, ids = torch.topk(linear(x, router_w), top_k, dim=-1)  # [T, A]
    return F.softmax(top, dim=-1, dtype=torch.float).to(x.dtype), ids


def route_reference(x: torch.Tensor, router_w: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' order: softmax over all E in fp32, top-k, divide by the top-k sum."""
    probs = F.softmax(linear(x, router_w), dim=-1, dtype=torch.float)  # [T, E]
    top, ids = torch.topk(probs, top_k, dim=-1)
    top = top / top.sum(dim=-1, keepdim=True)
    return top.to(x.dtype), ids


class MoE:
    def __init__(
        self, cfg: TextConfig, layer: int, w: dict[str, torch.Tensor], provider: ExpertProvider
    ) -> None:
        self.layer, self.top_k = layer, cfg.num_experts_per_tok
        self.inter = cfg.moe_intermediate_size  # the routed experts' FFN width
        self.w = w  # gate, shared_expert.{gate,up,down}_proj, shared_expert_gate
        self.provider = provider
        self.next_gate: torch.Tensor | None = None  # the next MoE layer's router (set by the model)

    def _local(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What needs no routed expert: (routing weights [T, A], expert ids [T, A], gated shared expert)."""
        w = self.w
        down = w["shared_expert.down_proj"]  # [D, Is]
        Is = down.shape[1]
        # fused at load (model/fuse.py): [gate | up | gate row], one matmul
        h = linear(x, w["shared_in_proj"])  # [T, 2·Is + 1]
        shared = linear(F.silu(h[:, :Is]) * h[:, Is : 2 * Is], down)
        weights, ids = route(x, w["gate"], self.top_k)
        return weights, ids, torch.sigmoid(h[:, 2 * Is :]) * shared

    def prefill(self, x: torch.Tensor, chunk: int) -> torch.Tensor:
        """A prefill block x [T, D]: its experts asked for once, each computed chunk by chunk
        (dispatch_grouped's `chunk`), the rest chunk by chunk too: the bits of `__call__` on each chunk."""
        local = [self._local(x[s : s + chunk]) for s in range(0, x.shape[0], chunk)]
        weights, ids, gated = (torch.cat(parts) for parts in zip(*local))
        return self._lookup(ids).run(x, weights, ids, chunk, self.inter) + gated

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids, gated = self._local(x)
        if x.shape[0] != 1:
            return self._lookup(ids).run(x, weights, ids, inter=self.inter) + gated
        return self._decode(x, weights, ids) + gated

    def _lookup(self, ids: torch.Tensor) -> Lookup:
        """The experts that tokens routed to ids [T, A] picked, asked for once."""
        return self.provider.get(self.layer, sorted(set(ids.reshape(-1).tolist())))

    def _decode(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """One token's routed experts: picked on the device when they all stay resident (no host read),
        else with one host read of the routing (and of the lookahead's, in the same read)."""
        static = self.provider.static_slots(self.layer)
        if static is not None:
            return static.run_one(x, weights, ids)
        hinting = self.next_gate is not None and self.provider.lookahead
        if hinting:
            # the next layer's router applied to this layer's input names the experts it will probably
            # pick; hinted now, they load while this layer and the next one's mixer compute
            _, next_ids = route(x, self.next_gate, self.top_k)
            picked = torch.cat([ids[0], next_ids[0]]).tolist()
            self.provider.hint(self.layer + 1, picked[self.top_k :])
        else:
            picked = ids[0].tolist()
        picked = picked[: self.top_k]
        return self.provider.get(self.layer, sorted(picked), one_token=True).run_one(x, weights, ids, picked)


class DenseMLP:
    """The dense Qwen3.5 family's plain SwiGLU MLP (gate and up fused at load: model/fuse.py)."""

    def __init__(self, w: dict[str, torch.Tensor]) -> None:
        self.w = w

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x, self.w["gate_up_proj"], self.w["down_proj"])

    def prefill(self, x: torch.Tensor, chunk: int) -> torch.Tensor:
        return torch.cat([self(x[s : s + chunk]) for s in range(0, x.shape[0], chunk)])
