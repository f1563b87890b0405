"""The Qwen3.5 text model: resident weights, decoder layers, and a forward over explicit caches.

Only the always-used path is loaded here (embeddings, DeltaNet/attention weights, routers, shared
experts, norms, head); routed experts come from the ExpertProvider on demand.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from itertools import groupby

import torch

from ..kernels import compact, dequantized_once
from ..weights.checkpoint import Checkpoint
from ..weights.config import TextConfig
from .attention import Attention
from .cache import ModelCache
from .deltanet import GatedDeltaNet
from .fuse import prepare_layer, prepare_top
from .layers import MRoPE, add_rms_norm_1p, linear, rms_norm_1p
from .moe import DenseMLP, ExpertProvider, MoE
from .spill import SpilledLayers, stays_resident

PREFILL_CHUNK = 512  # tokens a mixer takes at once in a prefill: a multiple of the DeltaNet chunk (64),
# so chunk boundaries fall where a one-shot prefill puts them
PREFILL_BLOCK = 4096  # tokens a layer-by-layer prefill takes at once (the plan may lower it)

MIXER_KEYS = {
    "linear_attention": [
        "in_proj_qkv",
        "in_proj_z",
        "in_proj_b",
        "in_proj_a",
        "conv1d",
        "dt_bias",
        "A_log",
        "norm",
        "out_proj",
    ],
    "full_attention": ["q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"],
}
MOE_KEYS = [
    "gate",
    "shared_expert.gate_proj",
    "shared_expert.up_proj",
    "shared_expert.down_proj",
    "shared_expert_gate",
]
DENSE_KEYS = ["gate_proj", "up_proj", "down_proj"]


def _weight_name(prefix: str, key: str) -> str:
    # A_log and dt_bias are bare parameters; everything else is a module with a .weight
    return f"{prefix}{key}" if key in ("A_log", "dt_bias") else f"{prefix}{key}.weight"


def resident_names(cfg: TextConfig) -> list[str]:
    """Every tensor the model keeps resident (all but the routed experts), in load order."""
    names = ["embed_tokens.weight"]
    for i, kind in enumerate(cfg.layer_types):
        p = f"layers.{i}."
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        mixer = "linear_attn." if kind == "linear_attention" else "self_attn."
        names += [_weight_name(p + mixer, k) for k in MIXER_KEYS[kind]]
        names += [_weight_name(p + "mlp.", k) for k in (MOE_KEYS if cfg.is_moe else DENSE_KEYS)]
    names.append("norm.weight")
    if not cfg.tie_word_embeddings:
        names.append("lm_head.weight")
    return names


class DecoderLayer:
    def __init__(
        self, cfg: TextConfig, index: int, w: dict[str, torch.Tensor], provider: ExpertProvider | None
    ):
        self.kind = cfg.layer_types[index]
        self.eps = cfg.rms_norm_eps
        self.input_norm, self.post_norm = w["input_layernorm.scale"], w["post_attention_layernorm.scale"]
        if self.kind == "linear_attention":
            self.mixer = GatedDeltaNet(cfg, _sub(w, "linear_attn."))
        else:
            self.mixer = Attention(cfg, _sub(w, "self_attn."))
        mlp_w = _sub(w, "mlp.")
        self.mlp = MoE(cfg, index, mlp_w, provider) if cfg.is_moe else DenseMLP(mlp_w)

    def __call__(self, h: torch.Tensor, cache, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        mixed = self.mix(rms_norm_1p(h, self.input_norm, self.eps), cache, cos, sin)
        h, x = add_rms_norm_1p(h, mixed, self.post_norm, self.eps)
        return h + self.mlp(x)

    def mix(self, x: torch.Tensor, cache, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return self.mixer(x, cache) if self.kind == "linear_attention" else self.mixer(x, cos, sin, cache)

    def prefill(
        self, h: torch.Tensor, cache, cos: torch.Tensor, sin: torch.Tensor, chunk: int
    ) -> torch.Tensor:
        """The layer over a whole block of tokens h [T, D]: the mixer chunk by chunk (its state carried
        as in a chunked forward), then the MLP over the block, so a MoE layer asks for its experts once for
        the block (each read at most once) instead of once per chunk; every matmul still sees one chunk's
        rows, so the result has the bits of the chunked forward."""
        mixed = torch.empty_like(h)
        with dequantized_once():  # a packed weight dequantised once for the block, not once a chunk
            for s in range(0, h.shape[0], chunk):
                e = min(h.shape[0], s + chunk)
                mixed[s:e] = h[s:e] + self.mix(
                    rms_norm_1p(h[s:e], self.input_norm, self.eps), cache, cos[s:e], sin[s:e]
                )
            return mixed + self.mlp.prefill(rms_norm_1p(mixed, self.post_norm, self.eps), chunk)


def _by_layer(names: list[str]) -> Iterator[tuple[int | None, list[str]]]:
    """Consecutive names grouped by layer index (None for the tensors outside the layers)."""
    for layer, group in groupby(
        names, key=lambda n: int(n.split(".")[1]) if n.startswith("layers.") else None
    ):
        yield layer, list(group)


def _sub(w: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Sub-dict of the weights under `prefix`, with the prefix and the trailing `.weight` dropped."""
    return {k[len(prefix) :].removesuffix(".weight"): v for k, v in w.items() if k.startswith(prefix)}


