"""A tiny random Qwen3.5-MoE vision-language checkpoint written by transformers (test-only oracle).

`build_tiny_vlm(out)` writes config.json, safetensors, preprocessor_config.json and the real tokenizer,
and returns the directory; `load_tiny_vlm(out, dtype)` loads it back with transformers. Every parameter
is randomised (LayerNorm weights and biases, pos_embed, the `1 + w` RMSNorms, A_log, dt_bias included)
so that a wrong convention anywhere changes the output.
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import torch
from hf_reference import randomise
from PIL import Image

FIXTURE_TOKENIZER = Path(__file__).resolve().parents[1] / "qwen35_lite" / "assets" / "tokenizer.json.gz"

TEXT = dict(
    vocab_size=248320,
    hidden_size=64,
    num_hidden_layers=4,  # layer_types default: 3 linear_attention + 1 full_attention
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
    linear_conv_kernel_dim=4,
    num_experts=8,
    num_experts_per_tok=3,
    moe_intermediate_size=16,
    shared_expert_intermediate_size=24,
    tie_word_embeddings=False,
    rope_parameters={
        "rope_type": "default",
        "rope_theta": 1e7,
        "partial_rotary_factor": 0.25,
        "mrope_section": [2, 1, 1],
        "mrope_interleaved": True,
    },
)
VISION = dict(
    depth=2,
    hidden_size=32,
    intermediate_size=48,
    num_heads=2,
    patch_size=16,
    temporal_patch_size=2,
    spatial_merge_size=2,
    out_hidden_size=64,
    num_position_embeddings=16,
)
# Small pixel bounds keep the test images (and so the patch counts) small.
PREPROCESSOR = {
    "image_processor_type": "Qwen2VLImageProcessor",
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "size": {"shortest_edge": 64 * 64, "longest_edge": 192 * 192},
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "resample": 3,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "do_convert_rgb": True,
}


def build_tiny_vlm(out: Path, seed: int = 0) -> Path:
    """Write the randomised tiny VLM (fp32) with preprocessor config and the real tokenizer into `out`."""
    from transformers import Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration

    out = Path(out)
    torch.manual_seed(seed)
    model = Qwen3_5MoeForConditionalGeneration(Qwen3_5MoeConfig(text_config=TEXT, vision_config=VISION))
    randomise(model, seed)
    model.save_pretrained(out)
    (out / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2))
    if FIXTURE_TOKENIZER.is_file():
        with gzip.open(FIXTURE_TOKENIZER, "rb") as src, open(out / "tokenizer.json", "wb") as dst:
            shutil.copyfileobj(src, dst)
    return out


def load_tiny_vlm(path: Path, dtype: torch.dtype = torch.float32):
    from transformers import Qwen3_5MoeForConditionalGeneration

    return Qwen3_5MoeForConditionalGeneration.from_pretrained(path, dtype=dtype).eval()


def reference_image_processor(path: Path):
    """transformers' PIL (slow) image processor configured from the checkpoint's preprocessor_config.json."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil.from_pretrained(path)


def make_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A deterministic image with smooth gradients plus noise (bicubic resampling then has real work)."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.linspace(0, 1, height)[:, None, None]
    x = torch.linspace(0, 1, width)[None, :, None]
    base = torch.cat([y * 255 * torch.ones_like(x), x * 255 * torch.ones_like(y), (x + y) * 127], dim=2)
    noisy = (base + 40 * torch.randn(height, width, 3, generator=gen)).clamp(0, 255).to(torch.uint8)
    rgb = Image.fromarray(noisy.numpy(), "RGB")
    if mode == "RGBA":
        alpha = (torch.rand(height, width, generator=gen) * 255).to(torch.uint8).numpy()
        rgb.putalpha(Image.fromarray(alpha, "L"))
        return rgb
    if mode == "P":
        return rgb.quantize(colors=32)
    return rgb.convert(mode)
