"""One row times a bf16 weight on the CPU (a decode step's dense Linear), by a small C kernel where the CPU
has AVX512-BF16, beside torch.mv (the reference, and the path everywhere else).

torch.mv on a bf16 matrix goes through oneDNN, whose call costs ~20 µs whatever the size (measured on a
Sapphire Rapids Xeon, torch 2.13: [16, 1024] 23 µs, [1, 1024] 1 µs, fp32 [16, 1024] 2 µs). A decode step
has a few such small products a layer (DeltaNet's fused in_proj_a/b: 16-64 rows; the router: 512 rows)
and at 60 layers that is milliseconds a token. This kernel reads each weight row once with
`vdpbf16ps` (pairs of bf16 products summed in fp32), 4 rows at a time sharing the loads of x, sums the 16
lanes and rounds to bf16 (nearest even) as torch does; matrices over PARALLEL_BYTES are split across
torch's OpenMP threads, smaller ones run on the calling thread (waking a thread costs more than they do).

Without AVX512-BF16 the source does not compile (#error), `library()` is None and `linear` keeps
torch.mv: no slow portable copy to maintain.
"""

from __future__ import annotations

import torch

from .cbuild import BF16_C, build

PARALLEL_BYTES = 1 << 18  # weights from which the rows are split across threads
MIN_ROWS = 4  # fewer rows: torch.mv's dot path (~1 µs) beats a call into the kernel (~3 µs)

BODY = r"""
#include <stdint.h>
#include <string.h>
#if !defined(__AVX512BF16__)
#error "needs AVX512-BF16"
#endif
#include <immintrin.h>


/* rows [r0, r1) of y = W x: W bf16 [N, K] (row stride ld), x bf16 [K], y bf16 [N] */
static void rows(const uint16_t* w, int64_t ld, const uint16_t* x, int K, int64_t r0, int64_t r1,
                 uint16_t* y) {
    const int full = K / 32 * 32;
    const __mmask32 tail = (__mmask32)((1ull << (K - full)) - 1);
    /* rows this far ahead are prefetched while 4 are summed: ~64 KiB, 4-16 rows (the hardware prefetchers
       alone, on 4 interleaved short streams, left ~15% of the bandwidth unused on a Sapphire Rapids) */
    int64_t ahead = 32768 / (ld > 0 ? ld : 1);
    ahead = ahead < 4 ? 4 : ahead > 16 ? 16 : ahead / 4 * 4;
    int64_t r = r0;
    for (; r + 4 <= r1; r += 4) {
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        const uint16_t* w0 = w + r * ld;
        const int prefetch = r + ahead + 4 <= r1;
        const char* next = (const char*)(w0 + ahead * ld);
        for (int k = 0; k < full; k += 32) {
            if (prefetch) {
                _mm_prefetch(next + 2 * k, _MM_HINT_T0);
                _mm_prefetch(next + 2 * (ld + k), _MM_HINT_T0);
                _mm_prefetch(next + 2 * (2 * ld + k), _MM_HINT_T0);
                _mm_prefetch(next + 2 * (3 * ld + k), _MM_HINT_T0);
            }
            __m512bh xv = (__m512bh)_mm512_loadu_si512(x + k);
            a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(w0 + k), xv);
            a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(w0 + ld + k), xv);
            a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512(w0 + 2 * ld + k), xv);
            a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512(w0 + 3 * ld + k), xv);
        }
        if (tail) {
            __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(tail, x + full);
            a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_maskz_loadu_epi16(tail, w0 + full), xv);
            a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_maskz_loadu_epi16(tail, w0 + ld + full), xv);
            a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_maskz_loadu_epi16(tail, w0 + 2 * ld + full), xv);
            a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_maskz_loadu_epi16(tail, w0 + 3 * ld + full), xv);
        }
        y[r] = float_bf16(_mm512_reduce_add_ps(a0));
        y[r + 1] = float_bf16(_mm512_reduce_add_ps(a1));
        y[r + 2] = float_bf16(_mm512_reduce_add_ps(a2));
        y[r + 3] = float_bf16(_mm512_reduce_add_ps(a3));
    }
    for (; r < r1; r++) {
        __m512 a = _mm512_setzero_ps();
        const uint16_t* wr = w + r * ld;
        for (int k = 0; k < full; k += 32)
            a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(wr + k), (__m512bh)_mm512_loadu_si512(x + k));
        if (tail)
            a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_maskz_loadu_epi16(tail, wr + full),
                                 (__m512bh)_mm512_maskz_loadu_epi16(tail, x + full));
        y[r] = float_bf16(_mm512_reduce_add_ps(a));
    }
}

/* A products: y[a] = W_a x_a for W_a = base + slots[a] * stride (bf16 [N, K], rows of K) and x_a = x + a * xs
   (xs = 0: one x for all), y bf16 [A, N]: a decode step's experts, each row summed as bf16_matvec sums it. */
void bf16_stacked(const uint16_t* base, int64_t stride, const int64_t* slots, int A, int N, int K,
                  const uint16_t* x, int64_t xs, uint16_t* y) {
    const int64_t blocks = (N + 63) / 64;
    #pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < (int64_t)A * blocks; r++) {
        int64_t a = r / blocks, b = r % blocks;
        int64_t r1 = (b + 1) * 64 < N ? (b + 1) * 64 : N;
        rows(base + slots[a] * stride, K, x + a * xs, K, b * 64, r1, y + a * N);
    }
}

void bf16_matvec(const uint16_t* w, int64_t ld, const uint16_t* x, int N, int K, uint16_t* y, int parallel) {
    if (!parallel) { rows(w, ld, x, K, 0, N, y); return; }
    #pragma omp parallel
    {
        #pragma omp for schedule(static)
        for (int64_t b = 0; b < (N + 63) / 64; b++) {
            int64_t r1 = (b + 1) * 64 < N ? (b + 1) * 64 : N;
            rows(w, ld, x, K, b * 64, r1, y);
        }
    }
}
"""
SOURCE = BF16_C + BODY

