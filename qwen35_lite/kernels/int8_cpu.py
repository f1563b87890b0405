"""int8 weights times bf16 activations on the CPU at memory speed: a small C kernel (cbuild.py) for the
matvec and the few-row products of decode, beside torch's `aten._weight_int8pack_mm` (the reference, and
the path without a compiler).

torch's kernel is compute-bound on the CPU: an lm_head-shaped int8 matvec takes as long as the bf16 one of
the same shape, though it reads half the bytes. This one streams the int8 rows once: 4 rows at a time
share each load of x (fp32, converted from bf16 once per thread), a weight vector is widened int8 -> fp32
(exact) and multiplied in fp32 with x (bf16 values: exact products), a few token rows at a time so the
widening is shared by them. The weights are not re-quantised and neither are the activations (W8A16).

Scheme: W[n, k] = (q[n, k] - zp[n, g]) * s[n, g] for the group g = k // (K / G) (G = 1: a scale a row),
q int8 [N, K] row-major, s bf16 [N, G], zp int8 [N, G] or none (symmetric). Per group the weights are
scaled in the vector (q * s is exact in fp32: 8 bits times 8), the zero points enter once a row as
-Σ_g zp·s·Σ_{k∈g} x. Fast path: AVX-512 (`__AVX512F__`, and not `INT8_PORTABLE`); otherwise plain C, which
is slower than torch's kernel and so runs only in its tests (`library` is None without the fast path).

`int8_linear` runs one weight; `int8_experts` (experts/formats/int8_cpu.py builds it with this source) runs
a decode step's experts from their slots in one OpenMP region.
"""

from __future__ import annotations

import functools

import torch

from .cbuild import BF16_C, build, flags

BODY = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#if defined(__AVX512F__) && !defined(INT8_PORTABLE)
#include <immintrin.h>
#define INT8_FAST 1
#endif

#define RB 4  /* rows a block */
/* Software prefetch of each row's line 16 KiB ahead into L2 and of the next block's into L1: on its own the
   hardware prefetcher left a core at ~55% of its read rate (rows of 1-4 KiB, a new 4 KiB page each block) */
#ifndef PF_AHEAD
#define PF_AHEAD 16384
#define PF_HINT _MM_HINT_T1
#endif


/* the sums of x fp32 [K] over each of G groups -> sums [G] (the zero points' term) */
static void group_sums(const float* x, int64_t K, int G, float* sums) {
    int64_t g = K / G;
    for (int gi = 0; gi < G; gi++) { float s = 0; for (int64_t k = gi * g; k < (gi + 1) * g; k++) s += x[k]; sums[gi] = s; }
}

/* x bf16 [T][K] -> xf fp32 [T][K]; xsum [T][G] (or NULL: symmetric) its group sums */
static void prepare_x(const uint16_t* x, int T, int64_t K, int G, float* xf, float* xsum) {
    for (int64_t i = 0; i < (int64_t)T * K; i++) xf[i] = bf16_float(x[i]);
    if (xsum) for (int t = 0; t < T; t++) group_sums(xf + t * K, K, G, xsum + t * G);
}

#ifdef INT8_FAST
static inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

/* one step of 16 columns from k: R rows (row stride K) times TB rows of xf into acc; `full`: all 16 columns,
   else those of the mask m (a row's tail) */
static inline __attribute__((always_inline)) void step(const int8_t* w, int64_t K, int64_t k, int full,
                                                       __mmask16 m, const float* xf, int R, int TB, int grouped,
                                                       const __m512* sv, __m512 acc[RB][4]) {
    __m512 wv[RB];
    for (int r = 0; r < R; r++) {
        const int8_t* p = w + r * K + k;
        __m128i b = full ? _mm_loadu_si128((const __m128i*)p) : _mm_maskz_loadu_epi8(m, p);
        wv[r] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));  /* exact */
        if (grouped) wv[r] = _mm512_mul_ps(wv[r], sv[r]);     /* exact: 8 bits times the scale's 8 */
    }
    for (int t = 0; t < TB; t++) {
        __m512 xv = full ? _mm512_loadu_ps(xf + t * K + k) : _mm512_maskz_loadu_ps(m, xf + t * K + k);
        for (int r = 0; r < R; r++) acc[r][t] = _mm512_fmadd_ps(wv[r], xv, acc[r][t]);
    }
}

/* R rows (w: the first, row stride K) times TB rows of xf (stride K): out[t * R + r] = Σ_k q·s·x
   (grouped: scaled per group in the vector; else unscaled, the caller scales) */
