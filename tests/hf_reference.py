"""Tiny random Qwen3.5 checkpoints written by transformers itself (our numerical oracle, test-only).

Every parameter is randomised, norm weights and A_log/dt_bias included: transformers' default init
(zeros for the `1 + w` norms) would hide exactly the bugs the parity tests exist to catch.
"""

from __future__ import annotations

import gzip
import math
import shutil
from pathlib import Path

import torch

FIXTURE_TOKENIZER = Path(__file__).resolve().parents[1] / "qwen35_lite" / "assets" / "tokenizer.json.gz"

ROPE = {"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25, "mrope_interleaved": True}
TINY_VISION = dict(
    depth=1,
    hidden_size=16,
    intermediate_size=16,
    num_heads=2,
    patch_size=16,
    temporal_patch_size=2,
    spatial_merge_size=2,
    out_hidden_size=64,
    num_position_embeddings=16,
)

# Shapes that exercise different code paths: v/k head ratio ≠ 1, GQA, several full-attention layers, dk ≠ dv.
_RATIO2_GQA2 = dict(
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
    num_experts=8,
    num_experts_per_tok=3,
    moe_intermediate_size=16,
    shared_expert_intermediate_size=24,
    rope_parameters={**ROPE, "mrope_section": [2, 1, 1]},
)
SHAPES = {
    "moe_ratio2_gqa2": _RATIO2_GQA2,
    "moe_2attn_gqa4_dkdv": dict(
        hidden_size=48,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=24,
        linear_num_key_heads=2,
        linear_num_value_heads=2,
        linear_key_head_dim=8,
        linear_value_head_dim=16,
        linear_conv_kernel_dim=3,
        num_experts=16,
        num_experts_per_tok=4,
        moe_intermediate_size=12,
        shared_expert_intermediate_size=20,
        rope_parameters={**ROPE, "mrope_section": [1, 1, 1]},
    ),
    # expert widths divisible by the int4 group sizes 32 and 64; otherwise the first shape
    "moe_int4": dict(
        _RATIO2_GQA2,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=32,
    ),
    "dense": dict(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        intermediate_size=96,
        rope_parameters={**ROPE, "mrope_section": [2, 1, 1]},
    ),
}


def randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Overwrite every parameter (text and vision) with random values at scales that keep activations O(1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                new = torch.rand(p.shape, generator=gen) * 2 - 1
            elif name.endswith("linear_attn.norm.weight") or (
                p.dim() == 1 and "visual" in name and "norm" in name
            ):
                new = 1 + 0.3 * torch.randn(p.shape, generator=gen)  # plain-weight norms (not 1 + w)
            elif p.dim() == 1:
                new = 0.3 * torch.randn(p.shape, generator=gen)  # 1 + w norms, dt_bias, biases
            elif "embed_tokens" in name or "pos_embed" in name:
                new = torch.randn(p.shape, generator=gen)
            else:
                fan_in = p[0].numel() if p.dim() in (2, 5) else p.shape[-1]  # 5-D: Conv3d patch embed
                new = torch.randn(p.shape, generator=gen) / math.sqrt(fan_in)
            p.copy_(new.to(p.dtype))


def build(shape: str, out: Path, seed: int = 0) -> Path:
    """Write a randomised transformers checkpoint of the named shape (fp32) with the real tokenizer."""
    from transformers import (
        Qwen3_5Config,
        Qwen3_5ForConditionalGeneration,
        Qwen3_5MoeConfig,
        Qwen3_5MoeForConditionalGeneration,
    )

    text = {"vocab_size": 248320, "tie_word_embeddings": False, **SHAPES[shape]}
    vision = {**TINY_VISION, "out_hidden_size": text["hidden_size"]}
    if shape == "dense":
        model = Qwen3_5ForConditionalGeneration(Qwen3_5Config(text_config=text, vision_config=vision))
    else:
        model = Qwen3_5MoeForConditionalGeneration(Qwen3_5MoeConfig(text_config=text, vision_config=vision))
    randomise(model, seed)
    model.save_pretrained(out)
    with gzip.open(FIXTURE_TOKENIZER, "rb") as src, open(out / "tokenizer.json", "wb") as dst:
        shutil.copyfileobj(src, dst)
    return out


def load_reference(path: Path, dtype: torch.dtype):
    from transformers import AutoConfig, Qwen3_5ForConditionalGeneration, Qwen3_5MoeForConditionalGeneration

    cls = (
        Qwen3_5ForConditionalGeneration
        if AutoConfig.from_pretrained(path).model_type == "qwen3_5"
        else Qwen3_5MoeForConditionalGeneration
    )
    return cls.from_pretrained(path, dtype=dtype).eval()
