"""Load everything a run needs from --model and the flags: checkpoint, model, experts, tokenizer, template."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .chat_template import ChatTemplate
from .checkpoint import Checkpoint
from .config import ModelConfig
from .errors import CheckpointError, InputError
from .experts.cache import TieredExperts
from .experts.formats import expert_format
from .experts.store import ExpertStore
from .load_plan import plan_load
from .model import Qwen35Model
from .sampling import SamplingParams
from .tokenizer import Tokenizer

if TYPE_CHECKING:  # imported on first use: a text-only run needs neither PIL nor the tower code
    from .plan import MemoryPlan
    from .vision.preprocess import ImageProcessorConfig
    from .vision.tower import VisionTower

IM_END = "<|im_end|>"
DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass
class EngineOptions:
    """How to load: device, dtype and the memory budgets the plan fits everything into."""

    device: str = "auto"
    dtype: str = "auto"
    offline: bool = False
    ctx: int | None = None  # --ctx: the context the KV cache is reserved for
    context: int | None = None  # without --ctx: the workload's context (bench), else the plan's rule
    gpu_mem: float | None = None  # GiB; None: free memory minus a margin
    cpu_mem: float | None = None
    gpu_experts: int | None = None  # slots per layer instead of what the budget fits
    cpu_experts: int | None = None


@dataclass
class GenerationDefaults:
    params: SamplingParams
    max_new_tokens: int
    stop_ids: tuple[int, ...]


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but no CUDA GPU is visible", "use --device cpu or auto")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise InputError(f"unknown device {name!r}", "use auto, cpu or cuda")
    return torch.device(name)


def pick_dtype(name: str, ckpt: Checkpoint) -> torch.dtype:
    if name == "auto":
        stored = ckpt.info("embed_tokens.weight").dtype
        return stored if stored in (torch.float32, torch.bfloat16, torch.float16) else torch.bfloat16
    return named_dtype(name)


def named_dtype(name: str) -> torch.dtype:
    """--dtype other than auto."""
    if name not in DTYPES:
        raise InputError(f"unknown dtype {name!r}", "use auto, bfloat16 or float32")
    return DTYPES[name]


def config_dtype(name: str, cfg: ModelConfig) -> torch.dtype:
    """--dtype, or the dtype config.json names (a checkpoint's weights are what decide when present)."""
    if name != "auto":
        return named_dtype(name)
    text = cfg.raw.get("text_config", cfg.raw)
    stored = text.get("dtype") or text.get("torch_dtype") or cfg.raw.get("torch_dtype") or "bfloat16"
    return DTYPES.get(str(stored), DTYPES["bfloat16"])


def generation_defaults(model_dir: Path, tokenizer: Tokenizer) -> GenerationDefaults:
    """Sampling defaults from generation_config.json; stop on its eos ids and on <|im_end|>."""
    path = model_dir / "generation_config.json"
    g = json.loads(path.read_text()) if path.is_file() else {}
    eos = g.get("eos_token_id", [])
    stop = set(eos if isinstance(eos, list) else [eos])
    im_end = tokenizer.token_id(IM_END)
    if im_end is not None:
        stop.add(im_end)
    params = SamplingParams(
        temperature=float(g.get("temperature", 1.0)) if g.get("do_sample", True) else 0.0,
        top_p=float(g.get("top_p", 1.0)),
        top_k=int(g.get("top_k", 0) or 0),
        min_p=float(g.get("min_p", 0.0) or 0.0),
        presence_penalty=float(g.get("presence_penalty", 0.0) or 0.0),
        repetition_penalty=float(g.get("repetition_penalty", 1.0) or 1.0),
    )
    return GenerationDefaults(params, int(g.get("max_new_tokens", 0) or 0) or 2048, tuple(sorted(stop)))


class Engine:
    """Everything loaded for one model: the CLI, chat sessions and benchmarks drive it."""

    def __init__(
        self,
        model_dir: Path,
        cfg: ModelConfig,
        ckpt: Checkpoint,
        model: Qwen35Model,
        provider,
        tokenizer: Tokenizer,
        template: ChatTemplate,
        defaults: GenerationDefaults,
        max_context: int,
    ):
        self.model_dir, self.cfg, self.ckpt, self.model = model_dir, cfg, ckpt, model
        self.provider, self.tokenizer, self.template = provider, tokenizer, template
        self.defaults, self.max_context = defaults, max_context
        self.plan: MemoryPlan | None = None  # the plan it was loaded under
        # Loaded on the first image only: a text-only run never reads the tower (0.9 GB in bf16 for 397B).
        self._vision: VisionTower | None = None
        self._image_config: ImageProcessorConfig | None = None

    @classmethod
    def load(
        cls,
        model: str,
        opts: EngineOptions | None = None,
        provider_factory: Callable | None = None,
        on_progress: Callable[[str, int, int], None] | None = None,
    ) -> Engine:
        """Resolve `model`, plan its memory, refuse a budget that cannot hold it, load under the plan.

        The routed experts go to a `TieredExperts` sized by the plan (every expert is read now, with
        progress, when the compute tier holds them all), unless provider_factory(store, device, dtype)
        builds another provider. on_progress(stage, done_bytes, total_bytes)."""
        opts = opts or EngineOptions()
        planned = plan_load(model, opts)
        plan, cfg, ckpt, device, dtype = (
            planned.plan,
            planned.cfg,
            planned.ckpt,
            planned.device,
            planned.dtype,
        )
        plan.check()
        tokenizer = Tokenizer.from_dir(planned.model_dir)
        template = ChatTemplate.from_dir(planned.model_dir)
        provider = None
        if cfg.is_moe:
            text = cfg.text
            fmt = expert_format(cfg.raw, text.hidden_size, text.moe_intermediate_size, device, dtype, ckpt)
            store = ExpertStore(ckpt, text, fmt, raw_config=cfg.raw)
            factory = provider_factory or functools.partial(TieredExperts, **plan.provider_kwargs())
            provider = factory(store, device, dtype)
        progress = (lambda done, total: on_progress("loading weights", done, total)) if on_progress else None
        model_obj = Qwen35Model.load(
            ckpt, cfg.text, provider, device, dtype, progress, cpu_layers=tuple(plan.cpu_layers)
        )
        if isinstance(provider, TieredExperts) and plan.holds_every_expert:
            # the model fits: read every expert now (as llama.cpp or ollama would), not on first use
            expert_progress = (lambda d, t: on_progress("loading experts", d, t)) if on_progress else None
            provider.preload(on_progress=expert_progress)
        engine = cls(
            planned.model_dir,
            cfg,
            ckpt,
            model_obj,
            provider,
            tokenizer,
            template,
            generation_defaults(planned.model_dir, tokenizer),
            plan.context,
        )
        engine.plan = plan
        return engine

    @property
    def vision_loaded(self) -> bool:
        return self._vision is not None

    def check_vision(self) -> None:
        """Raise CheckpointError unless the checkpoint has a vision tower (config and weights); reads nothing."""
        if self.cfg.vision is None or "visual.patch_embed.proj.weight" not in self.ckpt:
            raise CheckpointError(
                f"{self.model_dir.name} has no vision tower, so it cannot read images",
                "use a vision-language checkpoint (e.g. Qwen/Qwen3.5-35B-A3B), or drop the image",
            )

    def vision(self) -> VisionTower:
        """The vision tower, loaded on first use onto the text model's device, then kept (its dtype:
        vision.tower.tower_dtype)."""
        if self._vision is None:
            from .vision.tower import ROPE_THETA, VisionTower, tower_dtype

            self.check_vision()
            rope = (self.cfg.raw.get("vision_config") or {}).get("rope_parameters") or {}
            self._vision = VisionTower.load(
                self.ckpt,
                self.cfg.vision,
                self.model.device,
                tower_dtype(self.model.device, self.model.dtype),
                float(rope.get("rope_theta", ROPE_THETA)),
            )
        return self._vision

    def image_config(self) -> ImageProcessorConfig:
        """The checkpoint's preprocessor_config.json (Qwen3.5 release values when it has none)."""
        if self._image_config is None:
            from .vision.preprocess import ImageProcessorConfig

            self._image_config = ImageProcessorConfig.from_dir(self.model_dir)
        return self._image_config

    def expert_stats(self) -> dict:
        return self.provider.stats() if self.provider else {}
