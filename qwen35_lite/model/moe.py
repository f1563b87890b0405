"""The MoE block: fp32-softmax router, top-k renormalised, routed experts from a provider, gated shared expert.

Routed experts are never held here: an ExpertProvider hands over the experts a layer needs as callables
(x [T, D] -> y [T, D]), from wherever they live (the checkpoint, a RAM tier, a GPU tier) and in whatever
format (dense, FP8, int4: experts.formats).
Legend: T = tokens, D = hidden, E = experts, A = experts per token, I = expert FFN width.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import torch
import torch.nn.functional as F

from ..config import TextConfig
from ..experts.formats import Expert, ffn
from ..experts.lookup import Acquired, StaticSlots
from ..experts.stacks import StackedExperts
from .layers import linear


class ExpertProvider(Protocol):
    lookahead: bool  # True when the provider wants hints (the model computes them only then)

    def get(self, layer: int, experts: list[int], *, one_token: bool = False) -> Mapping[int, Expert]:
        """The given experts of one layer, ready to run on the compute device (one_token: for a decode
        step, whose experts a provider may also run elsewhere: callables still take and give tensors on
        the compute device)."""
        ...

    def hint(self, layer: int, experts: list[int]) -> None:
        """Experts that will probably be asked for soon (prefetch); may be ignored."""
        ...

    def stats(self) -> dict:
        """Counters since load (bytes read, hits and misses per tier...)."""
        ...

    def static_slots(self, layer: int) -> StaticSlots | None:
        """The layer's experts as one stack with a device-side slot map, when all of them stay resident
        (a decode step then needs no host read); None when experts must be looked up through `get`."""
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


def dispatch_reference(x, weights, ids, experts: Mapping[int, Expert]) -> torch.Tensor:
    """One token and one slot at a time: the obvious version, kept to test `dispatch_grouped` against."""
    T, A = ids.shape
    out = torch.empty(T, A, x.shape[-1], dtype=x.dtype, device=x.device)
    for t in range(T):
        for a in range(A):
            out[t, a] = experts[int(ids[t, a])](x[t : t + 1])[0] * weights[t, a]
    return out.sum(dim=1)


def dispatch_grouped(
    x, weights, ids, experts: Mapping[int, Expert], chunk: int | None = None
) -> torch.Tensor:
    """Each expert runs once on all the tokens that picked it (in token order); its outputs land in their
    (token, slot) place, are weighted in place, and the slots are summed in one reduction.

    chunk: a prefill block's experts still run once each, in ascending order (a streamed lookup reads
    each once), but on the tokens of one `chunk`-token span at a time: the same rows, so the same bits,
    as calling this chunk by chunk, whatever the block's size (a matmul's rounding can depend on its row
    count). Memory: one [T, A, D] buffer besides one expert's rows at a time."""
    T, A = ids.shape
    flat = ids.reshape(-1)  # [T·A]
    order = torch.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert, in token order
    counts = torch.bincount(flat[order]).tolist()
    out = torch.empty(T * A, x.shape[-1], dtype=x.dtype, device=x.device)  # [T·A, D], (token, slot) order
    start = 0
    for e, n in enumerate(counts):
        if n:
            pairs = order[start : start + n]
            for group in _by_span(pairs, A * (chunk or T)):
                out[group] = experts[e](x[group // A])
            start += n
    out.mul_(weights.reshape(-1, 1))
    return out.view(T, A, -1).sum(dim=1)  # bf16 sum accumulates in fp32, rounds once


def _by_span(pairs: torch.Tensor, span: int) -> list[torch.Tensor]:
    """Ascending pair indices split where they cross a multiple of `span`."""
    spans = pairs // span
    if bool(spans[0] == spans[-1]):
        return [pairs]
    return list(torch.split(pairs, torch.unique_consecutive(spans, return_counts=True)[1].tolist()))


def dispatch_stacked(x, weights, slots: torch.Tensor, stack: StackedExperts) -> torch.Tensor:
    """One token (decode) through the experts in `slots` [A] of a layer's stack: one gather and one
    batched matmul per projection, then `dispatch_decode`'s weighting and reduction (same shapes, so the
    same reduction order); the slots may come from a device-side map (no host read)."""
    A = slots.shape[0]
    out = stack(x, slots) * weights.reshape(-1)[:, None]  # [A, D]
    return out.view(1, A, -1).sum(dim=1)


def dispatch_split(x, weights, picked: list[int], experts: Acquired) -> torch.Tensor:
    """One token whose experts are partly still to be placed (experts.late: GPU misses): the GPU's hits
    are queued first; `experts.finish()` then reads and copies the misses (overlapping that compute), or
    leaves them in RAM slots for the CPU to compute meanwhile (experts.cpu_slot). The rows meet in slot
    order for `dispatch_stacked`'s weighting and reduction, so the sum's order never depends on which
    side finished first."""
    A = len(picked)
    # before the hits are queued: the routing was just read back, so x is ready and this copy waits for
    # nothing; after them it would wait for their compute, which the CPU's share is meant to overlap
    x_host = x.to("cpu") if experts.late_on_cpu else None
    out = torch.empty(A, x.shape[-1], dtype=x.dtype, device=x.device)  # [A, D], slot order
    _stacked_rows(out, x, picked, experts.slot, experts.stack)  # queued: runs while the rest is placed
    done = set(experts.slot)
    experts.finish()
    late_on_gpu = {e: s for e, s in experts.slot.items() if e not in done}
    _stacked_rows(out, x, picked, late_on_gpu, experts.stack)
    if experts.cpu_slot:
        rows = [a for a, e in enumerate(picked) if e in experts.cpu_slot]
        ram_slots = torch.tensor([experts.cpu_slot[picked[a]] for a in rows])
        out[rows] = experts.cpu_stack(x_host, ram_slots).to(x.device)
    out = out * weights.reshape(-1)[:, None]
    return out.view(1, A, -1).sum(dim=1)


def _stacked_rows(out, x, picked: list[int], slot: dict[int, int], stack: StackedExperts) -> None:
    """out[a] = expert picked[a](x) for the picked experts in `slot`, as one stacked call."""
    rows = [a for a, e in enumerate(picked) if e in slot]
    if rows:
        slots = torch.tensor([slot[picked[a]] for a in rows], device=x.device)
        out[rows] = stack(x, slots)


def dispatch_decode(x, weights, ids, experts: Mapping[int, Expert]) -> torch.Tensor:
    """One token (decode): `dispatch_grouped` without the sort, gather and scatter; same ops per row and
    the same final reduction, so the same bits (tests/test_kernels.py). Experts are looked up in
    ascending order, as a streamed lookup (experts.cache._Streamed) prefers."""
    A = ids.shape[1]
    out = torch.empty(A, x.shape[-1], dtype=x.dtype, device=x.device)  # [A, D], slot order
    for a, e in sorted(enumerate(ids[0].tolist()), key=lambda ae: ae[1]):
        out[a] = experts[e](x)[0]
    out = out * weights.reshape(-1)[:, None]
    return out.view(1, A, -1).sum(dim=1)


class MoE:
    def __init__(
        self, cfg: TextConfig, layer: int, w: dict[str, torch.Tensor], provider: ExpertProvider
    ) -> None:
        self.layer, self.top_k = layer, cfg.num_experts_per_tok
        self.w = w  # gate, shared_expert.{gate,up,down}_proj, shared_expert_gate
        self.provider = provider
        self.next_gate: torch.Tensor | None = None  # the next MoE layer's router (set by the model)
        self.last_ids: torch.Tensor | None = None  # routing of the last call, for stats and prefetch recall

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
        self.last_ids = ids
        experts = self.provider.get(self.layer, sorted(set(ids.reshape(-1).tolist())))
        return dispatch_grouped(x, weights, ids, experts, chunk) + gated

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids, gated = self._local(x)
        self.last_ids = ids
        if x.shape[0] != 1:
            experts = self.provider.get(self.layer, sorted(set(ids.reshape(-1).tolist())))
            return dispatch_grouped(x, weights, ids, experts) + gated
        return self._decode(x, weights, ids) + gated

    def _decode(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """One token's routed experts: picked on the device when they all stay resident (no host read),
        else with one host read of the routing (and of the lookahead's, in the same read)."""
        static = self.provider.static_slots(self.layer)
        if static is not None:
            return dispatch_stacked(x, weights, static.slots(ids[0]), static.stack)
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
        experts = self.provider.get(self.layer, sorted(picked), one_token=True)
        if getattr(experts, "stack", None) is None:  # a format run one by one: place everything first
            getattr(experts, "finish", lambda: None)()
            return dispatch_decode(x, weights, ids, experts)
        if experts.late:
            return dispatch_split(x, weights, picked, experts)
        slots = torch.tensor([experts.slot[e] for e in picked], device=x.device)
        return dispatch_stacked(x, weights, slots, experts.stack)


class DenseMLP:
    """The dense Qwen3.5 family's plain SwiGLU MLP (gate and up fused at load: model/fuse.py)."""

    def __init__(self, w: dict[str, torch.Tensor]) -> None:
        self.w = w

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return ffn(x, self.w["gate_up_proj"], self.w["down_proj"], linear)

    def prefill(self, x: torch.Tensor, chunk: int) -> torch.Tensor:
        return torch.cat([self(x[s : s + chunk]) for s in range(0, x.shape[0], chunk)])
