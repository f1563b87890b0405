"""The bf16 one-row kernel (kernels/dense_cpu.py) against the fp32 product it rounds, and `linear` using it."""

import pytest
import torch

from qwen35_lite.kernels import dense_cpu, linear

pytestmark = pytest.mark.skipif(dense_cpu.library() is None, reason="no C compiler or no AVX512-BF16")


def check(y: torch.Tensor, w: torch.Tensor, x: torch.Tensor) -> None:
    """y is the fp32 product rounded once to bf16: within half a bf16 step of it, up to fp32 sums in
    another order (a small absolute slack on the largest output)."""
    ref = torch.mv(w.float(), x.float())
    assert y.dtype == torch.bfloat16 and y.shape == ref.shape
    torch.testing.assert_close(y.float(), ref, rtol=2**-8, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("n, k", [(4, 32), (5, 1000), (16, 1024), (67, 33), (512, 1024), (300, 2048)])
def test_bf16_mv_is_the_fp32_product_rounded(n, k):
    g = torch.Generator().manual_seed(n * k)
    w = torch.randn(n, k, generator=g).bfloat16()
    x = torch.randn(k, generator=g).bfloat16()
    check(dense_cpu.bf16_mv(w, x), w, x)


def test_rows_of_a_wider_matrix_and_the_threaded_split():
    g = torch.Generator().manual_seed(1)
    wide = torch.randn(1000, 1100, generator=g).bfloat16()
    w = wide[:, 30:1054]  # unit-stride rows, row stride 1100
    x = torch.randn(1024, generator=g).bfloat16()
    assert dense_cpu.usable(w, x) and w.numel() * 2 >= dense_cpu.PARALLEL_BYTES
    check(dense_cpu.bf16_mv(w, x), w, x)


def test_linear_takes_the_kernel_for_one_bf16_row_only(monkeypatch):
    calls = []
    real = dense_cpu.bf16_mv
    monkeypatch.setattr(dense_cpu, "bf16_mv", lambda w, x: calls.append(w.shape) or real(w, x))
    g = torch.Generator().manual_seed(2)
    w = torch.randn(64, 256, generator=g).bfloat16()
    x = torch.randn(1, 256, generator=g).bfloat16()
    check(linear(x, w)[0], w, x[0])
    linear(x.float(), w.float())  # fp32: torch.mv, as transformers' parity needs
    linear(x.expand(3, 256), w)  # several rows: F.linear
    linear(x, w[:2])  # a couple of rows: torch.mv's dot path
    assert calls == [(64, 256)]


def test_stacked_rows_equal_one_row_products_of_each_slot():
    """bf16_stacked over slots of one buffer = bf16_mv of each slot's matrix, bit for bit (a bound
    expert's one-row product and its layer's stack must round alike), with x shared or one per slot."""
    g = torch.Generator().manual_seed(3)
    stack = torch.randn(7, 96, 160, generator=g).bfloat16()
    slots = torch.tensor([5, 0, 3])
    x = torch.randn(160, generator=g).bfloat16()
    xs = torch.randn(3, 160, generator=g).bfloat16()
    assert dense_cpu.stacked_usable(stack, x)
    shared, each = dense_cpu.bf16_stacked(stack, slots, x), dense_cpu.bf16_stacked(stack, slots, xs)
    for a, s in enumerate(slots.tolist()):
        assert torch.equal(shared[a], dense_cpu.bf16_mv(stack[s], x))
        assert torch.equal(each[a], dense_cpu.bf16_mv(stack[s], xs[a]))
        check(each[a], stack[s], xs[a])
