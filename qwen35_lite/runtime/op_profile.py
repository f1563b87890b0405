"""What a decode step costs the host, counted (not timed), so it can be tracked on a CPU-only machine too:
kernel-launching ops (torch.profiler's leaf aten ops, views and allocations aside) and host reads of device
values (`.item()`, `.tolist()`, `int(t)`: each a host sync on a GPU), per token and per layer."""

from __future__ import annotations

import os
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.profiler import ProfilerActivity, profile

from ..model.qwen35 import Qwen35Model

# Ops that only describe memory (views, metadata) or allocate: no kernel runs for them.
NOT_KERNELS = {
    "aten::view", "aten::reshape", "aten::_reshape_alias", "aten::_unsafe_view", "aten::as_strided",
    "aten::slice", "aten::select", "aten::expand", "aten::t", "aten::transpose", "aten::permute",
    "aten::unsqueeze", "aten::squeeze", "aten::detach", "aten::alias", "aten::lift_fresh", "aten::split",
    "aten::chunk", "aten::unflatten", "aten::flatten", "aten::unbind", "aten::narrow", "aten::empty",
    "aten::empty_like", "aten::empty_strided", "aten::resize_", "aten::contiguous", "aten::result_type",
    "aten::is_nonzero", "aten::view_as", "aten::numpy_T", "aten::_local_scalar_dense", "aten::resolve_conj",
    "aten::resolve_neg", "aten::to",
}  # fmt: skip


def _launches(e) -> bool:
    """An aten op that does work itself: not a view or an allocation, and none of its own aten children
    does work (a composite like aten::linear counts through the aten::mm it calls, not twice)."""
    return _works(e) and not any(_works(c) for c in e.cpu_children)


def _works(e) -> bool:
    return e.name.startswith("aten::") and e.name not in NOT_KERNELS


@contextmanager
def count_host_reads() -> Iterator[Counter]:
    """Count calls of the Tensor methods that read a value back to the host while the block runs."""
    counts: Counter = Counter()
    names = ("item", "tolist", "__int__", "__bool__", "__float__")
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def wrap(name: str):
        original = saved[name]

        def counted(self, *args, **kwargs):
            counts[name] += 1
            return original(self, *args, **kwargs)

        return counted

    for n in names:
        setattr(torch.Tensor, n, wrap(n))
    try:
        yield counts
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


@contextmanager
def _kineto_quiet() -> Iterator[None]:
    """The profiler's C++ side writes start/stop lines to fd 2 whatever its log level: hide them (the
    block only runs the model, whose errors are raised, not printed)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def profile_decode(model: Qwen35Model, prompt: list[int], tokens: int = 8) -> dict:
    """Prefill `prompt`, then count `tokens` greedy decode steps (forward + argmax + the id read back):
    kernel-launching ops and host reads per token and per layer, and the ten most frequent ops."""
    cache = model.make_cache()
    logits = model.prefill(cache, torch.tensor(prompt))
    token = int(logits[-1].argmax())
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if model.device.type == "cuda" else [])
    with count_host_reads() as reads, _kineto_quiet(), profile(activities=activities) as prof:
        for _ in range(tokens):
            logits = model.forward(cache, torch.tensor([token]))
            token = int(logits[-1].argmax())
    kernels = Counter(e.name for e in prof.events() if _launches(e))
    layers = len(model.layers)
    ops, syncs = sum(kernels.values()) / tokens, sum(reads.values()) / tokens
    return {
        "tokens": tokens,
        "ops_per_token": round(ops, 1),
        "ops_per_layer": round(ops / layers, 1),
        "host_reads_per_token": round(syncs, 1),
        "host_reads_per_layer": round(syncs / layers, 2),
        "top_ops": {name: round(n / tokens, 1) for name, n in kernels.most_common(10)},
    }
