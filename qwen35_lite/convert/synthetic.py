"""Write a random-weight Qwen3.5-MoE checkpoint in the official layout, of any size, with no download.

Every tensor is random, norm weights and A_log/dt_bias included (zero norm weights would hide a missing
`1 + w`). Shards are written one at a time, so a checkpoint far larger than RAM can be produced.
The real Qwen3.5 tokenizer and our chat template are copied in, so ids and templates are the real ones.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..runtime.user_files import default_file_mode
from ..weights.fp8 import FP8_CONFIG, quantize_block

ASSETS = Path(__file__).resolve().parents[1] / "assets"
PREFIX = "model.language_model."


@dataclass
class SyntheticSpec:
    hidden_size: int = 64
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    linear_num_key_heads: int = 2
    linear_num_value_heads: int = 4
    linear_key_head_dim: int = 16
    linear_value_head_dim: int = 16
    linear_conv_kernel_dim: int = 4
    num_experts: int = 8
    num_experts_per_tok: int = 3
    moe_intermediate_size: int = 32
    shared_expert_intermediate_size: int = 32
    vocab_size: int = 248320
    full_attention_interval: int = 4
    max_position_embeddings: int = 32768

    def text_config(self) -> dict:
        d = asdict(self)
        d.update(
            model_type="qwen3_5_moe_text",
            hidden_act="silu",
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
            layer_types=[
                "full_attention" if (i + 1) % self.full_attention_interval == 0 else "linear_attention"
                for i in range(self.num_hidden_layers)
            ],
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 1e7,
                "partial_rotary_factor": 0.25,
                "mrope_section": _mrope_section(self.head_dim),
                "mrope_interleaved": True,
            },
        )
        return d

    def expert_bytes(self, dtype_size: int = 2) -> int:
        return 3 * self.hidden_size * self.moe_intermediate_size * dtype_size


def checkpoint_bytes(spec: SyntheticSpec, dtype_size: int = 2) -> int:
    """About what write_checkpoint puts on disk (headers aside): every weight at `dtype_size` bytes."""
    D, V, L = spec.hidden_size, spec.vocab_size, spec.num_hidden_layers
    H, Hkv, hd = spec.num_attention_heads, spec.num_key_value_heads, spec.head_dim
    hk, hv = spec.linear_num_key_heads, spec.linear_num_value_heads
    conv = 2 * hk * spec.linear_key_head_dim + hv * spec.linear_value_head_dim
    attention = (H * hd * 3 + 2 * Hkv * hd) * D + 2 * hd
    linear = (conv + 2 * hv * spec.linear_value_head_dim + 2 * hv) * D + conv * spec.linear_conv_kernel_dim
    shared = 3 * spec.shared_expert_intermediate_size * D + (spec.num_experts + 3) * D
    full = L // spec.full_attention_interval
    per_layer = shared + spec.num_experts * spec.expert_bytes(1)
    return (2 * V * D + D + L * per_layer + full * attention + (L - full) * linear) * dtype_size


def peak_ram_bytes(spec: SyntheticSpec, dtype_size: int, shard_bytes: int) -> int:
    """About the RAM write_checkpoint peaks at: the largest tensor drawn in fp32 and converted, or one layer's
    experts and their copy, plus a shard held for writing and its serialised copy."""
    embedding = spec.vocab_size * spec.hidden_size * (4 + dtype_size)
    experts = 2 * spec.num_experts * spec.expert_bytes(dtype_size)
    return max(embedding, experts) + 2 * min(shard_bytes, checkpoint_bytes(spec, dtype_size))


def _mrope_section(head_dim: int) -> list[int]:
    """Split the rotary frequency slots (head_dim/8) into t/h/w sections the way 11/11/10 splits 32."""
    n = int(head_dim * 0.25) // 2
    h = w = n // 3 if n >= 3 else 0
    return [n - h - w, h, w]


def _tensor(shape: tuple[int, ...], gen: torch.Generator, scale: float, mean: float = 0.0) -> torch.Tensor:
    return torch.randn(shape, generator=gen) * scale + mean


def resident_tensors(spec: SyntheticSpec, gen: torch.Generator) -> Iterator[tuple[str, torch.Tensor]]:
    """Every non-expert tensor in HF naming, randomised, in fp32."""
    D, V = spec.hidden_size, spec.vocab_size
    yield PREFIX + "embed_tokens.weight", _tensor((V, D), gen, 1.0)
    yield "lm_head.weight", _tensor((V, D), gen, 1 / math.sqrt(D))
    yield PREFIX + "norm.weight", _tensor((D,), gen, 0.1)
    for i, kind in enumerate(spec.text_config()["layer_types"]):
        p = f"{PREFIX}layers.{i}."
        yield p + "input_layernorm.weight", _tensor((D,), gen, 0.1)
        yield p + "post_attention_layernorm.weight", _tensor((D,), gen, 0.1)
        yield from _mixer_tensors(spec, kind, p, gen)
        m = p + "mlp."
        I = spec.shared_expert_intermediate_size
        yield m + "gate.weight", _tensor((spec.num_experts, D), gen, 1 / math.sqrt(D))
        yield m + "shared_expert.gate_proj.weight", _tensor((I, D), gen, 1 / math.sqrt(D))
        yield m + "shared_expert.up_proj.weight", _tensor((I, D), gen, 1 / math.sqrt(D))
        yield m + "shared_expert.down_proj.weight", _tensor((D, I), gen, 1 / math.sqrt(I))
        yield m + "shared_expert_gate.weight", _tensor((1, D), gen, 1 / math.sqrt(D))


def _mixer_tensors(spec: SyntheticSpec, kind: str, p: str, gen: torch.Generator):
    D, s = spec.hidden_size, 1 / math.sqrt(spec.hidden_size)
    if kind == "full_attention":
        H, Hkv, hd = spec.num_attention_heads, spec.num_key_value_heads, spec.head_dim
        a = p + "self_attn."
        yield a + "q_proj.weight", _tensor((H * hd * 2, D), gen, s)
        yield a + "k_proj.weight", _tensor((Hkv * hd, D), gen, s)
        yield a + "v_proj.weight", _tensor((Hkv * hd, D), gen, s)
        yield a + "o_proj.weight", _tensor((D, H * hd), gen, 1 / math.sqrt(H * hd))
        yield a + "q_norm.weight", _tensor((hd,), gen, 0.1)
        yield a + "k_norm.weight", _tensor((hd,), gen, 0.1)
        return
    hk, hv = spec.linear_num_key_heads, spec.linear_num_value_heads
    dk, dv = spec.linear_key_head_dim, spec.linear_value_head_dim
    conv = 2 * hk * dk + hv * dv
    a = p + "linear_attn."
    yield a + "in_proj_qkv.weight", _tensor((conv, D), gen, s)
    yield a + "in_proj_z.weight", _tensor((hv * dv, D), gen, s)
    yield a + "in_proj_b.weight", _tensor((hv, D), gen, s)
    yield a + "in_proj_a.weight", _tensor((hv, D), gen, s)
    yield a + "conv1d.weight", _tensor((conv, 1, spec.linear_conv_kernel_dim), gen, 0.5)
    yield a + "dt_bias", _tensor((hv,), gen, 0.5)
    yield a + "A_log", torch.rand((hv,), generator=gen) * 2 - 1
    yield a + "norm.weight", _tensor((dv,), gen, 0.1, mean=1.0)
    yield a + "out_proj.weight", _tensor((D, hv * dv), gen, 1 / math.sqrt(hv * dv))


def _random_rows(
    shape: tuple[int, ...], gen: torch.Generator, scale: float, dtype: torch.dtype
) -> torch.Tensor:
    """N(0, scale²) of `shape` in `dtype`, the leading rows drawn on all cores: one seed per row from `gen`
    (so the result depends on `gen` alone), generated and rounded in a thread each (torch releases the
    GIL). A 60 GB checkpoint is ~30 G random numbers: one core draws ~160 M/s."""
    seeds = torch.randint(0, 2**62, (shape[0],), generator=gen).tolist()
    out = torch.empty(shape, dtype=dtype)

    def fill(i: int) -> None:
        row = torch.randn(shape[1:], generator=torch.Generator().manual_seed(seeds[i]))
        out[i].copy_(row.mul_(scale))

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(fill, range(shape[0])))
    return out


def expert_tensors(
    spec: SyntheticSpec, layer: int, gen: torch.Generator, fused: bool, dtype: torch.dtype = torch.float32
):
    """One layer's routed experts, fused [E, 2I, D] / [E, D, I] or per-expert, in `dtype`."""
    E, D, I = spec.num_experts, spec.hidden_size, spec.moe_intermediate_size
    gate_up = _random_rows((E, 2 * I, D), gen, 1 / math.sqrt(D), dtype)
    down = _random_rows((E, D, I), gen, 1 / math.sqrt(I), dtype)
    m = f"{PREFIX}layers.{layer}.mlp.experts."
    if fused:
        yield m + "gate_up_proj", gate_up
        yield m + "down_proj", down
        return
    for e in range(E):
        yield f"{m}{e}.gate_proj.weight", gate_up[e, :I]
        yield f"{m}{e}.up_proj.weight", gate_up[e, I:]
        yield f"{m}{e}.down_proj.weight", down[e]


