"""Expert dispatch (grouped, one-row, stacked over the slot buffer; dense, FP8, int4) against the per-token reference."""

from __future__ import annotations

import pytest
import torch
from slot_helpers import kernel_tier

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


def _dense_stack(dtype, E, D, I, seed=0):
    fmt = DenseFormat(D, I, dtype, dtype, fused=True)
    tier = SlotTier("ram", fmt, 1, E, lambda: None, lambda n: torch.empty(n, dtype=torch.uint8))
    g = torch.Generator().manual_seed(seed)
    for s in range(E):
        gate_up, down = torch.randn(2 * I, D, generator=g), torch.randn(D, I, generator=g) / 4
        fmt.prepare([gate_up.to(dtype), down.to(dtype)], tier.pools[0].slots[s])
    return tier, g


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("E,A,D,I", [(16, 4, 64, 32), (512, 10, 256, 64)])
def test_grouped_stack_equals_gathered_and_one_by_one(dtype, E, A, D, I, always_grouped):
    """The CPU's grouped matmul over the whole stack (no weight copied) against the gathered batched
    matmul beside it and the bound experts one by one; `rows` (slots on the host) the same."""
    from qwen35_lite.experts.stacks import GROUPED_MM

    tier, g = _dense_stack(dtype, E, D, I, seed=E)
    stack = tier.stacks[0]
    eps = 1e-5 if dtype == torch.float32 else 1e-2
    for _ in range(5):
        x = torch.randn(1, D, generator=g).to(dtype)
        slots = torch.randperm(E, generator=g)[:A]
        one_by_one = torch.cat([tier.experts[0][s](x) for s in slots.tolist()])
        got = stack(x, slots)
        tol = {"atol": eps * float(one_by_one.abs().max()), "rtol": eps}
        torch.testing.assert_close(got, one_by_one, **tol)
        torch.testing.assert_close(stack.gathered(x, slots), one_by_one, **tol)
        assert torch.equal(stack.rows(x, slots.tolist()), got)
    assert GROUPED_MM


@pytest.fixture
def always_grouped(monkeypatch):
    """The grouped path whatever the sizes (it runs only where a gather would copy more otherwise)."""
    from qwen35_lite.experts import stacks

    monkeypatch.setattr(stacks, "GROUP_COST_BYTES", 0)


def test_grouped_stack_copies_no_weights(always_grouped):
    """What the grouped decode step allocates is a few rows, not the experts' weights (the gathered
    path allocates the A experts' gate_up)."""
    from torch.profiler import profile

    E, A, D, I = 32, 8, 256, 128
    tier, g = _dense_stack(torch.bfloat16, E, D, I)
    stack, x = tier.stacks[0], torch.randn(1, D, generator=g).bfloat16()
    slots = torch.randperm(E, generator=g)[:A]
    one_expert = 3 * I * D * 2

    def allocated(fn) -> int:
        with profile(profile_memory=True) as prof:
            fn()
        return max(e.cpu_memory_usage for e in prof.events())

    assert allocated(lambda: stack(x, slots)) < one_expert // 8
    assert allocated(lambda: stack.gathered(x, slots)) >= A * 2 * I * D * 2


@pytest.mark.parametrize("bits,group,symmetric", [(4, 32, True), (4, 128, False), (8, None, True)])
def test_kernel_stack_equals_the_bound_experts_one_by_one(bits, group, symmetric, monkeypatch):
    """int4/int8 slots run by torch's CPU kernels, stacked: slots on the device (each slot copied out,
    no host read) and on the host (views) give the bits of each bound expert run alone, and the decode
    dispatch over them equals the one-by-one reference."""
    from qwen35_lite.experts.formats import QuantScheme, int4_cpu, int8_cpu
    from qwen35_lite.experts.formats.registry import PACKED
    from qwen35_lite.experts.stacks import StackedKernel
    from qwen35_lite.weights.packed import CompressedQuantization

    monkeypatch.setattr(int4_cpu, "library", lambda: None)  # torch's kernel (the C one: the test below)
    monkeypatch.setattr(int8_cpu, "library", lambda: None)  # (int8: tests/experts/test_int8_cpu.py)
    quant = CompressedQuantization(QuantScheme(bits=bits, group_size=group, symmetric=symmetric), ())
    fmt = PACKED[bits].build(quant, 256, 128, "cpu", torch.bfloat16, torch.bfloat16)
    assert fmt.uses_cpu_kernel
    E, A = 12, 4
    tier, g, _ = kernel_tier(fmt, E, seed=bits + (group or 0))
    stack = tier.stacks[0]
    assert isinstance(stack, StackedKernel)
    experts = {s: tier.experts[0][s] for s in range(E)}
    for _ in range(3):
        x = torch.randn(1, 256, generator=g).bfloat16()
        slots = torch.randperm(E, generator=g)[:A]
        want = torch.cat([experts[s](x) for s in slots.tolist()])
        assert torch.equal(stack(x, slots), want)
        assert torch.equal(stack.rows(x, slots.tolist()), want)
        weights = torch.softmax(torch.randn(1, A, generator=g), -1).bfloat16()
        assert torch.equal(
            dispatch_stacked(x, weights, slots, stack), dispatch_decode(x, weights, slots[None], experts)
        )


