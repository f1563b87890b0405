"""Model configuration read from a checkpoint's config.json (Qwen3.5 MoE and dense families)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError

MOE_TYPES = {"qwen3_5_moe", "qwen3_5_moe_text"}
DENSE_TYPES = {"qwen3_5", "qwen3_5_text"}


@dataclass
class TextConfig:
    hidden_size: int = 4096
    num_hidden_layers: int = 60
    num_attention_heads: int = 32
    num_key_value_heads: int = 2
    head_dim: int = 256
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 64
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_conv_kernel_dim: int = 4
    num_experts: int = 512
    num_experts_per_tok: int = 10
    moe_intermediate_size: int = 1024
    shared_expert_intermediate_size: int = 1024
    intermediate_size: int = 0  # dense family only
    vocab_size: int = 248320
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 262144
    full_attention_interval: int = 4
    tie_word_embeddings: bool = False
    rope_theta: float = 1e7
    partial_rotary_factor: float = 0.25
    mrope_section: list[int] = field(default_factory=lambda: [11, 11, 10])
    layer_types: list[str] = field(default_factory=list)
    is_moe: bool = True
    eos_token_id: int | list[int] | None = None

    def __post_init__(self) -> None:
        if not self.layer_types:
            n = self.full_attention_interval
            self.layer_types = [
                "full_attention" if (i + 1) % n == 0 else "linear_attention"
                for i in range(self.num_hidden_layers)
            ]

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def full_attention_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == "full_attention"]


@dataclass
class VisionConfig:
    depth: int = 27
    hidden_size: int = 1152
    num_heads: int = 16
    intermediate_size: int = 4304
    in_channels: int = 3
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    out_hidden_size: int = 4096
    num_position_embeddings: int = 2304


@dataclass
class ModelConfig:
    model_type: str
    text: TextConfig
    vision: VisionConfig | None = None
    image_token_id: int = 248056
    video_token_id: int = 248057
    vision_start_token_id: int = 248053
    vision_end_token_id: int = 248054
    tie_word_embeddings: bool = False
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def is_moe(self) -> bool:
        return self.text.is_moe


def _pick(cls: type, d: dict[str, Any]) -> dict[str, Any]:
    """Keep only the keys the dataclass knows (unknown keys are dropped, as mlx-lm does)."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names}


def _text_config(d: dict[str, Any], is_moe: bool) -> TextConfig:
    rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    kw = _pick(TextConfig, d)
    kw["rope_theta"] = float(rope.get("rope_theta", d.get("rope_theta", 1e7)))
    kw["partial_rotary_factor"] = float(
        rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 0.25))
    )
    kw["mrope_section"] = list(rope.get("mrope_section", [11, 11, 10]))
    kw["is_moe"] = is_moe
    if "head_dim" not in d and "hidden_size" in d and "num_attention_heads" in d:
        kw["head_dim"] = d["hidden_size"] // d["num_attention_heads"]
    try:
        return TextConfig(**kw)
    except TypeError as e:
        raise ConfigError(
            f"config.json has a malformed text config: {e}", "is this a Qwen3.5 checkpoint?"
        ) from e


def parse_config(d: dict[str, Any]) -> ModelConfig:
    """Build a ModelConfig from a parsed config.json, composite (VLM) or text-only."""
    model_type = d.get("model_type", "")
    if model_type not in MOE_TYPES | DENSE_TYPES:
        raise ConfigError(
            f"config.json has model_type {model_type!r}, not a Qwen3.5 model",
            "qwen35-lite runs qwen3_5_moe and qwen3_5 checkpoints (e.g. Qwen/Qwen3.5-397B-A17B)",
        )
    is_moe = model_type in MOE_TYPES
    text_d = d.get("text_config", d)
    text = _text_config(text_d, is_moe)
    vision = None
    if isinstance(d.get("vision_config"), dict):
        vision = VisionConfig(**_pick(VisionConfig, d["vision_config"]))
    tie = bool(d.get("tie_word_embeddings", text_d.get("tie_word_embeddings", False)))
    text.tie_word_embeddings = tie
    ids = {
        k: d[k]
        for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
        if k in d
    }
    return ModelConfig(model_type=model_type, text=text, vision=vision, tie_word_embeddings=tie, raw=d, **ids)


def load_config(model_dir: Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(
            f"no config.json in {model_dir}", "point --model at a Hugging Face checkpoint directory"
        )
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(
            f"config.json in {model_dir} is not valid JSON ({e})", "re-download the checkpoint"
        ) from e
    if not isinstance(d, dict):
        raise ConfigError(f"config.json in {model_dir} is not a JSON object", "re-download the checkpoint")
    return parse_config(d)