static inline __attribute__((always_inline)) void micro(const int8_t* w, const uint16_t* s, int64_t K, int G,
                                                        const float* xf, int R, int TB, int grouped, float* out) {
    __m512 acc[RB][4];
    for (int r = 0; r < R; r++) for (int t = 0; t < TB; t++) acc[r][t] = _mm512_setzero_ps();
    int64_t g = K / G;
    const int64_t pf_l1 = RB * K < PF_AHEAD ? RB * K : PF_AHEAD;  /* the next block's line, into L1 */
    for (int gi = 0; gi < G; gi++) {
        __m512 sv[RB];
        if (grouped) for (int r = 0; r < R; r++) sv[r] = _mm512_set1_ps(bf16_float(s[r * G + gi]));
        int64_t k = gi * g, end = k + g;
        for (; k + 64 <= end; k += 64) {  /* a cache line of each row; prefetches of lines ahead */
            for (int r = 0; r < R; r++) {
                _mm_prefetch((const char*)(w + r * K + k + PF_AHEAD), PF_HINT);
                _mm_prefetch((const char*)(w + r * K + k + pf_l1), _MM_HINT_T0);
            }
            for (int j = 0; j < 64; j += 16) step(w, K, k + j, 1, 0, xf, R, TB, grouped, sv, acc);
        }
        for (; k + 16 <= end; k += 16) {  /* groups under 64 columns: prefetch at each line's start */
            if ((k & 63) == 0)
                for (int r = 0; r < R; r++) {
                    _mm_prefetch((const char*)(w + r * K + k + PF_AHEAD), PF_HINT);
                    _mm_prefetch((const char*)(w + r * K + k + pf_l1), _MM_HINT_T0);
                }
            step(w, K, k, 1, 0, xf, R, TB, grouped, sv, acc);
        }
        if (k < end) step(w, K, k, 0, (__mmask16)((1u << (end - k)) - 1), xf, R, TB, grouped, sv, acc);
    }
    for (int r = 0; r < R; r++) for (int t = 0; t < TB; t++) out[t * R + r] = hsum(acc[r][t]);
}

#define MICRO(R, TB, GR) micro(w, s, K, G, xf + (int64_t)t * K, R, TB, GR, out + t * R)
#define BY_TB(R, GR) \
    if (tb == 4) MICRO(R, 4, GR); else if (tb == 3) MICRO(R, 3, GR); else if (tb == 2) MICRO(R, 2, GR); else MICRO(R, 1, GR)
static void dots(const int8_t* w, const uint16_t* s, int64_t K, int G, const float* xf, int T, int R, float* out) {
    for (int t = 0; t < T;) {
        int tb = T - t < 4 ? T - t : 4;
        if (R == RB) { if (G > 1) { BY_TB(RB, 1); } else { BY_TB(RB, 0); } }
        else { if (G > 1) { BY_TB(1, 1); } else { BY_TB(1, 0); } }
        t += tb;
    }
}
#else
/* portable: out[t * R + r] = Σ_g s_g Σ_{k∈g} q·x (G > 1), Σ_k q·x (G = 1: the caller scales) */
static void dots(const int8_t* w, const uint16_t* s, int64_t K, int G, const float* xf, int T, int R, float* out) {
    int64_t g = K / G;
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) {
            float tot = 0;
            for (int gi = 0; gi < G; gi++) {
                float acc = 0;
                for (int64_t k = gi * g; k < (gi + 1) * g; k++) acc += (float)w[r * K + k] * xf[t * K + k];
                tot += G > 1 ? bf16_float(s[r * G + gi]) * acc : acc;
            }
            out[t * R + r] = tot;
        }
}
#endif

#define TC 32  /* token rows a pass over a row block (its sums on the stack) */

/* rows n0 .. n0 + R of the weight: y[t * ystride + n0 + r] in fp32 or bf16 (ybf16) */
static void rows(const int8_t* q, const uint16_t* s, const int8_t* zp, int64_t K, int G, int64_t n0, int R,
                 const float* xf, const float* xsum, int T, void* y, int64_t ystride, int ybf16) {
    float buf[TC * RB];
    for (int t0 = 0; t0 < T; t0 += TC) {
        int tc = T - t0 < TC ? T - t0 : TC;
        dots(q + n0 * K, s + n0 * G, K, G, xf + (int64_t)t0 * K, tc, R, buf);
        for (int r = 0; r < R; r++) {
            int64_t n = n0 + r;
            for (int i = 0; i < tc; i++) {
                int64_t t = t0 + i;
                float v = buf[i * R + r];
                if (G == 1) v *= bf16_float(s[n]);
                if (zp)
                    for (int gi = 0; gi < G; gi++) v -= (float)zp[n * G + gi] * bf16_float(s[n * G + gi]) * xsum[t * G + gi];
                if (ybf16) ((uint16_t*)y)[t * ystride + n] = float_bf16(v);
                else ((float*)y)[t * ystride + n] = v;
            }
        }
    }
}