def fp8_block_experts(tensors: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Per-expert weights -> the official FP8 release's layout (weights.fp8.quantize_block)."""
    for name, w in tensors:
        q, scale = quantize_block(w)
        yield name, q
        yield name + "_scale_inv", scale


def write_checkpoint(
    out: Path,
    spec: SyntheticSpec,
    *,
    dtype: torch.dtype = torch.bfloat16,
    fused: bool = True,
    fp8_experts: bool = False,
    shard_bytes: int = 2 << 30,
    seed: int = 0,
    on_progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write the checkpoint to `out` (created); return it. Progress is reported in layers written.

    The weights of a checkpoint already in `out` (its shards and index) are removed first, so none of its
    shards is left behind beside the new ones; other files are left alone or overwritten.
    fp8_experts: the routed experts per expert in block-128 FP8 (the official FP8 release's layout).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    remove_weights(out)
    gen = torch.Generator().manual_seed(seed)
    writer = _ShardWriter(out, shard_bytes)
    for name, t in resident_tensors(spec, gen):
        keep_fp32 = name.endswith(("A_log", "linear_attn.norm.weight"))  # as the official release stores them
        writer.add(name, t.to(torch.float32 if keep_fp32 else dtype))
    for layer in range(spec.num_hidden_layers):
        experts = expert_tensors(spec, layer, gen, fused and not fp8_experts, dtype)
        for name, t in fp8_block_experts(experts) if fp8_experts else experts:
            writer.add(name, t.contiguous())
        if on_progress:
            on_progress(layer + 1, spec.num_hidden_layers)
    writer.finish()
    _write_metadata(out, spec, dtype, FP8_CONFIG if fp8_experts else None)
    return out


def remove_weights(directory: Path) -> None:
    """Delete the safetensors shards and index of the checkpoint in `directory` (nothing else)."""
    for path in [*directory.glob("*.safetensors"), directory / "model.safetensors.index.json"]:
        if path.is_file() or path.is_symlink():
            path.unlink()


class _ShardWriter:
    """Accumulate tensors and flush a shard whenever it reaches the size limit, then write the index."""

    def __init__(self, out: Path, shard_bytes: int) -> None:
        self.out, self.limit = out, shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.size = 0
        self.shards: list[dict[str, torch.Tensor]] = []
        self.weight_map: dict[str, str] = {}
        self.count = 0
        self.total = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        if self.pending and self.size + nbytes > self.limit:
            self._flush()
        self.pending[name] = t.contiguous().clone()
        self.size += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        self.count += 1
        fname = f"model-{self.count:05d}.safetensors"
        path = self.out / fname
        save_file(self.pending, str(path), metadata={"format": "pt"})
        os.chmod(path, default_file_mode())  # safetensors creates 0600; the other files get 0644
        self.weight_map.update({n: fname for n in self.pending})
        self.pending, self.size = {}, 0

    def finish(self) -> None:
        if self.pending:
            self._flush()
        # Rename to the HF convention model-0000i-of-0000n.safetensors now that n is known.
        renames = {
            f"model-{i:05d}.safetensors": f"model-{i:05d}-of-{self.count:05d}.safetensors"
            for i in range(1, self.count + 1)
        }
        for old, new in renames.items():
            (self.out / old).rename(self.out / new)
        index = {
            "metadata": {"total_size": self.total},
            "weight_map": {n: renames[f] for n, f in sorted(self.weight_map.items())},
        }
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _write_metadata(out: Path, spec: SyntheticSpec, dtype: torch.dtype, quantization: dict | None) -> None:
    config = {
        "architectures": ["Qwen3_5MoeForConditionalGeneration"],
        "model_type": "qwen3_5_moe",
        "text_config": spec.text_config(),
        "tie_word_embeddings": False,
        "image_token_id": 248056,
        "video_token_id": 248057,
        "vision_start_token_id": 248053,
        "vision_end_token_id": 248054,
        "dtype": str(dtype).removeprefix("torch."),
    }
    if quantization:
        config["quantization_config"] = quantization
    (out / "config.json").write_text(json.dumps(config, indent=2))
    generation = {
        "bos_token_id": 248044,
        "pad_token_id": 248044,
        "eos_token_id": [248046, 248044],
        "do_sample": True,
        "temperature": 0.6,
        "top_p": 0.95,
        "top_k": 20,
    }
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    with gzip.open(ASSETS / "tokenizer.json.gz", "rb") as src, open(out / "tokenizer.json", "wb") as dst:
        shutil.copyfileobj(src, dst)
    template = ASSETS / "chat_template.jinja"
    if template.is_file():
        shutil.copy(template, out / "chat_template.jinja")
    tok_config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "model_max_length": spec.max_position_embeddings,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
