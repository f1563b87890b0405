"""Running one layer's routed experts over tokens: grouped by expert (a prefill block), stacked over a
layer's slot buffer (a decode step), and one token and one expert at a time (the references the others
are tested against). Each returns the weighted sum over a token's experts [T, D].

Legend: T = tokens, D = hidden, A = experts per token.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .formats import Expert
from .stacks import StackedExperts


def dispatch_reference(x, weights, ids, experts: Mapping[int, Expert]) -> torch.Tensor:
    """One token and one slot at a time: the obvious version, kept to test `dispatch_grouped` against."""
    T, A = ids.shape
    out = torch.empty(T, A, x.shape[-1], dtype=x.dtype, device=x.device)
    for t in range(T):
        for a in range(A):
            out[t, a] = experts[int(ids[t, a])](x[t : t + 1])[0] * weights[t, a]
    return out.sum(dim=1)


# On a busy machine an expert whose rows cost fewer multiply-adds than this runs on one thread (~a
# millisecond of one core): beside other processes each of its small regions waits for a time slice (a
# 512-token prefill of the llama.cpp bench model, 512 experts of width 128, beside one busy process: 35
# tok/s on 2 threads, 72 with them on one). On a quiet one the second thread pays (312 -> 408 tok/s), so
# it is off unless the runtime's thread tuner found the machine busy (`small_experts_on_one_thread`).
ONE_THREAD_MACS = 1 << 25
_one_thread = False  # set by small_experts_on_one_thread


def small_experts_on_one_thread(on: bool) -> None:
    """Whether a prefill runs its small experts (ONE_THREAD_MACS) on one thread: for a busy machine."""
    global _one_thread
    _one_thread = on


def dispatch_grouped(
    x, weights, ids, experts: Mapping[int, Expert], chunk: int | None = None, inter: int | None = None
) -> torch.Tensor:
    """Each expert runs once on all the tokens that picked it (in token order); its outputs land in their
    (token, slot) place, are weighted in place, and the slots are summed in one reduction.

    chunk: a prefill block's experts still run once each, in ascending order (a streamed lookup reads
    each once), but on the tokens of one `chunk`-token span at a time: the same rows, so the same bits,
    as calling this chunk by chunk, whatever the block's size (a matmul's rounding can depend on its row
    count). Memory: one [T, A, D] buffer besides one expert's rows at a time. inter: the experts' FFN
    width, when known on a CPU: on a busy machine an expert with little work runs on one thread
    (ONE_THREAD_MACS)."""
    T, A = ids.shape
    D = x.shape[-1]
    flat = ids.reshape(-1)  # [T·A]
    order = torch.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert, in token order
    counts = torch.bincount(flat[order]).tolist()
    out = torch.empty(T * A, D, dtype=x.dtype, device=x.device)  # [T·A, D], (token, slot) order
    threads = torch.get_num_threads()
    busy = _one_thread and inter and x.device.type == "cpu" and threads > 1
    small = ONE_THREAD_MACS // (3 * D * inter) if busy else 0
    start = 0
    try:
        for e, n in enumerate(counts):
            if n:
                torch.set_num_threads(1 if n < small else threads)
                pairs = order[start : start + n]
                for group in _by_span(pairs, A * (chunk or T)):
                    out[group] = experts[e](x[group // A])
                start += n
    finally:
        torch.set_num_threads(threads)
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
    return weighted_sum(stack(x, slots), weights)


def weighted_sum(out: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """One token's expert outputs out [A, D] (slot order) weighted and summed in one reduction -> [1, D]."""
    A = out.shape[0]
    out = out * weights.reshape(-1)[:, None]
    return out.view(1, A, -1).sum(dim=1)


def stacked_rows(out, x, picked: list[int], slot: dict[int, int], stack: StackedExperts) -> None:
    """out[a] = expert picked[a](x) for the picked experts in `slot`, as one stacked call."""
    rows = [a for a, e in enumerate(picked) if e in slot]
    if rows:
        out[rows] = stack.rows(x, [slot[picked[a]] for a in rows])


def dispatch_decode(x, weights, ids, experts: Mapping[int, Expert]) -> torch.Tensor:
    """One token (decode): `dispatch_grouped` without the sort, gather and scatter; same ops per row and
    the same final reduction, so the same bits (tests/experts/test_dispatch.py). Experts are looked up in
    ascending order, as a streamed lookup (experts.lookup.Streamed) prefers."""
    A = ids.shape[1]
    out = torch.empty(A, x.shape[-1], dtype=x.dtype, device=x.device)  # [A, D], slot order
    for a, e in sorted(enumerate(ids[0].tolist()), key=lambda ae: ae[1]):
        out[a] = experts[e](x)[0]
    return weighted_sum(out, weights)
