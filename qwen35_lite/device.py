"""--device and --dtype: the device a run computes on and its compute dtype (auto: the checkpoint's, but
float32 for bfloat16 weights on a CPU without native bf16 arithmetic)."""

from __future__ import annotations

import torch

from .checkpoint import Checkpoint
from .config import ModelConfig
from .cpu_features import cpu_compute_dtype
from .errors import InputError

DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but no CUDA GPU is visible", "use --device cpu or auto")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise InputError(f"unknown device {name!r}", "use auto, cpu or cuda")
    return torch.device(name)


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