ARGS = ("p", "i64", "p", "i", "i", "p", "i")
STACKED_ARGS = ("p", "i64", "p", "i", "i", "i", "p", "i64", "p")


def library():
    """The compiled kernel (cbuild.py), None without a compiler, without AVX512-BF16 or when the build fails."""
    return build("bf16_matvec", SOURCE, "bf16_matvec", ARGS)


def stacked_library():
    return build("bf16_matvec", SOURCE, "bf16_stacked", STACKED_ARGS) if library() is not None else None


def stacked_usable(stack: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether bf16_stacked can take the stack [S, N, K] (slots of one buffer: K-contiguous rows, N rows
    of K apart) and x: bf16 on the CPU."""
    return (
        stack.dtype == torch.bfloat16
        and x.dtype == torch.bfloat16
        and stack.device.type == "cpu"
        and stack.stride(2) == 1
        and stack.stride(1) == stack.shape[2]
        and stacked_library() is not None
    )


def bf16_stacked(stack: torch.Tensor, slots: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """stack [S, N, K] bf16, slots [A] int64 (CPU), x [K] (one for all) or [A, K] -> [A, N] bf16: row n of
    result a is stack[slots[a]] row n times x (or x[a]), each row summed exactly as bf16_mv sums it."""
    a, (_, n, k) = slots.shape[0], stack.shape
    slots = slots.contiguous()
    x = x.contiguous()
    y = torch.empty(a, n, dtype=torch.bfloat16)
    xs = k if x.dim() == 2 else 0
    stacked_library()(
        stack.data_ptr(), stack.stride(0), slots.data_ptr(), a, n, k, x.data_ptr(), xs, y.data_ptr()
    )
    return y


def usable(w: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether bf16_mv can take w [N, K] and x [K]: bf16 on the CPU, rows of unit stride."""
    return (
        w.dtype == torch.bfloat16
        and x.dtype == torch.bfloat16
        and w.device.type == "cpu"
        and w.dim() == 2
        and w.stride(1) == 1
        and x.is_contiguous()
        and library() is not None
    )


def bf16_mv(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """w [N, K] bf16 (unit-stride rows) @ x [K] bf16 -> [N] bf16 (fp32 sums, rounded once); see usable()."""
    n, k = w.shape
    y = torch.empty(n, dtype=torch.bfloat16)
    parallel = int(n * k * 2 >= PARALLEL_BYTES)
    library()(w.data_ptr(), w.stride(0), x.data_ptr(), n, k, y.data_ptr(), parallel)
    return y
