"""Load everything a run needs from --model and the flags: checkpoint, model, experts, tokenizer, template."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .chat_template import ChatTemplate
from .checkpoint import Checkpoint
from .config import ModelConfig, load_config
from .cpu_features import cpu_compute_dtype
from .errors import CheckpointError, InputError
from .expert_cache import UncachedExperts
from .expert_store import ExpertStore
from .hub import resolve_model
from .model import Qwen35Model
from .sampling import SamplingParams
from .tokenizer import Tokenizer

if TYPE_CHECKING:  # imported on first use: a text-only run needs neither PIL nor the tower code
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
    device: str = "auto"
    dtype: str = "auto"
    offline: bool = False
    max_context: int | None = None
    cpu_layers: tuple[int, ...] = ()  # layers streamed in from host memory (the plan's, on CUDA)


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
        self.plan = None  # the plan.MemoryPlan it was loaded under (set by cli_options.load_engine)
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
        """Resolve and load `model`. provider_factory(store, device, dtype) builds the expert provider."""
        opts = opts or EngineOptions()
        model_dir = resolve_model(model, opts.offline)
        cfg = load_config(model_dir)
        ckpt = Checkpoint(model_dir)
        device, dtype = pick_device(opts.device), pick_dtype(opts.dtype, ckpt)
        tokenizer = Tokenizer.from_dir(model_dir)
        template = ChatTemplate.from_dir(model_dir)
        provider = None
        if cfg.is_moe:
            store = ExpertStore(ckpt, cfg.text)
            provider = (provider_factory or UncachedExperts)(store, device, dtype)
        progress = (lambda done, total: on_progress("loading weights", done, total)) if on_progress else None
        model_obj = Qwen35Model.load(
            ckpt, cfg.text, provider, device, dtype, progress, cpu_layers=opts.cpu_layers
        )
        max_context = min(
            opts.max_context or cfg.text.max_position_embeddings, cfg.text.max_position_embeddings
        )
        return cls(
            model_dir,
            cfg,
            ckpt,
            model_obj,
            provider,
            tokenizer,
            template,
            generation_defaults(model_dir, tokenizer),
            max_context,
        )

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
        stats = getattr(self.provider, "stats", None)
        if callable(stats):
            return stats()
        return {"bytes_read": getattr(self.provider, "bytes_read", 0)} if self.provider else {}
