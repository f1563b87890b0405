"""Model configuration read from a checkpoint's config.json (Qwen3.5 MoE and dense families)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import ConfigError

MOE_TYPES = {"qwen3_5_moe", "qwen3_5_moe_text"}
DENSE_TYPES = {"qwen3_5", "qwen3_5_text"}
LAYER_TYPES = ("linear_attention", "full_attention")
# Keys that fix tensor shapes: a default (the 397B's) in their place would misread any other checkpoint.
REQUIRED = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "linear_num_key_heads",
    "linear_num_value_heads",
    "linear_key_head_dim",
    "linear_value_head_dim",
    "vocab_size",
)
REQUIRED_MOE = (
    "num_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
)
REQUIRED_DENSE = ("intermediate_size",)
# The largest plausible value of each size (397B: hidden 4096, 512 experts, vocab 248320, 262144 positions):
# past these the file is corrupt, and saying so beats a memory plan asking for terabytes.
TEXT_LIMITS = {
    "hidden_size": 1 << 17,
    "num_hidden_layers": 1024,
    "num_attention_heads": 1024,
    "num_key_value_heads": 1024,
    "head_dim": 4096,
    "linear_num_key_heads": 1024,
    "linear_num_value_heads": 1024,
    "linear_key_head_dim": 4096,
    "linear_value_head_dim": 4096,
    "linear_conv_kernel_dim": 64,
    "num_experts": 1 << 16,
    "num_experts_per_tok": 1 << 16,
    "moe_intermediate_size": 1 << 20,
    "shared_expert_intermediate_size": 1 << 20,
    "intermediate_size": 1 << 20,
    "vocab_size": 1 << 24,
    "max_position_embeddings": 1 << 28,
    "full_attention_interval": 1024,
}
VISION_LIMIT = 1 << 17
TOKEN_ID_KEYS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
CORRUPT_HINT = "config.json is corrupt or hand-edited: re-download the checkpoint"


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


def _text_config(d: dict[str, Any], is_moe: bool, where: str) -> TextConfig:
    _check_text_keys(d, is_moe, where)
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise ConfigError(
            f"config.json: {where}rope_parameters must be an object, not {_show(rope)}", CORRUPT_HINT
        )
    kw = _pick(TextConfig, d)
    kw["rope_theta"] = _positive_float(rope.get("rope_theta", d.get("rope_theta", 1e7)), where + "rope_theta")
    factor = rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 0.25))
    kw["partial_rotary_factor"] = _positive_float(factor, where + "partial_rotary_factor", most=1.0)
    kw["mrope_section"] = _mrope_section(rope.get("mrope_section", [11, 11, 10]), where)
    kw["rms_norm_eps"] = _positive_float(d.get("rms_norm_eps", 1e-6), where + "rms_norm_eps", most=1.0)
    kw["is_moe"] = is_moe
    if "head_dim" not in d:
        if d["hidden_size"] % d["num_attention_heads"]:
            raise ConfigError(
                f"config.json: {where}num_attention_heads ({d['num_attention_heads']}) does not divide"
                f" {where}hidden_size ({d['hidden_size']}) and there is no head_dim",
                CORRUPT_HINT,
            )
        kw["head_dim"] = d["hidden_size"] // d["num_attention_heads"]
    cfg = TextConfig(**kw)
    _check_relations(cfg, where)
    return cfg


def _check_text_keys(d: dict[str, Any], is_moe: bool, where: str) -> None:
    """Each key present, of its type, in its range; the shape-defining ones required."""
    for key in REQUIRED + (REQUIRED_MOE if is_moe else REQUIRED_DENSE):
        if key not in d:
            raise ConfigError(
                f"config.json has no {where}{key}", "a Qwen3.5 config.json names every size: re-download it"
            )
    for key, limit in TEXT_LIMITS.items():
        if key in d:
            least = 0 if key == "intermediate_size" and is_moe else 1  # MoE configs may carry an unused 0
            _size(d[key], where + key, limit, least)
    if d.get("layer_types") is not None:
        _check_layer_types(d["layer_types"], d["num_hidden_layers"], where)
    if not isinstance(d.get("tie_word_embeddings", False), bool):
        raise ConfigError(f"config.json: {where}tie_word_embeddings must be true or false", CORRUPT_HINT)


def _check_layer_types(types: Any, n_layers: int, where: str) -> None:
    if not isinstance(types, list) or len(types) != n_layers:
        raise ConfigError(
            f"config.json: {where}layer_types must list one type per layer ({n_layers})", CORRUPT_HINT
        )
    for kind in types:
        if kind not in LAYER_TYPES:
            raise ConfigError(
                f"config.json: {where}layer_types has unknown layer type {_show(kind)}",
                f"Qwen3.5 layers are {' or '.join(LAYER_TYPES)}",
            )


def _check_relations(cfg: TextConfig, where: str) -> None:
    """What the layers rely on between sizes: GQA groups, DeltaNet head groups, top-k within the experts,
    an even rotary width."""
    pairs = [
        ("num_key_value_heads", "num_attention_heads"),
        ("linear_num_key_heads", "linear_num_value_heads"),
    ]
    for part, whole in pairs:
        if getattr(cfg, whole) % getattr(cfg, part):
            raise ConfigError(
                f"config.json: {where}{part} ({getattr(cfg, part)}) does not divide {where}{whole}"
                f" ({getattr(cfg, whole)})",
                CORRUPT_HINT,
            )
    if cfg.is_moe and cfg.num_experts_per_tok > cfg.num_experts:
        raise ConfigError(
            f"config.json: {where}num_experts_per_tok ({cfg.num_experts_per_tok}) is more than"
            f" {where}num_experts ({cfg.num_experts})",
            CORRUPT_HINT,
        )
    if cfg.rotary_dim < 2 or cfg.rotary_dim % 2:
        raise ConfigError(
            f"config.json: head_dim {cfg.head_dim} × partial_rotary_factor {cfg.partial_rotary_factor}"
            f" gives a rotary width of {cfg.rotary_dim}, which must be even and at least 2",
            CORRUPT_HINT,
        )


def _size(value: Any, key: str, limit: int, least: int = 1) -> int:
    if type(value) is not int:  # not bool, not float: sizes are whole numbers
        raise ConfigError(f"config.json: {key} must be a whole number, not {_show(value)}", CORRUPT_HINT)
    if value < least:
        raise ConfigError(f"config.json: {key} is {_show(value)}; it must be at least {least}", CORRUPT_HINT)
    if value > limit:
        raise ConfigError(
            f"config.json: {key} is {_show(value)}, an implausible value (at most {limit} is plausible)",
            CORRUPT_HINT,
        )
    return value


def _positive_float(value: Any, key: str, most: float = math.inf) -> float:
    if type(value) not in (int, float) or not 0 < value <= most or not value < 1e300:  # nor inf, NaN
        bound = "" if most == math.inf else f" and at most {most}"
        raise ConfigError(
            f"config.json: {key} must be a number above 0{bound}, not {_show(value)}", CORRUPT_HINT
        )
    return float(value)


def _mrope_section(value: Any, where: str) -> list[int]:
    if not (isinstance(value, list) and len(value) == 3 and all(type(v) is int and v >= 0 for v in value)):
        raise ConfigError(
            f"config.json: {where}rope_parameters.mrope_section must be 3 whole numbers, not {_show(value)}",
            CORRUPT_HINT,
        )
    return value


def _show(value: Any) -> str:
    """A value for an error line: its repr, cut short (a corrupt file may hold megabytes in one key)."""
    try:
        text = repr(value)
    except ValueError:  # an integer past Python's 4300-digit conversion limit
        return f"an integer of {value.bit_length()} bits"
    return text if len(text) <= 40 else text[:37] + "..."


def parse_config(d: dict[str, Any]) -> ModelConfig:
    """Build a ModelConfig from a parsed config.json, composite (VLM) or text-only; ConfigError naming
    the key for anything missing, mistyped, out of range or inconsistent."""
    model_type = d.get("model_type", "")
    if model_type not in MOE_TYPES | DENSE_TYPES:
        raise ConfigError(
            f"config.json has model_type {_show(model_type)}, not a Qwen3.5 model",
            "qwen35-lite runs qwen3_5_moe and qwen3_5 checkpoints (e.g. Qwen/Qwen3.5-397B-A17B)",
        )
    is_moe = model_type in MOE_TYPES
    text_d, where = (d["text_config"], "text_config.") if "text_config" in d else (d, "")
    if not isinstance(text_d, dict):
        raise ConfigError(f"config.json: text_config must be an object, not {_show(text_d)}", CORRUPT_HINT)
    text = _text_config(text_d, is_moe, where)
    vision = _vision_config(d.get("vision_config"))
    tie = d.get("tie_word_embeddings", text_d.get("tie_word_embeddings", False))
    if not isinstance(tie, bool):
        raise ConfigError("config.json: tie_word_embeddings must be true or false", CORRUPT_HINT)
    text.tie_word_embeddings = tie
    ids = {k: _size(d[k], k, 1 << 31, least=0) for k in TOKEN_ID_KEYS if k in d}
    return ModelConfig(model_type=model_type, text=text, vision=vision, tie_word_embeddings=tie, raw=d, **ids)


def _vision_config(d: Any) -> VisionConfig | None:
    if d is None:
        return None
    if not isinstance(d, dict):
        raise ConfigError(f"config.json: vision_config must be an object, not {_show(d)}", CORRUPT_HINT)
    kw = _pick(VisionConfig, d)
    for key, value in kw.items():
        _size(value, "vision_config." + key, VISION_LIMIT)
    rope = d.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise ConfigError(
            f"config.json: vision_config.rope_parameters must be an object, not {_show(rope)}", CORRUPT_HINT
        )
    if "rope_theta" in rope:
        _positive_float(rope["rope_theta"], "vision_config.rope_parameters.rope_theta")
    return VisionConfig(**kw)


def load_config(model_dir: Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(
            f"no config.json in {model_dir}", "point --model at a Hugging Face checkpoint directory"
        )
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:
        raise ConfigError(
            f"config.json in {model_dir} is not valid JSON ({e})", "re-download the checkpoint"
        ) from e
    if not isinstance(d, dict):
        raise ConfigError(f"config.json in {model_dir} is not a JSON object", "re-download the checkpoint")
    return parse_config(d)
