"""Process memory figures for the stats line and --json."""

from __future__ import annotations

import resource
import sys

import psutil
import torch


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (the kernel's high-water mark)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def rss_bytes() -> int:
    return psutil.Process().memory_info().rss


def peak_memory(device: torch.device) -> dict:
    out = {"peak_rss_bytes": peak_rss_bytes()}
    if device.type == "cuda":
        out["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(device)
    return out
