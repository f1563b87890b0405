"""Fast kernels against the simple versions kept beside them: bit-identical on the CPU where the order of
the arithmetic is the same, within fp32 rounding where it is not."""

from __future__ import annotations

import pytest
import torch

from qwen35_lite.experts.dispatch import (
    dispatch_decode,
    dispatch_grouped,
    dispatch_reference,
    dispatch_stacked,
)
from qwen35_lite.experts.formats import DenseExpert, DenseFormat
from qwen35_lite.experts.slots import SlotTier
from qwen35_lite.experts.stacks import stack_parts
from qwen35_lite.model.attention import _attend, _attend_reference
from qwen35_lite.model.deltanet import (
    causal_conv,
    causal_conv_reference,
    decode_gated_delta_rule,
    l2norm,
    recurrent_gated_delta_rule,
)
from qwen35_lite.model.fuse import norm_scale
from qwen35_lite.model.layers import (
    MRoPE,
    apply_rope_,
    apply_rope_reference,
    gated_rms_norm,
    gated_rms_norm_reference,
    rms_norm_1p,
    rms_norm_1p_reference,
    rms_normalize,
)
from qwen35_lite.model.moe import route, route_reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", [(8, 2, 128), (4, 1, 16), (4, 4, 32)])
@pytest.mark.parametrize("T,past", [(1, 0), (1, 37), (32, 0), (70, 0), (5, 40), (64, 512)])
def test_gqa_attention_equals_expanded_kv(dtype, heads, T, past):
    H, Hkv, hd = heads
    g = torch.Generator().manual_seed(T + past)
    q = torch.randn(H, T, hd, generator=g).to(dtype)
    k, v = (torch.randn(Hkv, past + T, hd, generator=g).to(dtype) for _ in range(2))
    assert torch.equal(_attend(q, k, v, past), _attend_reference(q, k, v, past))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("C,T", [(96, 5), (2048, 32), (3072, 70), (512, 512)])
def test_fp32_causal_conv_equals_model_dtype_conv(dtype, C, T):
    g = torch.Generator().manual_seed(C + T)
    window = torch.randn(C, 3 + T, generator=g).to(dtype)
    weight = (torch.randn(C, 1, 4, generator=g) * 0.5).to(dtype)
    assert torch.equal(causal_conv(window, weight), causal_conv_reference(window, weight))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("E,A,D,I", [(16, 4, 64, 32), (512, 10, 256, 64)])
