"""int8 routed experts run by the C decode kernel (experts/formats/int8_cpu.py: a step's experts in one
call, slots read where they are) against torch's int8 kernel one expert at a time and against the
dequantised reference; a bound expert's row runs as its stack runs it."""

from __future__ import annotations

import pytest
import slot_helpers
import torch
import torch.nn.functional as F

from qwen35_lite.experts.dispatch import dispatch_decode, dispatch_stacked
from qwen35_lite.experts.formats import QuantScheme, int8_cpu
from qwen35_lite.experts.formats.registry import PACKED
from qwen35_lite.weights.packed import CompressedQuantization

pytestmark = pytest.mark.skipif(int8_cpu.library() is None, reason="no C compiler: torch's kernel runs")
D, I = 256, 128  # whole 4-row blocks and groups of up to 128; a test below takes K tails


CHANNEL = (None, True)
SCHEMES = [CHANNEL, (None, False), (32, True), (64, False)]  # (group size or a scale a row, symmetric)


def _ids(scheme) -> str:
    return f"{'g' + str(scheme[0]) if scheme[0] else 'row'}-{'sym' if scheme[1] else 'asym'}"


def kernel_tier(D: int, I: int, E: int, seed: int, scheme=CHANNEL):
    """A format, a RAM tier of E int8 kernel slots prepared from random packed bytes (a cache fill), the
    generator, and the raw bytes of each slot (for the exact path)."""
    quant = CompressedQuantization(QuantScheme(bits=8, group_size=scheme[0], symmetric=scheme[1]), ())
    fmt = PACKED[8].build(quant, D, I, "cpu", torch.bfloat16, torch.bfloat16)
    assert fmt.uses_cpu_kernel
    tier, g, raws = slot_helpers.kernel_tier(fmt, E, seed, div=400, floor=1e-4)
    return fmt, tier, g, raws


def near(got: torch.Tensor, want: torch.Tensor) -> None:
    """fp32 sums in another order (and the SwiGLU input kept fp32 instead of bf16): within bf16's
    rounding of the outputs' scale."""
    err = (got.float() - want.float()).norm()
    assert err <= 1e-2 * want.float().norm(), (err, want.float().norm())


