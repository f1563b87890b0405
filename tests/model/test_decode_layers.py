"""The layers as loaded (projections fused and constants precomputed by model/fuse.py, fast decode
kernels) against the same layers written out from the checkpoint's tensors as transformers computes them:
a short prefill, then decode steps, in fp32 and bf16."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qwen35_lite.model.attention import Attention, _attend_reference
from qwen35_lite.model.deltanet import (
    GatedDeltaNet,
    causal_conv_reference,
    chunk_gated_delta_rule,
    l2norm,
    recurrent_gated_delta_rule,
)
from qwen35_lite.model.fuse import prepare_layer
from qwen35_lite.model.layers import (
    MRoPE,
    apply_rope_reference,
    gated_rms_norm_reference,
    rms_norm_1p_reference,
)
from qwen35_lite.weights.config import TextConfig

CFG = TextConfig(
    hidden_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    linear_num_key_heads=2,
    linear_num_value_heads=6,  # GQA ratio 3
    linear_key_head_dim=16,
    linear_value_head_dim=24,
    partial_rotary_factor=0.5,
    mrope_section=[4, 2, 2],
    num_hidden_layers=4,
    vocab_size=64,
)
PROMPT, STEPS = 5, 4


def _weights(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: (torch.randn(*shape, generator=g) * 0.2).to(dtype) for name, shape in shapes.items()}


def _loaded(raw: dict[str, torch.Tensor], mixer: str) -> dict[str, torch.Tensor]:
    """What Qwen35Model.load hands the mixer: the layer prepared, then cut down to the mixer's keys."""
    w = prepare_layer("layers.0.", {f"layers.0.{k}": v for k, v in raw.items()})
    p = f"layers.0.{mixer}."
    return {k[len(p) :].removesuffix(".weight"): v for k, v in w.items() if k.startswith(p)}


