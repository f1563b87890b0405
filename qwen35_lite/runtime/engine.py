"""Load everything a run needs from --model and the flags: checkpoint, model, experts, tokenizer, template."""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import CheckpointError, ConfigError
from ..experts.cache import TieredExperts
from ..experts.rates import ExpertRates, measure_rates
from ..experts.store import ExpertStore
from ..model.qwen35 import Qwen35Model
from ..plan.load import EngineOptions, plan_load
from ..text.chat_template import ChatTemplate
from ..text.tokenizer import Tokenizer
from ..weights.checkpoint import Checkpoint
from ..weights.config import ModelConfig
from .sampling import SamplingParams
from .threads import ThreadTuner

if TYPE_CHECKING:  # imported on first use: a text-only run needs neither PIL nor the tower code
    from ..model.vision.preprocess import ImageProcessorConfig
    from ..model.vision.tower import VisionTower
    from ..plan.memory import MemoryPlan

IM_END = "<|im_end|>"


@dataclass
class GenerationDefaults:
    params: SamplingParams
    max_new_tokens: int
    stop_ids: tuple[int, ...]


def generation_defaults(model_dir: Path, tokenizer: Tokenizer) -> GenerationDefaults:
    """Sampling defaults from generation_config.json; stop on its eos ids and on <|im_end|>.

    A key set to null counts as absent (as in transformers); a key of the wrong type or out of range
    is a ConfigError naming it, never a silent fallback: the file decides how every reply is sampled."""
    path = model_dir / "generation_config.json"
    g = _read_generation_config(path) if path.is_file() else {}
    value = {key: _generation_value(g, key, check) for key, check in GENERATION_KEYS.items()}
    eos = value["eos_token_id"]
    stop = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    im_end = tokenizer.token_id(IM_END)
    if im_end is not None:
        stop.add(im_end)
    sample = value["do_sample"] is not False
    params = SamplingParams(
        temperature=float(value["temperature"] if value["temperature"] is not None else 1.0)
        if sample
        else 0.0,
        top_p=float(value["top_p"] if value["top_p"] is not None else 1.0),
        top_k=value["top_k"] or 0,
        min_p=float(value["min_p"] or 0.0),
        presence_penalty=float(value["presence_penalty"] or 0.0),
        repetition_penalty=float(value["repetition_penalty"] or 1.0),
    )
    return GenerationDefaults(params, value["max_new_tokens"] or 2048, tuple(sorted(stop)))


def _read_generation_config(path: Path) -> dict:
    try:
        g = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:
        raise ConfigError(
            f"{path.name} in {path.parent} is not valid JSON ({e})",
            "fix or delete that file (without it the sampling defaults are temperature 1, top-p 1)",
        ) from e
    if not isinstance(g, dict):
        raise ConfigError(f"{path.name} in {path.parent} is not a JSON object", "fix or delete that file")
    return g


def _number(low: float = -math.inf, high: float = math.inf, above: bool = False, whole: bool = False):
    """A check for one generation_config.json value: its type and its range, as text for the message."""

    def check(v: object) -> str | None:
        finite_float = type(v) is float and math.isfinite(v) and not whole
        if type(v) is not int and not finite_float:  # bool is not int here: `true` is no number
            return "a whole number" if whole else "a number"
        if not -1e300 < v < 1e300:  # an integer that float() cannot hold
            return "a plausible number"
        if v < low or v > high or (above and v <= low):
            bounds = f"above {low:g}" if above else f"at least {low:g}"
            return bounds + (f" and at most {high:g}" if high < math.inf else "")
        return None

    return check


def _token_ids(v: object) -> str | None:
    ids = v if isinstance(v, list) else [v]
    ok = all(type(i) is int and i >= 0 for i in ids)
    return None if ok else "a token id or a list of token ids"


GENERATION_KEYS = {
    "eos_token_id": _token_ids,
    "do_sample": lambda v: None if isinstance(v, bool) else "true or false",
    "temperature": _number(0.0),
    "top_p": _number(0.0, 1.0),
    "top_k": _number(0, whole=True),
    "min_p": _number(0.0, 1.0),
    "presence_penalty": _number(),
    "repetition_penalty": _number(0.0, above=True),
    "max_new_tokens": _number(1, whole=True),
}


def _generation_value(g: dict, key: str, check: Callable[[object], str | None]) -> object:
    value = g.get(key)
    if value is not None and (problem := check(value)) is not None:
        huge = type(value) is int and value.bit_length() > 64  # repr fails past 4300 digits
        shown = f"an integer of {value.bit_length()} bits" if huge else repr(value)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        raise ConfigError(
            f"generation_config.json: {key} must be {problem}, not {shown}",
            "fix or delete that key (the --temperature, --top-p, ... flags override the file)",
        )
    return value


def _choose_cpu_compute(provider, mode: str) -> ExpertRates | None:
    """On a CUDA run whose GPU tier cannot hold every expert: measure the CPU's and the bus's rates on an
    expert and let the faster one take a decode step's GPU misses (mode "auto"), or as forced."""
    if not isinstance(provider, TieredExperts) or provider.gpu is None:
        return None
    if provider.gpu.pools[0].capacity >= provider.n_experts:
        return None  # every expert on the GPU: no misses to place
    rates = measure_rates(provider)
    provider.compute_in_place = rates.compute_in_place if mode == "auto" else mode == "on"
    return rates


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
        self.expert_rates: ExpertRates | None = None  # measured at load on a CUDA run with GPU misses
        self.threads: ThreadTuner | None = None  # a CPU run's decode thread count, chosen by measurement
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
        if opts.cpu_threads is not None:
            torch.set_num_threads(opts.cpu_threads)  # the CPU compute from here on, the load's included
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
            store = ExpertStore(ckpt, cfg.text, planned.experts)  # the format plan_load chose
            factory = provider_factory or functools.partial(TieredExperts, **plan.provider_kwargs())
            provider = factory(store, device, dtype)
        progress = (lambda done, total: on_progress("loading weights", done, total)) if on_progress else None
        model_obj = Qwen35Model.load(
            ckpt, cfg.text, provider, device, dtype, progress, cpu_layers=tuple(plan.cpu_layers)
        )
        model_obj.prefill_block = plan.prefill_block
        if isinstance(provider, TieredExperts) and plan.holds_every_expert:
            # the model fits: read every expert now (as llama.cpp or ollama would), not on first use
            expert_progress = (lambda d, t: on_progress("loading experts", d, t)) if on_progress else None
            provider.preload(on_progress=expert_progress)
        rates = _choose_cpu_compute(provider, opts.cpu_compute)
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
        engine.plan, engine.expert_rates = plan, rates
        if device.type == "cpu" and opts.cpu_threads is None and torch.get_num_threads() > 1:
            engine.threads = ThreadTuner(torch.get_num_threads())  # --cpu-threads N fixes N instead
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
            from ..model.vision.tower import ROPE_THETA, VisionTower, tower_dtype

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
            from ..model.vision.preprocess import ImageProcessorConfig

            self._image_config = ImageProcessorConfig.from_dir(self.model_dir)
        return self._image_config

    def expert_stats(self) -> dict:
        return self.provider.stats() if self.provider else {}
