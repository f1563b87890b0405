"""--device and --dtype: the device a run computes on and its compute dtype (auto: the checkpoint's, but
float32 for bfloat16 weights on a CPU without native bf16 arithmetic)."""

from __future__ import annotations

import torch

from ..errors import InputError
from ..weights.checkpoint import Checkpoint
from ..weights.config import ModelConfig
from .cpu_features import cpu_compute_dtype

DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def pick_device(name: str) -> torch.device:
    """--device: auto, cpu, cuda or cuda:N; InputError for a GPU this machine does not have."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device(name)
    index = _cuda_index(name)
    if not torch.cuda.is_available():
        raise InputError(
            f"--device {name} was asked for but no CUDA GPU is visible", "use --device cpu or auto"
        )
    count = torch.cuda.device_count()
    if index is not None and index >= count:
        raise InputError(
            f"--device {name}: this machine has {count} CUDA GPU{'s' if count != 1 else ''}",
            f"use cuda:0 to cuda:{count - 1}" if count > 1 else "use --device cuda",
        )
    return torch.device(name)


def _cuda_index(name: str) -> int | None:
    """N of cuda:N (None for plain cuda); InputError for anything else."""
    if name == "cuda":
        return None
    prefix, _, number = name.partition(":")
    if prefix != "cuda" or not number.isdigit() or len(number) > 4:
        raise InputError(f"unknown device {name!r}", "use auto, cpu, cuda or cuda:N")
    return int(number)


def pick_dtype(name: str, ckpt: Checkpoint, device: torch.device | str | None = None) -> torch.dtype:
    """--dtype; auto is the checkpoint's dtype, except float32 for bfloat16 on a CPU without native bf16.

    device: where the model runs; None means where --device auto puts it (CUDA when visible).
    """
    if name != "auto":
        return named_dtype(name)
    stored = ckpt.info("embed_tokens.weight").dtype
    dtype = stored if stored in (torch.float32, torch.bfloat16, torch.float16) else torch.bfloat16
    on_cpu = not torch.cuda.is_available() if device is None else torch.device(device).type == "cpu"
    return cpu_compute_dtype(dtype) if on_cpu else dtype


def named_dtype(name: str) -> torch.dtype:
    """--dtype other than auto."""
    if name not in DTYPES:
        raise InputError(f"unknown dtype {name!r}", "use auto, bfloat16, float16 or float32")
    return DTYPES[name]


def declared_dtype(cfg: ModelConfig) -> torch.dtype:
    """The dtype config.json says the weights are stored in (bfloat16 when it says none)."""
    text, raw = cfg.raw.get("text_config", cfg.raw), cfg.raw
    stored = text.get("dtype") or text.get("torch_dtype") or raw.get("dtype") or raw.get("torch_dtype")
    return DTYPES.get(str(stored or "bfloat16"), DTYPES["bfloat16"])


def config_dtype(name: str, cfg: ModelConfig, device: torch.device | str | None = None) -> torch.dtype:
    """--dtype, or the dtype config.json names (a checkpoint's weights are what decide when present), under
    the CPU rule of `pick_dtype`."""
    if name != "auto":
        return named_dtype(name)
    dtype = declared_dtype(cfg)
    on_cpu = not torch.cuda.is_available() if device is None else torch.device(device).type == "cpu"
    return cpu_compute_dtype(dtype) if on_cpu else dtype