def test_decode_dispatch_equals_grouped(dtype, E, A, D, I):
    g = torch.Generator().manual_seed(E + A)
    experts = {
        e: DenseExpert(torch.randn(2 * I, D, generator=g).to(dtype), torch.randn(D, I, generator=g).to(dtype))
        for e in range(E)
    }
    for step in range(20):
        x = torch.randn(1, D, generator=g).to(dtype)
        ids = torch.randperm(E, generator=g)[:A][None]  # [1, A] distinct, in router (not id) order
        weights = torch.rand(1, A, generator=g)
        weights = (weights / weights.sum()).to(dtype)
        want = dispatch_grouped(x, weights, ids, experts)
        assert torch.equal(dispatch_decode(x, weights, ids, experts), want)
        if step == 0:
            ref = dispatch_reference(x, weights, ids, experts)
            torch.testing.assert_close(want, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("E,A,D,I", [(16, 4, 64, 32), (512, 10, 256, 64)])
def test_stacked_slots_dispatch_equals_one_by_one(dtype, E, A, D, I):
    """The decode path over a layer's slot buffer (one gather + one batched matmul per projection, slots
    picked by index) against the experts bound to the same slots, run one by one (dispatch_decode).
    Batched and single matmuls may sum in another order on some CPUs: a tolerance, not bit equality."""
    fmt = DenseFormat(D, I, dtype, dtype, fused=True)
    tier = SlotTier("ram", fmt, 1, E, lambda: None, lambda n: torch.empty(n, dtype=torch.uint8))
    g = torch.Generator().manual_seed(E + A)
    gate_up, down = torch.randn(E, 2 * I, D, generator=g), torch.randn(E, D, I, generator=g) / 4
    slot_of_expert = torch.randperm(E, generator=g)  # experts sit in slots in no particular order
    for e in range(E):
        fmt.prepare([gate_up[e].to(dtype), down[e].to(dtype)], tier.pools[0].slots[int(slot_of_expert[e])])
    experts = {e: tier.experts[0][int(slot_of_expert[e])] for e in range(E)}
    stack = tier.stacks[0]
    eps = 1e-5 if dtype == torch.float32 else 1e-2  # relative to the output's scale (sums cancel)
    for _ in range(10):
        x = torch.randn(1, D, generator=g).to(dtype)
        ids = torch.randperm(E, generator=g)[:A][None]
        weights = torch.softmax(torch.randn(1, A, generator=g), -1).to(dtype)
        want = dispatch_decode(x, weights, ids, experts)
        got = dispatch_stacked(x, weights, slot_of_expert[ids[0]], stack)
        torch.testing.assert_close(got, want, atol=eps * float(want.abs().max()), rtol=eps)


def test_stacked_views_are_the_bound_slots():
    fmt = DenseFormat(64, 32, torch.bfloat16, torch.bfloat16, fused=True)
    tier = SlotTier(
        "ram", fmt, 1, 5, lambda: None, lambda n: torch.randn(n // 2, dtype=torch.bfloat16).view(torch.uint8)
    )
    gate_up, down = stack_parts(fmt.slot, tier.buffers[0], 5, tier.buffers[0].numel() // 5)
    for s in range(5):
        assert torch.equal(gate_up[s], tier.experts[0][s].gate_up)
        assert torch.equal(down[s], tier.experts[0][s].down)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_route_by_top_logits_equals_the_reference_order(dtype):
    """Softmax over the top-k logits = top-k of the softmax, renormalised: same experts, same weights up
    to fp32 rounding (then the cast)."""
    g = torch.Generator().manual_seed(7)
    x, w = torch.randn(300, 256, generator=g).to(dtype), torch.randn(512, 256, generator=g).to(dtype)
    weights, ids = route(x, w, 10)
    ref_weights, ref_ids = route_reference(x, w, 10)
    assert torch.equal(ids, ref_ids)
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=0, rtol=2**-8)
    torch.testing.assert_close(weights, ref_weights, **tol)


@pytest.mark.parametrize("D,I", [(256, 128), (200, 72)])  # blocks that tile, and ragged last blocks
def test_stacked_fp8_slots_equal_the_fp8_experts_one_by_one(D, I):
    """FP8 slots as on a GPU (raw bytes + block scales, dequantised per use): the stacked gather +
    batched dequantisation against each bound expert."""
    from qwen35_lite.experts.formats import Fp8BlockFormat

    fmt = Fp8BlockFormat(D, I, torch.float32, torch.float8_e4m3fn, dequantise_on_use=True)

    def fill(part, g):
        if part.dtype == torch.float8_e4m3fn:
            return (torch.randn(part.shape, generator=g) * 8).to(torch.float8_e4m3fn)
        return torch.rand(part.shape, generator=g) / 64 + 1e-3

    _check_stacked_raw_slots(fmt, fill, seed=D)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [32, None])
def test_stacked_int4_slots_equal_the_int4_experts_one_by_one(symmetric, group):
    """Packed int4 slots (exact mode: CUDA, or fp32): the stacked gather + batched dequantisation against
    each bound expert (the compressed-tensors dequantisation, one by one)."""
    from qwen35_lite.experts.formats import Int4Format, int4

    scheme = int4.QuantScheme(group_size=group, symmetric=symmetric)
    fmt = Int4Format(128, 64, torch.float32, scheme, torch.bfloat16, kernel=False)

    def fill(part, g):
        if part.dtype == torch.int32:
            return torch.randint(-(2**31), 2**31 - 1, part.shape, generator=g, dtype=torch.int64)
        return torch.rand(part.shape, generator=g) / 16 + 1e-3

    _check_stacked_raw_slots(fmt, fill, seed=3 + symmetric)


def _check_stacked_raw_slots(fmt, fill, seed: int, E: int = 12, A: int = 4) -> None:
    """Slots holding a format's raw bytes (filled part by part by `fill(part, generator)`): the layer's
    stack against the experts bound to the same slots, run one by one (fp32: a tolerance, sums differ
    in order)."""
    tier = SlotTier("ram", fmt, 1, E, lambda: None, lambda n: torch.zeros(n, dtype=torch.uint8))
    g = torch.Generator().manual_seed(seed)
    for s in range(E):
        for part, view in zip(fmt.raw, fmt.raw_views(tier.pools[0].slots[s])):
            view.copy_(fill(part, g))
    experts = {s: tier.experts[0][s] for s in range(E)}
    for _ in range(5):
        x = torch.randn(1, fmt.D, generator=g)
        ids = torch.randperm(E, generator=g)[:A][None]
        weights = torch.softmax(torch.randn(1, A, generator=g), -1)
        want = dispatch_decode(x, weights, ids, experts)
        got = dispatch_stacked(x, weights, ids[0], tier.stacks[0])
        torch.testing.assert_close(got, want, atol=1e-5 * float(want.abs().max()), rtol=1e-5)


# --- the decode step's fast forms against the written-out ones (model/layers.py, deltanet.py, attention.py)
# fp32 sums taken in another order differ by ~1e-7 relative; bf16 results by a rounding flip at most.


def _rms_inputs(dtype, D=256):
    g = torch.Generator().manual_seed(D)
    x = torch.randn(6, D, generator=g) * torch.tensor([1e-3, 0.1, 1.0, 10.0, 300.0, 1.0])[:, None]
    x[5, : D // 2] = 1e-6  # tiny entries beside large ones: the [x, -x] mean must not swamp them
    return (
        x.to(dtype),
        (torch.randn(D, generator=g) * 0.3).to(dtype),
        torch.randn(6, D, generator=g).to(dtype),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norms_equal_the_written_out_forms(dtype):
    x, w, gate = _rms_inputs(dtype)
    got, want = rms_norm_1p(x, norm_scale(w), 1e-6), rms_norm_1p_reference(x, w, 1e-6)
    got_g, want_g = gated_rms_norm(x, gate.float(), w, 1e-6), gated_rms_norm_reference(x, gate, w, 1e-6)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6)
        torch.testing.assert_close(got_g, want_g, rtol=2e-6, atol=1e-6)
    else:  # at most a flipped rounding, on few elements
        for a, b in ((got, want), (got_g, want_g)):
            torch.testing.assert_close(a, b, rtol=8e-3, atol=1e-5)
            assert (a != b).float().mean() < 0.01
    # off the CPU the input is normalised in fp32 and rounded once, as the CPU's mixed-dtype kernel does
    fp32_first = rms_normalize(x.float(), 1e-6, norm_scale(w)).to(dtype)
    torch.testing.assert_close(fp32_first, got, rtol=8e-3 if dtype == torch.bfloat16 else 1e-6, atol=1e-6)


def test_rope_in_place_has_the_bits_of_rotate_half():
    rope = MRoPE(32, 1e7, [6, 5, 5])
    positions = torch.stack([torch.arange(5, 12), torch.arange(7) * 2 % 7, torch.arange(7) % 3])
    cos, signed_sin = rope.cos_sin(positions, torch.bfloat16)
    freqs = positions[..., None].float() * rope.inv_freq  # transformers' order: [3, T, 16], then pick
    picked = freqs.gather(0, rope.row_of_slot.view(1, 1, -1).expand(1, 7, -1))[0]
    emb = torch.cat((picked, picked), dim=-1)
    assert torch.equal(cos, emb.cos().bfloat16())
    x = torch.randn(10, 7, 128, generator=torch.Generator().manual_seed(0)).bfloat16()
    want = apply_rope_reference(x, cos, emb.sin().bfloat16())
    apply_rope_(x, cos, signed_sin)
    assert torch.equal(x, want)


def test_decode_step_equals_recurrence():
    g = torch.Generator().manual_seed(1)
    hk, r, dk, dv = 2, 3, 16, 24  # GQA: each q/k head serves 3 value heads
    hv = hk * r
    state = torch.randn(hv, dk, dv, generator=g)
    ref_state = state.clone()
    for _ in range(6):
        q = l2norm(torch.randn(hk, 1, dk, generator=g)).repeat_interleave(r, dim=0) * dk**-0.5
        k = l2norm(torch.randn(hk, 1, dk, generator=g)).repeat_interleave(r, dim=0)
        v = torch.randn(hv, 1, dv, generator=g)
        log_decay, beta = -torch.rand(hv, 1, generator=g), torch.rand(hv, 1, generator=g)
        want, ref_state = recurrent_gated_delta_rule(q, k, v, log_decay, beta, ref_state)
        got = decode_gated_delta_rule(q, k, v, log_decay.exp()[..., None], beta[..., None], state)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(state, ref_state, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,K", [(3088, 1024), (8, 64), (32768, 256)])
def test_one_row_linear_equals_the_matmul(dtype, N, K):
    """layers.linear runs one row through torch.mv (faster on the CPU): the same sums as F.linear up to
    their order (bit-identical on the machines measured; a tolerance, CPUs differ)."""
    from qwen35_lite.model.layers import linear

    g = torch.Generator().manual_seed(N)
    w, x = torch.randn(N, K, generator=g).to(dtype), torch.randn(3, K, generator=g).to(dtype)
    want = torch.nn.functional.linear(x, w)
    assert torch.equal(linear(x, w), want)  # several rows: the matmul itself
    eps = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(linear(x[1:2], w), want[1:2], atol=eps * float(want.abs().max()), rtol=eps)