class Qwen35Model:
    """Text decoder. `forward` takes ids or embeddings plus a ModelCache and returns logits."""

    def __init__(
        self,
        cfg: TextConfig,
        weights: dict[str, torch.Tensor],
        provider: ExpertProvider | None,
        device: torch.device,
        dtype: torch.dtype,
        spilled: SpilledLayers | None = None,
    ) -> None:
        self.cfg, self.device, self.dtype = cfg, device, dtype
        self.spilled = spilled  # layers whose weights are streamed in from host memory (spill.py)
        self.prefill_block = (
            PREFILL_BLOCK  # prompt tokens per layer-by-layer pass (the plan's, when loaded under one)
        )
        self.provider = provider  # the expert provider: generate reads its counters for the reply stats
        self.embed = weights.pop("embed_tokens.weight")  # stays on the CPU: it is only indexed
        self.norm = weights.pop("norm.scale")
        self.lm_head = weights.pop("lm_head.weight", None)
        self.layers = [
            DecoderLayer(cfg, i, _sub(weights, f"layers.{i}."), provider)
            for i in range(cfg.num_hidden_layers)
        ]
        self.rope = MRoPE(cfg.rotary_dim, cfg.rope_theta, cfg.mrope_section)
        for layer, nxt in zip(self.layers, self.layers[1:]):  # lookahead prefetch (moe.py)
            if isinstance(layer.mlp, MoE) and isinstance(nxt.mlp, MoE):
                layer.mlp.next_gate = nxt.mlp.w["gate"]

    @classmethod
    def load(
        cls,
        ckpt: Checkpoint,
        cfg: TextConfig,
        provider: ExpertProvider | None,
        device: torch.device,
        dtype: torch.dtype,
        on_progress: Callable[[int, int], None] | None = None,
        cpu_layers: Collection[int] = (),
    ) -> Qwen35Model:
        """cpu_layers: layers whose weights stay in host memory and are copied in as they run (the plan
        puts there what the GPU budget cannot hold). A Linear stored pack-quantized is held compact: read as
        stored, fused with its like, and built into the encoding its kernel runs on `device` in `dtype`."""
        names = resident_names(cfg)
        total = sum(ckpt.stored_nbytes(n) for n in names)
        weights, host, done = {}, {}, 0
        for layer, group in _by_layer(names):
            read = {}
            for name in group:
                read[name] = ckpt.read(name, dtype, packed=True)  # a packed Linear stays packed
                done += ckpt.stored_nbytes(name)
                if on_progress:
                    on_progress(done, total)
            # fused and precomputed on the host, before the device or a spilled layer's packing
            read = prepare_layer(f"layers.{layer}.", read) if layer is not None else prepare_top(read)
            for name, t in read.items():
                t = compact(t, device, dtype)  # a packed Linear in its kernel's encoding (kernels/choose.py)
                if layer in cpu_layers and not stays_resident(name):
                    host.setdefault(layer, {})[name] = t
                else:
                    weights[name] = t if name == "embed_tokens.weight" else t.to(device)
        if cfg.tie_word_embeddings:
            weights["lm_head.weight"] = weights["embed_tokens.weight"].to(device)
        spilled = SpilledLayers(host, device) if host else None
        for views in spilled.views.values() if spilled else ():
            weights.update(views)
        return cls(cfg, weights, provider, device, dtype, spilled)

    def make_cache(self) -> ModelCache:
        layers = [
            layer.mixer.make_state(self.dtype, self.device)
            if isinstance(layer.mixer, GatedDeltaNet)
            else layer.mixer.make_cache(self.dtype, self.device)
            for layer in self.layers
        ]
        return ModelCache(layers)

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed[ids.cpu()].to(self.device)

    @torch.inference_mode()
    def forward(
        self,
        cache: ModelCache,
        ids: torch.Tensor | None = None,
        embeds: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        all_logits: bool = False,
    ) -> torch.Tensor:
        """ids [T] (or embeds [T, D]) -> logits [T, V] (all_logits) or [1, V] for the last token.

        positions [3, T] are M-RoPE rows (t, h, w); by default every row is offset + rope_delta + arange(T).
        """
        h, cos, sin = self._inputs(cache, ids, embeds, positions)
        T = h.shape[0]
        for i, (layer, layer_cache) in enumerate(zip(self.layers, cache.layers)):
            if self.spilled is not None and i in self.spilled:
                self.spilled.before(i)
            h = layer(h, layer_cache, cos, sin)
        cache.offset += T
        return self.head(h if all_logits else h[-1:])

    @torch.inference_mode()
    def prefill(
        self,
        cache: ModelCache,
        ids: torch.Tensor | None = None,
        embeds: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        on_layer: Callable[[int, int], None] | None = None,
    ) -> torch.Tensor:
        """A block of prompt tokens layer by layer: all of them through layer l before layer l + 1
        (attention and DeltaNet chunked inside the layer at PREFILL_CHUNK, where `forward` would cut the
        block), so each MoE layer fetches its experts once for the block. Same inputs and result as
        `forward` (logits of the last position [1, V]); on_layer(done, layers) after each layer."""
        h, cos, sin = self._inputs(cache, ids, embeds, positions)
        T = h.shape[0]
        for i, (layer, layer_cache) in enumerate(zip(self.layers, cache.layers)):
            if self.spilled is not None and i in self.spilled:
                self.spilled.before(i)
            h = layer.prefill(h, layer_cache, cos, sin, PREFILL_CHUNK)
            if on_layer:
                on_layer(i + 1, len(self.layers))
        cache.offset += T
        return self.head(h[-1:])

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and lm_head: h [T, D] -> logits [T, V] (one row: torch.mv, about twice as fast as
        F.linear's path for the [V, D] matrix on an AMX Xeon: 2.2 vs 4.3 ms for V = 32768, D = 1024)."""
        return linear(rms_norm_1p(h, self.norm, self.cfg.rms_norm_eps), self.lm_head)

    def _inputs(
        self, cache: ModelCache, ids, embeds, positions
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(h [T, D], cos, sin): the ids' embedding rows (or the given embeddings) and the M-RoPE tables of
        their positions [3, T] (the given ones, else offset + rope_delta + arange(T) in every row)."""
        h = self.embed_ids(ids) if embeds is None else embeds.to(self.device, self.dtype)
        T = h.shape[0]
        if positions is None:
            start = cache.offset + cache.rope_delta
            positions = torch.arange(start, start + T, device=self.device).expand(3, T)
        cos, sin = self.rope.cos_sin(positions.to(self.device), self.dtype)
        return h, cos, sin