def test_grouped_path_only_where_the_gather_would_copy_more():
    from qwen35_lite.experts import stacks

    def stack(S, I, D):  # shapes only: expanded views hold no memory
        gate_up, down = torch.zeros(1, 2 * I, D).expand(S, -1, -1), torch.zeros(1, D, I).expand(S, -1, -1)
        return stacks.StackedExperts(gate_up, down)

    small, big = stack(512, 64, 1024), stack(16, 1024, 4096)  # e512-like, 397B-like (fewer slots)
    assert not small._grouped_pays(10) and big._grouped_pays(10) == stacks.GROUPED_MM


@pytest.mark.parametrize("path", ["amx", "avx512", "portable"])
@pytest.mark.parametrize("group,symmetric", [(32, True), (128, False), (64, True), (256, False)])
def test_int4_c_kernel_equals_torchs_kernel_expert_by_expert(group, symmetric, path, monkeypatch):
    """The C decode kernel (kernels/int4_cpu.py int4_experts: a step's experts in one call, slots read
    where they are), each of its paths (AMX tiles take one row of groups from 128), against torch's int4
    kernel on each expert's slot (both sum in fp32, in other orders), and a bound expert's one row: the
    stack's bits."""
    from qwen35_lite.experts.formats import QuantScheme, int4_cpu
    from qwen35_lite.experts.formats.registry import PACKED
    from qwen35_lite.kernels import int4_cpu as kernel
    from qwen35_lite.kernels.int4 import torch_matmul
    from qwen35_lite.weights.packed import CompressedQuantization

    monkeypatch.setattr(kernel, "PORTABLE", path == "portable")
    monkeypatch.setattr(kernel, "AMX", path == "amx")
    if int4_cpu.library() is None:
        pytest.skip("no C compiler: torch's kernel only")
    if path != "portable" and not kernel.paths()[path == "amx"]:
        pytest.skip(f"no {path} path on this CPU")
    quant = CompressedQuantization(QuantScheme(bits=4, group_size=group, symmetric=symmetric), ())
    fmt = PACKED[4].build(quant, 512, 256, "cpu", torch.bfloat16, torch.bfloat16)
    E, A = 12, 5
    tier, g, _ = kernel_tier(fmt, E, seed=group + symmetric)
    stack = tier.stacks[0]
    assert isinstance(stack, int4_cpu.StackedInt4Cpu)

    def torchs(x, s):  # one expert through torch's kernel, as before the C kernel
        gu_w, down_w, gu_sz, down_sz = (p.view(tier.pools[0].slots[s]) for p in fmt.slot)
        gate, up = torch_matmul(x, gu_w, gu_sz, gu_w.shape[0]).chunk(2, dim=-1)
        return torch_matmul(torch.nn.functional.silu(gate) * up, down_w, down_sz, down_w.shape[0])

    for _ in range(3):
        x = torch.randn(1, 512, generator=g).bfloat16()
        slots = torch.randperm(E, generator=g)[:A]
        want = torch.cat([torchs(x, s) for s in slots.tolist()]).float()
        got = stack(x, slots)
        torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2 * float(want.abs().max()))
        assert torch.equal(stack.rows(x, slots.tolist()), got)
        assert torch.equal(torch.cat([tier.experts[0][s](x) for s in slots.tolist()]), got)


def test_the_bf16_stack_kernel_equals_its_bound_experts_and_the_gathered_reference():
    """On an AVX512-BF16 CPU a bf16 stack runs by dense_cpu's kernel: each expert's output equals the
    same expert bound alone (one row through `linear`) bit for bit, and the gathered batched matmul
    within bf16 rounding."""
    from qwen35_lite.experts.formats.base import DenseExpert
    from qwen35_lite.experts.stacks import StackedExperts
    from qwen35_lite.kernels import dense_cpu

    if dense_cpu.stacked_library() is None:
        pytest.skip("no C compiler or no AVX512-BF16")
    g = torch.Generator().manual_seed(4)
    gate_up = (torch.randn(12, 2 * 48, 256, generator=g) * 0.05).bfloat16()
    down = (torch.randn(12, 256, 48, generator=g) * 0.05).bfloat16()
    stack, x = StackedExperts(gate_up, down), torch.randn(1, 256, generator=g).bfloat16()
    slots = torch.tensor([7, 2, 11, 0])
    got = stack(x, slots)
    bound = torch.cat([DenseExpert(gate_up[s], down[s])(x) for s in slots.tolist()])
    assert torch.equal(got, bound)
    torch.testing.assert_close(got.float(), stack.gathered(x, slots).float(), rtol=2**-6, atol=2e-3)