def torch_kernel_ffn(fmt, slot: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """One expert by torch's `_weight_int8pack_mm` (the path without a compiler)."""
    gu_w, down_w, gu_s, down_s = (p.view(slot) for p in fmt.slot)
    mm = torch.ops.aten._weight_int8pack_mm
    gate, up = mm(x, gu_w, gu_s).chunk(2, dim=-1)
    return mm(F.silu(gate) * up, down_w, down_s)


@pytest.mark.parametrize("shape", [(D, I), (100, 36)], ids=["whole", "k-tails"])
def test_stacked_c_kernel_equals_torchs_kernel_expert_by_expert(shape):
    d, i = shape
    fmt, tier, g, _ = kernel_tier(d, i, 12, seed=d + i)
    stack = tier.stacks[0]
    assert isinstance(stack, int8_cpu.StackedInt8Cpu)
    slot_of = tier.pools[0].slots
    for A in (1, 5, 10):
        x = torch.randn(1, d, generator=g).bfloat16()
        slots = torch.randperm(12, generator=g)[:A]
        got = stack(x, slots)
        assert got.shape == (A, d) and got.dtype == torch.bfloat16
        assert torch.equal(stack.rows(x, slots.tolist()), got)
        near(got, torch.cat([fmt.dequantised_ffn(slot_of[s])(x) for s in slots.tolist()]))
        if d % 32 == 0 and i % 32 == 0:  # torch's bf16 int8 kernel wants K a multiple of 16
            near(got, torch.cat([torch_kernel_ffn(fmt, slot_of[s], x) for s in slots.tolist()]))


@pytest.mark.parametrize("scheme", SCHEMES, ids=_ids)
def test_the_stacked_kernel_computes_what_compressed_tensors_dequantisation_gives(scheme):
    """Every scheme the C kernel takes (group scales, zero points) against the exact path on the raw
    bytes (compressed-tensors' dequantisation, then F.linear in fp32)."""
    quant = CompressedQuantization(QuantScheme(bits=8, group_size=scheme[0], symmetric=scheme[1]), ())
    exact = PACKED[8].build(quant, D, I, "cpu", torch.float32, torch.bfloat16)
    assert not exact.uses_cpu_kernel
    fmt, tier, g, raws = kernel_tier(D, I, 6, seed=7, scheme=scheme)
    stack = tier.stacks[0]
    assert isinstance(stack, int8_cpu.StackedInt8Cpu)
    x = torch.randn(1, D, generator=g).bfloat16()
    slots = torch.tensor([4, 0, 5])
    want = torch.cat([exact.bind(raws[s])(x.float()) for s in slots.tolist()])
    near(stack(x, slots), want)
    for rows in (3, 40):  # one expert, a few rows (the C matmul) and a prefill block (dequantised)
        xs = torch.randn(rows, D, generator=g).bfloat16()
        near(tier.experts[0][2](xs), exact.bind(raws[2])(xs.float()))


@pytest.mark.parametrize("scheme", [CHANNEL, (64, False)], ids=_ids)
def test_a_bound_expert_runs_one_row_as_its_stack_and_the_dispatch_equals_one_by_one(scheme):
    """one_row_by: an expert read for one step alone gives the bits of its cache slot's run."""
    fmt, tier, g, _ = kernel_tier(D, I, 8, seed=3, scheme=scheme)
    stack, experts = tier.stacks[0], {s: tier.experts[0][s] for s in range(8)}
    for _ in range(3):
        x = torch.randn(1, D, generator=g).bfloat16()
        slots = torch.randperm(8, generator=g)[:4]
        want = torch.cat([experts[s](x) for s in slots.tolist()])
        assert torch.equal(stack(x, slots), want)
        alone = fmt.bind(tier.pools[0].slots[int(slots[0])].clone())
        assert torch.equal(alone(x), want[:1])
        weights = torch.softmax(torch.randn(1, 4, generator=g), -1).bfloat16()
        assert torch.equal(
            dispatch_stacked(x, weights, slots, stack), dispatch_decode(x, weights, slots[None], experts)
        )


@pytest.mark.parametrize("rows", [3, 40])
def test_more_rows_of_one_expert_run_the_matmul_kernel_or_dequantised(rows):
    fmt, tier, g, _ = kernel_tier(D, I, 2, seed=rows)
    x = torch.randn(rows, D, generator=g).bfloat16()
    slot = tier.pools[0].slots[1]
    near(fmt.bind(slot)(x), fmt.dequantised_ffn(slot)(x))


@pytest.fixture(scope="module")
def w8_channel(hf_checkpoint, module_tmp):
    """A small MoE checkpoint with int8 symmetric per-channel experts, quantised by compressed-tensors."""
    from ct_reference import make_ct_checkpoint

    return make_ct_checkpoint(hf_checkpoint("moe_int4"), module_tmp("w8c") / "w8", None, True, bits=8)


@pytest.mark.slow
@pytest.mark.parametrize("cpu_slots", [2, 10**6], ids=["some-slots", "every-expert"])
def test_cached_and_uncached_int8_experts_decode_the_same_tokens(w8_channel, cpu_slots):
    """Experts in RAM slots run by the layer's C stack and experts read for one step alone (UncachedExperts:
    bound, one row as the stack runs it) give the same greedy tokens and logits bit for bit in bf16."""
    from conftest import greedy, load_ours

    from qwen35_lite.experts.cache import TieredExperts

    ids = torch.randint(0, 248000, (12,), generator=torch.Generator().manual_seed(2))
    uncached = load_ours(w8_channel, torch.bfloat16)
    assert uncached.provider.store.for_compute("cpu", torch.bfloat16).format.uses_cpu_kernel
    cached = load_ours(
        w8_channel,
        torch.bfloat16,
        lambda s, d, t: TieredExperts(s, d, t, cpu_slots=cpu_slots, prefetch=False),
    )
    assert isinstance(cached.provider.ram.stacks[0], int8_cpu.StackedInt8Cpu)
    want, want_logits = greedy(uncached, ids, 6)
    got, got_logits = greedy(cached, ids, 6)
    assert got == want and torch.equal(got_logits, want_logits)
