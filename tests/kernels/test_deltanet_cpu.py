"""The fused DeltaNet decode step (kernels/deltanet_cpu.py) against the layer's torch step (model/deltanet.py,
`_decode` and the gated norm) on random weights and inputs: outputs, recurrent state and conv window."""

from __future__ import annotations

import pytest
import torch

from qwen35_lite.kernels import deltanet_cpu
from qwen35_lite.model.deltanet import GatedDeltaNet
from qwen35_lite.model.fuse import prepare_layer
from qwen35_lite.weights.config import TextConfig

pytestmark = pytest.mark.skipif(deltanet_cpu.library() is None, reason="no C compiler")

PROMPT, STEPS = 7, 5


def _layer(hk: int, hv: int, dk: int, dv: int, dtype: torch.dtype, norm_dtype: torch.dtype, seed: int):
    cfg = TextConfig(
        hidden_size=hv * dv,  # out_proj is the identity: the layer returns the step's output as it is
        linear_num_key_heads=hk,
        linear_num_value_heads=hv,
        linear_key_head_dim=dk,
        linear_value_head_dim=dv,
        num_hidden_layers=4,
        vocab_size=64,
    )
    D, C, K = cfg.hidden_size, 2 * hk * dk + hv * dv, cfg.linear_conv_kernel_dim
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "in_proj_qkv.weight": (C, D),
        "in_proj_z.weight": (hv * dv, D),
        "in_proj_b.weight": (hv, D),
        "in_proj_a.weight": (hv, D),
        "conv1d.weight": (C, 1, K),
        "dt_bias": (hv,),
        "A_log": (hv,),
        "norm.weight": (dv,),
        "out_proj.weight": (D, hv * dv),
    }
    raw = {f"layers.0.linear_attn.{k}": torch.randn(*s, generator=g) * 0.3 for k, s in shapes.items()}
    raw = {k: v.to(norm_dtype if k.endswith("norm.weight") else dtype) for k, v in raw.items()}
    raw["layers.0.linear_attn.norm.weight"] += 1
    raw["layers.0.linear_attn.out_proj.weight"] = torch.eye(D, dtype=dtype)
    for norm in ("input_layernorm", "post_attention_layernorm"):
        raw[f"layers.0.{norm}.weight"] = torch.zeros(D, dtype=dtype)
    w = prepare_layer("layers.0.", raw)
    p = "layers.0.linear_attn."
    return cfg, GatedDeltaNet(
        cfg, {k[len(p) :].removesuffix(".weight"): v for k, v in w.items() if k.startswith(p)}
    )


@pytest.mark.parametrize(
    "hk, hv, dk, dv, threads",
    [(2, 6, 16, 24, 1), (1, 3, 5, 37, 1), (4, 8, 128, 128, 2), (2, 4, 64, 96, 2)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_step_equals_the_torch_step(monkeypatch, hk, hv, dk, dv, threads, dtype):
    cfg, layer = _layer(hk, hv, dk, dv, dtype, dtype, seed=hv * dk + dv)
    xs = torch.randn(PROMPT + STEPS, cfg.hidden_size, generator=torch.Generator().manual_seed(3)).to(dtype)
    fast, ref = (layer.make_state(dtype, torch.device("cpu")) for _ in range(2))
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            layer(xs[:PROMPT], fast)
            layer(xs[:PROMPT], ref)
            for t in range(PROMPT, PROMPT + STEPS):
                got = layer(xs[t : t + 1], fast)
                with monkeypatch.context() as m:
                    m.setattr(deltanet_cpu, "library", lambda: None)  # the torch step
                    want = layer(xs[t : t + 1], ref)
                _close(got, want, dtype)
                torch.testing.assert_close(fast.recurrent, ref.recurrent, rtol=1e-4, atol=1e-5)
                assert torch.equal(fast.conv, ref.conv)
    finally:
        torch.set_num_threads(saved)


def test_fp32_norm_weight_in_a_bf16_layer_is_not_rounded(monkeypatch):
    """A norm weight kept in fp32 multiplies the bf16 normalised output in fp32 (no rounding there), as
    torch's promotion does; a bf16 weight rounds the product."""
    cfg, layer = _layer(2, 4, 32, 32, torch.bfloat16, torch.float32, seed=5)
    xs = torch.randn(PROMPT + 1, cfg.hidden_size, generator=torch.Generator().manual_seed(4)).bfloat16()
    fast, ref = (layer.make_state(torch.bfloat16, torch.device("cpu")) for _ in range(2))
    with torch.inference_mode():
        layer(xs[:PROMPT], fast)
        layer(xs[:PROMPT], ref)
        got = layer(xs[PROMPT:], fast)
        monkeypatch.setattr(deltanet_cpu, "library", lambda: None)
        _close(got, layer(xs[PROMPT:], ref), torch.bfloat16)


def test_the_layer_takes_the_kernel_for_one_token_after_the_first(monkeypatch):
    calls = []
    real = deltanet_cpu.deltanet_step
    monkeypatch.setattr(deltanet_cpu, "deltanet_step", lambda *a: calls.append(1) or real(*a))
    cfg, layer = _layer(2, 4, 16, 16, torch.float32, torch.float32, seed=6)
    state = layer.make_state(torch.float32, torch.device("cpu"))
    xs = torch.randn(4, cfg.hidden_size)
    with torch.inference_mode():
        layer(xs[:1], state)  # the first token: the chunked rule from zeros
        layer(xs[1:3], state)  # two tokens: chunked
        assert calls == []
        layer(xs[3:], state)
    assert calls == [1]


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    else:  # a bf16 rounding may flip where an fp32 sum ran in another order: one step, rarely
        torch.testing.assert_close(got, want, rtol=2**-7, atol=1e-2)
        assert (got != want).float().mean() < 0.02