/* row block b (rows 4b .. 4b + 3, fewer at the end) of an [N][K] weight */
static void row_block(const int8_t* q, const uint16_t* s, const int8_t* zp, int64_t N, int64_t K, int G, int64_t b,
                      const float* xf, const float* xsum, int T, void* y, int64_t ystride, int ybf16) {
    int64_t n0 = b * RB;
    int R = N - n0 < RB ? (int)(N - n0) : RB;
    if (R == RB) rows(q, s, zp, K, G, n0, RB, xf, xsum, T, y, ystride, ybf16);
    else for (int r = 0; r < R; r++) rows(q, s, zp, K, G, n0 + r, 1, xf, xsum, T, y, ystride, ybf16);
}

/* out[0]: the AVX-512 path was compiled (the plain-C one is slower than torch's kernel: not used) */
void int8_fast_path(int* out) {
#ifdef INT8_FAST
    out[0] = 1;
#else
    out[0] = 0;
#endif
}

static float* fp32_buffer(int64_t n) { return (float*)aligned_alloc(64, ((sizeof(float) * n + 63) / 64) * 64); }

/* y bf16 [T][N] = x bf16 [T][K] @ W^T, W = (q - zp) * s: q int8 [N][K], s bf16 [N][G], zp int8 [N][G] or NULL */
void int8_linear(const int8_t* q, const uint16_t* s, const int8_t* zp, const uint16_t* x, uint16_t* y,
                 int64_t N, int64_t K, int T, int G) {
    #pragma omp parallel
    {
        /* each thread widens x for itself: no barrier, and K·T is small beside its rows */
        float* xf = fp32_buffer((int64_t)T * K);
        float* xsum = zp ? (float*)malloc(sizeof(float) * T * G) : NULL;
        prepare_x(x, T, K, G, xf, xsum);
        #pragma omp for schedule(static) nowait  /* the region's end is the one barrier */
        for (int64_t b = 0; b < (N + RB - 1) / RB; b++) row_block(q, s, zp, N, K, G, b, xf, xsum, T, y, N, 1);
        free(xf); free(xsum);
    }
}
"""
SOURCE = BF16_C + BODY

ARGS = ("p", "p", "p", "p", "p", "i64", "i64", "i", "i")


@functools.cache
def library(portable: bool = False):
    """The compiled `int8_linear` (kernels/cbuild.py), None without a compiler, when the build fails, or
    where the AVX-512 path does not compile (`fast_path`); `portable`: the plain-C path only (its test)."""
    src = ("#define INT8_PORTABLE 1\n" if portable else "") + SOURCE
    name = "int8_portable" if portable else "int8_linear"
    if not portable and not fast_path():
        return None
    return build(name, src, "int8_linear", ARGS)


@functools.cache
def fast_path() -> bool:
    """Whether this machine builds the AVX-512 path. The plain-C one runs a [16384, 4096] matvec in 36 ms
    where torch's `_weight_int8pack_mm` takes 2.5 (and this path 1.4): without AVX-512, torch's kernel."""
    return flags("int8_linear", SOURCE, "int8_fast_path", 1)[0]


def int8_linear(
    x: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None = None,
    portable: bool = False,
) -> torch.Tensor:
    """x bf16 [T, K] @ Wᵀ -> bf16 [T, N], W = (q - zero) * scale per group: q int8 [N, K], scale bf16
    [N, G] (or [N]: G = 1), zero int8 [N, G] or None. G divides K; G > 1 wants K / G a multiple of 16.
    Raises RuntimeError without the library (callers check `library()` first)."""
    fn = library(portable)
    if fn is None:
        raise RuntimeError("the int8 C kernel is not built")
    x = x.contiguous()
    T, K = x.shape
    N = q.shape[0]
    groups = scale.numel() // N
    y = torch.empty(T, N, dtype=torch.bfloat16)
    zp = 0 if zero is None else zero.data_ptr()
    fn(q.data_ptr(), scale.data_ptr(), zp, x.data_ptr(), y.data_ptr(), N, K, T, groups)
    return y


def fits(k: int, groups: int) -> bool:
    """The kernel takes G groups of K inputs: one group (any K), or groups of a multiple of 16."""
    return groups == 1 or (k % groups == 0 and (k // groups) % 16 == 0)
