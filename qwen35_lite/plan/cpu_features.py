"""What the CPU can do, for the dtype choice and the benchmark report: its model name, native bf16 support.

A CPU without bf16 instructions (AVX512-BF16 or AMX-BF16 on x86, the BF16 extension on Arm) emulates
bfloat16 matmuls through float32 conversions, which measured 4x slower than plain float32 on such a CPU.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

import torch

CPUINFO = Path("/proc/cpuinfo")
BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # x86 flags, then Arm's "Features" entry


@functools.cache
def cpu_has_native_bf16() -> bool | None:
    """True or False from /proc/cpuinfo (Linux), else from torch's x86 probe; None when unknown."""
    flags = _cpuinfo_field("flags") or _cpuinfo_field("Features")
    if flags is not None:
        return bool(BF16_FLAGS & set(flags.split()))
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)  # private, so optional
    if probe is not None and platform.machine().lower() in ("x86_64", "amd64"):
        return bool(probe())
    return None


@functools.cache
def cpu_model_name() -> str:
    return _cpuinfo_field("model name") or platform.processor() or platform.machine() or "unknown CPU"


def cpu_compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype to compute in on this CPU for a checkpoint stored in `dtype`: float32 for bfloat16 on a
    CPU known to lack native bf16 arithmetic (where float32 is several times faster), else `dtype`."""
    if dtype == torch.bfloat16 and cpu_has_native_bf16() is False:
        return torch.float32
    return dtype


NO_BF16_NOTE = (
    "this CPU has no native bfloat16 arithmetic, so auto computes in float32 (several times faster here,"
    " twice the memory); --dtype bfloat16 keeps the checkpoint's dtype"
)


def _cpuinfo_field(name: str) -> str | None:
    """The first value of `name` in /proc/cpuinfo, or None (not Linux, or no such field)."""
    try:
        text = CPUINFO.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return None
