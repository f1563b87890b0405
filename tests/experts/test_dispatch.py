"""Expert dispatch (grouped, one-row, stacked over the slot buffer; dense, FP8, int4) against the per-token reference."""

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
from qwen35_lite.model.moe import route


def test_grouped_dispatch_equals_reference():
    g = torch.Generator().manual_seed(0)
    T, D, I, E, A = 37, 16, 8, 6, 3
    x = torch.randn(T, D, generator=g)
    weights, ids = route(x, torch.randn(E, D, generator=g), A)
    experts = {
        e: DenseExpert(torch.randn(2 * I, D, generator=g), torch.randn(D, I, generator=g)) for e in range(E)
    }
    # Batched and one-row matmuls sum in different orders (AMX, AVX-512 and AVX2 kernels each their own):
    # a tolerance scaled to fp32's epsilon over D-long dot products of O(1) values holds on any CPU.
    torch.testing.assert_close(
        dispatch_grouped(x, weights, ids, experts),
        dispatch_reference(x, weights, ids, experts),
        rtol=1e-5,
        atol=1e-4,
    )


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
