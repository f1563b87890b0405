"""Resolve --model and plan its memory before anything heavy is read: config.json, the safetensors headers
(scanned once, the loader reuses them), the device and dtype, and the `MemoryPlan` for the budgets."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..experts.formats import ExpertFormat, choose
from ..weights.checkpoint import Checkpoint, check_not_partial
from ..weights.config import ModelConfig, load_config
from ..weights.hub import resolve_model
from .device import config_dtype, pick_device, pick_dtype
from .memory import MemoryPlan, gib_to_bytes, plan_for
from .options import EngineOptions
from .sizes import resident_stored, tensor_shapes


@dataclass
class Planned:
    model_dir: Path
    cfg: ModelConfig
    ckpt: Checkpoint | None  # None: `info` on config.json alone
    device: torch.device
    dtype: torch.dtype
    plan: MemoryPlan
    experts: ExpertFormat | None  # the routed experts' format, chosen here once (None: no MoE)


def plan_load(model: str, opts: EngineOptions, config_only: bool = False) -> Planned:
    """The plan a load of `model` with `opts` runs under.

    The context is opts.ctx when given, else opts.context (bench: its workload), else plan.plan_for's rule.
    config_only: plan from config.json alone when the directory has no weights (`info` on a config).
    """
    model_dir = resolve_model(model, opts.offline, configs_only=config_only)
    check_not_partial(model_dir)  # an interrupted `quantize` output is refused, never half-loaded
    cfg = load_config(model_dir)
    # `info` on a hub id fetched the JSON files only: the index alone, with no shard, is not a checkpoint.
    has_weights = any(model_dir.glob("*.safetensors")) or (
        not config_only and (model_dir / "model.safetensors.index.json").is_file()
    )
    ckpt = Checkpoint(model_dir) if has_weights or not config_only else None
    if config_only and opts.device.startswith("cuda") and opts.gpu_mem is not None:
        device = torch.device(opts.device)  # planning for a GPU this machine may not have
    else:
        device = pick_device(opts.device)
    dtype = (
        pick_dtype(opts.dtype, ckpt, device) if ckpt is not None else config_dtype(opts.dtype, cfg, device)
    )
    ctx = opts.ctx if opts.ctx is not None else opts.context
    text = cfg.text
    # the resident layers first: a quantisation scheme they cannot load is refused naming a layer
    shapes = tensor_shapes(text)
    if ckpt is not None:
        ckpt.check_resident(shapes)
    else:
        resident_stored(shapes, None, cfg.raw, dtype)
    experts = (
        choose(cfg.raw, text.hidden_size, text.moe_intermediate_size, device, dtype, ckpt)
        if text.is_moe
        else None
    )
    plan = plan_for(
        cfg.text,
        device=device,
        dtype=dtype,
        ckpt=ckpt,
        raw_config=cfg.raw,
        experts=experts,
        gpu_mem=opts.gpu_mem,
        cpu_mem=opts.cpu_mem,
        gpu_experts=opts.gpu_experts,
        cpu_experts=opts.cpu_experts,
        context=ctx,
        vision=cfg.vision,
        kept_states=None if opts.state_cache is None else gib_to_bytes(opts.state_cache),
        images=opts.image_paths,
    )
    if opts.ctx is None and opts.context is not None:
        plan.context_from = "the workload"
    return Planned(model_dir, cfg, ckpt, device, dtype, plan, experts)