def _compare(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    else:  # bf16 roundings may flip where fp32 sums run in another order
        torch.testing.assert_close(got, want, rtol=0.03, atol=0.01)
        assert (got != want).float().mean() < 0.2


def _deltanet_raw(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    hk, hv, dk, dv, D = 2, 6, 16, 24, CFG.hidden_size
    C = 2 * hk * dk + hv * dv
    shapes = {
        "in_proj_qkv.weight": (C, D),
        "in_proj_z.weight": (hv * dv, D),
        "in_proj_b.weight": (hv, D),
        "in_proj_a.weight": (hv, D),
        "conv1d.weight": (C, 1, CFG.linear_conv_kernel_dim),
        "dt_bias": (hv,),
        "A_log": (hv,),
        "norm.weight": (dv,),
        "out_proj.weight": (D, hv * dv),
    }
    raw = {f"linear_attn.{k}": v for k, v in _weights(shapes, dtype, 1).items()}
    raw["linear_attn.norm.weight"] = raw["linear_attn.norm.weight"] + 1
    for norm in ("input_layernorm.weight", "post_attention_layernorm.weight"):
        raw[norm] = torch.zeros(D, dtype=dtype)
    return raw


class _DeltaNetWrittenOut:
    """transformers' Gated DeltaNet from the checkpoint's tensors: four projections, the conv in the model
    dtype, repeat_interleave for GQA, the token-by-token recurrence after the chunked prefill."""

    def __init__(self, raw: dict[str, torch.Tensor]) -> None:
        self.w = {k.removeprefix("linear_attn.").removesuffix(".weight"): v for k, v in raw.items()}
        self.conv: torch.Tensor | None = None
        self.state = torch.zeros(6, 16, 24)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        w, T, hk, hv, dk, dv = self.w, x.shape[0], 2, 6, 16, 24
        qkv = F.linear(x, w["in_proj_qkv"]).T  # [C, T]
        window = torch.cat([self.conv if self.conv is not None else qkv.new_zeros(qkv.shape[0], 3), qkv], -1)
        self.conv = window[:, -3:]
        mixed = F.silu(causal_conv_reference(window, w["conv1d"])).T  # [T, C]
        q, k, v = mixed.split([hk * dk, hk * dk, hv * dv], dim=-1)
        q = l2norm(q.reshape(T, hk, dk).repeat_interleave(3, dim=1).transpose(0, 1).float()) * dk**-0.5
        k = l2norm(k.reshape(T, hk, dk).repeat_interleave(3, dim=1).transpose(0, 1).float())
        v = v.reshape(T, hv, dv).transpose(0, 1).float()
        beta = F.linear(x, w["in_proj_b"]).sigmoid().T.float()
        g = (-w["A_log"].float().exp() * F.softplus(F.linear(x, w["in_proj_a"]).float() + w["dt_bias"])).T
        rule = recurrent_gated_delta_rule if T == 1 else chunk_gated_delta_rule
        o, self.state = rule(q, k, v, g.contiguous(), beta.contiguous(), self.state)
        z = F.linear(x, w["in_proj_z"]).view(T, hv, dv)
        o = gated_rms_norm_reference(o.to(x.dtype).transpose(0, 1), z, w["norm"], 1e-6).reshape(T, -1)
        return F.linear(o, w["out_proj"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deltanet_as_loaded_equals_the_written_out_layer(dtype):
    raw = _deltanet_raw(dtype)
    layer, ref = GatedDeltaNet(CFG, _loaded(raw, "linear_attn")), _DeltaNetWrittenOut(raw)
    state = layer.make_state(dtype, torch.device("cpu"))
    xs = torch.randn(PROMPT + STEPS, CFG.hidden_size, generator=torch.Generator().manual_seed(2)).to(dtype)
    with torch.inference_mode():
        _compare(layer(xs[:PROMPT], state), ref(xs[:PROMPT]), dtype)
        for t in range(PROMPT, PROMPT + STEPS):  # decode: the in-place step and the sliding conv window
            _compare(layer(xs[t : t + 1], state), ref(xs[t : t + 1]), dtype)
        torch.testing.assert_close(state.recurrent, ref.state, rtol=1e-3, atol=1e-3)
        # the window keeps K inputs, the conv reads K - 1; one fused matmul may sum in another order
        torch.testing.assert_close(state.conv[:, 1:], ref.conv, rtol=1e-5, atol=1e-6)


def _attention_raw(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    H, Hkv, hd, D = CFG.num_attention_heads, CFG.num_key_value_heads, CFG.head_dim, CFG.hidden_size
    shapes = {
        "q_proj.weight": (2 * H * hd, D),
        "k_proj.weight": (Hkv * hd, D),
        "v_proj.weight": (Hkv * hd, D),
        "o_proj.weight": (D, H * hd),
        "q_norm.weight": (hd,),
        "k_norm.weight": (hd,),
    }
    raw = {f"self_attn.{k}": v for k, v in _weights(shapes, dtype, 3).items()}
    for norm in ("input_layernorm.weight", "post_attention_layernorm.weight"):
        raw[norm] = torch.zeros(D, dtype=dtype)
    return raw


def _attention_written_out(raw, x, cos, sin, past_kv):
    """transformers' gated attention from the checkpoint's tensors (q_proj interleaving query and gate per
    head); past_kv is the list of (k, v) so far, appended to."""
    w = {k.removeprefix("self_attn.").removesuffix(".weight"): v for k, v in raw.items()}
    T, H, Hkv, hd = x.shape[0], CFG.num_attention_heads, CFG.num_key_value_heads, CFG.head_dim
    q, gate = F.linear(x, w["q_proj"]).view(T, H, 2 * hd).chunk(2, dim=-1)
    q = rms_norm_1p_reference(q, w["q_norm"], 1e-6).transpose(0, 1)
    k = rms_norm_1p_reference(F.linear(x, w["k_proj"]).view(T, Hkv, hd), w["k_norm"], 1e-6).transpose(0, 1)
    v = F.linear(x, w["v_proj"]).view(T, Hkv, hd).transpose(0, 1)
    q, k = apply_rope_reference(q, cos, sin), apply_rope_reference(k, cos, sin)
    past = sum(kk.shape[1] for kk, _ in past_kv)
    past_kv.append((k, v))
    keys, values = (torch.cat(parts, dim=1) for parts in zip(*past_kv))
    o = _attend_reference(q, keys, values, past).transpose(0, 1).reshape(T, H * hd)
    return F.linear(o * torch.sigmoid(gate.reshape(T, H * hd)), w["o_proj"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_as_loaded_equals_the_written_out_layer(dtype):
    raw = _attention_raw(dtype)
    layer = Attention(CFG, _loaded(raw, "self_attn"))
    cache, past_kv = layer.make_cache(dtype, torch.device("cpu")), []
    rope = MRoPE(CFG.rotary_dim, CFG.rope_theta, CFG.mrope_section)
    xs = torch.randn(PROMPT + STEPS, CFG.hidden_size, generator=torch.Generator().manual_seed(4)).to(dtype)
    spans = [(0, PROMPT)] + [(t, t + 1) for t in range(PROMPT, PROMPT + STEPS)]
    with torch.inference_mode():
        for s, e in spans:
            positions = torch.arange(s, e).expand(3, e - s)
            cos, signed_sin = rope.cos_sin(positions, dtype)
            sin = signed_sin.clone()
            sin[:, : sin.shape[1] // 2] *= -1  # the plain sin, as transformers uses it
            want = _attention_written_out(raw, xs[s:e], cos, sin, past_kv)
            _compare(layer(xs[s:e], cos, signed_sin, cache), want, dtype)
