"""Figures for the stats line, --json and bench: process memory, and the expert-cache counters of one reply."""

from __future__ import annotations

import resource
import sys
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..model.moe import ExpertProvider

# Cumulative counters of an expert provider (TieredExperts.stats; UncachedExperts has bytes_read only).
COUNTERS = ("ram_hits", "ram_misses", "gpu_hits", "gpu_misses", "bytes_read", "bytes_to_gpu")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (the kernel's high-water mark).

    On Linux VmHWM, not ru_maxrss: ru_maxrss survives exec, so a process started by a large parent
    (a benchmark driver, a test runner) would report the parent's peak.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def peak_memory(device: torch.device) -> dict:
    out = {"peak_rss_bytes": peak_rss_bytes()}
    if device.type == "cuda":
        out["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(device)
    return out


def expert_counters(provider: ExpertProvider | None) -> dict[str, int]:
    """A snapshot of the provider's cumulative counters ({} for a dense model)."""
    if provider is None:
        return {}
    raw = provider.stats()
    return {k: int(raw[k]) for k in COUNTERS if k in raw}


def reply_expert_stats(
    start: dict[str, int], prefilled: dict[str, int], end: dict[str, int], decoded: int
) -> dict:
    """The counters of one reply from snapshots taken before it, after its prefill and at its end.

    Hits and misses cover the whole reply; bytes per token cover decode only (`decoded` tokens fed after
    the prefill), since a prefill chunk reads each expert once for hundreds of tokens and would hide the
    per-token cost that decode speed depends on.
    """
    out: dict = {k: end[k] - start.get(k, 0) for k in end}
    for tier in ("ram", "gpu"):
        if f"{tier}_hits" in out:
            asked = out[f"{tier}_hits"] + out[f"{tier}_misses"]
            out[f"{tier}_hit_rate"] = round(out[f"{tier}_hits"] / asked, 4) if asked else None
    if "bytes_read" in end:
        out["prefill_disk_bytes"] = prefilled["bytes_read"] - start.get("bytes_read", 0)
        out["disk_bytes_per_token"] = _per(end["bytes_read"] - prefilled["bytes_read"], decoded)
    if "bytes_to_gpu" in end:
        out["gpu_bytes_per_token"] = _per(end["bytes_to_gpu"] - prefilled["bytes_to_gpu"], decoded)
    return {
        ("disk_bytes" if k == "bytes_read" else "gpu_bytes" if k == "bytes_to_gpu" else k): v
        for k, v in out.items()
    }


def _per(n: int, tokens: int) -> int | None:
    return round(n / tokens) if tokens else None
