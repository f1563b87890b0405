"""The CPU int4 decode kernel in C: y = x Wᵀ for a few rows x (bf16) and a weight in the int4 kernel layout
(int4.py), and a decode step's routed experts (gate_up, SwiGLU, down for A experts) in one call. Built on
first use (cbuild.py); None without a compiler, and the callers keep torch's `_weight_int4pack_mm_for_cpu`
(the reference).

Layout: block b of 64 rows, input column pair m: 64 bytes, 32 for column 2m then 32 for 2m + 1; byte j
holds row 64b + j in its low nibble and row 64b + 32 + j in its high one. Table [G][N][2] (scale, zero),
W = (u - 8) · scale + zero. Per block and group the kernel sums in fp32 and adds
scale · Σ (u - 8) x + zero · Σ x, as torch's kernel does.

The fast path (AVX512-BF16 and VBMI: Sapphire Rapids, Zen 4) decodes each 64-byte column pair into four
vectors of 16 rows × (column 2m, 2m + 1) bf16 pairs: one byte permute puts a row's two columns in a dword,
a mask and an or make each nibble u the bf16 128 + u (exact), and `vdpbf16ps` multiplies them by x's pair
(bf16 already: exact products, fp32 sums); Σ (u - 8) x = Σ (128 + u) x - 136 Σ x, the accumulator starting
at -136 Σ x. `block_rows` runs 64 rows for up to 4 input rows, `blocks_row1` one row through 4 blocks
group by group (the table is [G][N][2]: block by block each group's piece is N * 4 bytes from the last, a
pattern that halved the rate out of cache); weights are prefetched 4 KB ahead, table pieces 8 groups
ahead. With AMX (`block_amx`): 2 rows or more, or one of groups from 128, through the tile unit, the decoded
vectors stored as B tiles (vdpbf16ps takes 2 cycles here: the tiles multiply a decoded block once for all
rows); each thread's tile configuration (oneDNN's) is saved and put back. Elsewhere (or built with
QL_PORTABLE) plain loops that any C compiler takes: slower than torch's kernel where measured, so they run
only in their tests (`selected`), and a CPU without the fast path keeps torch's kernel.

OpenMP over tasks of 4 blocks (dynamic, ~256 KB a hand-out: a thread another process slows takes fewer):
torch's libgomp, so the threads follow `torch.set_num_threads`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from .cbuild import BF16_C, build, flags

BODY = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <omp.h>


#define CB 4  /* blocks of 64 rows a task: one row runs them group by group */

/* Σ x over each group of g inputs: x [T][ldx] bf16 -> xsum [T][K/g] fp32 */
static void group_sums(const uint16_t* x, int64_t ldx, int T, int K, int g, float* xsum) {
    for (int t = 0; t < T; t++)
        for (int gi = 0; gi < K / g; gi++) {
            float s = 0;
            for (int k = gi * g; k < (gi + 1) * g; k++) s += bf16_float(x[t * ldx + k]);
            xsum[t * (K / g) + gi] = s;
        }
}

#if defined(__AVX512BF16__) && defined(__AVX512VBMI__) && !defined(QL_PORTABLE)
#include <immintrin.h>
#define QL_FAST 1
#define IDX(i) ((48 + (i)) << 24 | (32 + (i)) << 16 | (16 + (i)) << 8 | (i))

/* Column pair m's 64 bytes -> rows 0-15, 16-31, 32-47, 48-63 of the block: 16 (column 2m, 2m + 1) pairs
   each, as bf16 128 + u (u in the low mantissa bits: one mask, exact). The permute puts in dword i column
   2m's bytes of rows i and 16 + i, then column 2m + 1's. */
static inline __attribute__((always_inline)) void decode(const uint8_t* b, __m512i u[4]) {
    const __m512i idx = _mm512_set_epi32(
        IDX(15), IDX(14), IDX(13), IDX(12), IDX(11), IDX(10), IDX(9), IDX(8),
        IDX(7), IDX(6), IDX(5), IDX(4), IDX(3), IDX(2), IDX(1), IDX(0));
    const __m512i nib = _mm512_set1_epi16(0x000f), bias = _mm512_set1_epi16(0x4300);  /* bf16 128 */
    __m512i p = _mm512_permutexvar_epi8(idx, _mm512_loadu_si512((const void*)b));
    u[0] = _mm512_ternarylogic_epi32(p, nib, bias, 0xea);  /* (p & nib) | bias */
    u[1] = _mm512_ternarylogic_epi32(_mm512_srli_epi16(p, 8), nib, bias, 0xea);
    u[2] = _mm512_ternarylogic_epi32(_mm512_srli_epi16(p, 4), nib, bias, 0xea);
    u[3] = _mm512_ternarylogic_epi32(_mm512_srli_epi16(p, 12), nib, bias, 0xea);
}

/* The table's 256 bytes for block nb's group gi + PF (or the next block's first groups): the table is
   [G][N][2], one 256-byte piece a group N * 4 bytes from the next, too many streams for the hardware
   prefetcher, each a miss to memory otherwise. */
#define PF 8
#define WPF 64  /* weights: 4 KB ahead of the decode (one stream a thread: the hardware's runs short) */
static inline void prefetch_table(const uint16_t* sz, int64_t N, int ng, int64_t nb, int gi) {
    gi += PF;
    if (gi >= ng) { gi -= ng; nb += 1; }
    if (nb * 64 >= N || gi >= ng) return;
    const char* s = (const char*)(sz + ((int64_t)gi * N + nb * 64) * 2);
    for (int l = 0; l < 256; l += 64) _mm_prefetch(s + l, _MM_HINT_T0);
}

/* 64 rows (block nb) for NT <= 4 input rows: out[t][r] = Σ_k W[64 nb + r, k] x[t][k]. */
static inline __attribute__((always_inline)) void block_nt(
        const uint8_t* w, const uint16_t* sz, int64_t N, int K, int g, int64_t nb, const int NT,
        const uint16_t* x, int64_t ldx, const float* xsum, float out[4][64]) {
    const __m512i zmask = _mm512_set1_epi32((int)0xffff0000);
    const int ng = K / g;
    const int NA = NT == 1 ? 2 : 1;  /* one row: two accumulator sets (even, odd m): dpbf16's latency */
    const uint8_t* wb = w + nb * (int64_t)(K / 2) * 64;
    for (int t = 0; t < NT; t++) memset(out[t], 0, 64 * sizeof(float));
    for (int gi = 0; gi < ng; gi++) {
        __m512 acc[2][4][4];
        prefetch_table(sz, N, ng, nb, gi);
        for (int t = 0; t < NT; t++)
            for (int q = 0; q < 4; q++) {
                acc[0][t][q] = _mm512_set1_ps(-136.0f * xsum[t * ng + gi]);  /* Σ (128 + u) x - 136 Σ x */
                acc[1][t][q] = _mm512_setzero_ps();
            }
        for (int m = gi * g / 2; m < (gi + 1) * g / 2; m += NA) {
            for (int a = 0; a < NA; a++) {
                __m512i u[4];
                _mm_prefetch((const char*)(wb + (int64_t)(m + a + WPF) * 64), _MM_HINT_T0);
                decode(wb + (int64_t)(m + a) * 64, u);
                for (int t = 0; t < NT; t++) {
                    uint32_t xv;
                    memcpy(&xv, x + t * ldx + 2 * (m + a), 4);
                    __m512bh xb = (__m512bh)_mm512_set1_epi32((int)xv);
                    for (int q = 0; q < 4; q++) acc[a][t][q] = _mm512_dpbf16_ps(acc[a][t][q], (__m512bh)u[q], xb);
                }
            }
        }
        const uint16_t* s = sz + ((int64_t)gi * N + nb * 64) * 2;
        for (int q = 0; q < 4; q++) {
            __m512i d = _mm512_loadu_si512((const void*)(s + 32 * q));  /* 16 rows' (scale, zero) */
            __m512 sc = _mm512_castsi512_ps(_mm512_slli_epi32(d, 16));
            __m512 zr = _mm512_castsi512_ps(_mm512_and_si512(d, zmask));
            for (int t = 0; t < NT; t++) {
                __m512 sum = NA == 2 ? _mm512_add_ps(acc[0][t][q], acc[1][t][q]) : acc[0][t][q];
                __m512 xs = _mm512_set1_ps(xsum[t * ng + gi]);
                __m512 tot = _mm512_loadu_ps(out[t] + 16 * q);
                _mm512_storeu_ps(out[t] + 16 * q, _mm512_fmadd_ps(sc, sum, _mm512_fmadd_ps(zr, xs, tot)));
            }
        }
    }
}

static void block_rows(const uint8_t* w, const uint16_t* sz, int64_t N, int K, int g, int64_t nb, int NT,
                       const uint16_t* x, int64_t ldx, const float* xsum, float out[4][64]) {
    switch (NT) {  /* one specialisation per row count: the accumulators stay in registers */
    case 1: block_nt(w, sz, N, K, g, nb, 1, x, ldx, xsum, out); break;
    case 2: block_nt(w, sz, N, K, g, nb, 2, x, ldx, xsum, out); break;
    case 3: block_nt(w, sz, N, K, g, nb, 3, x, ldx, xsum, out); break;
    default: block_nt(w, sz, N, K, g, nb, 4, x, ldx, xsum, out); break;
    }
}


/* One input row through CB consecutive blocks, group by group: a group's (scale, zero) pieces of the CB
   blocks are contiguous, where block by block each group is a piece N * 4 bytes from the last (out of
   cache that pattern halved the rate). out[c][r] = Σ_k W[64 (nb0 + c) + r, k] x[k]. */
static void blocks_row1(const uint8_t* w, const uint16_t* sz, int64_t N, int K, int g, int64_t nb0, int nbc,
                        const uint16_t* x, const float* xsum, float out[CB][64]) {
    const __m512i zmask = _mm512_set1_epi32((int)0xffff0000);
    const int ng = K / g;
    __m512 tot[CB][4];
    for (int c = 0; c < CB; c++)
        for (int q = 0; q < 4; q++) tot[c][q] = _mm512_setzero_ps();
    for (int gi = 0; gi < ng; gi++) {
        if (gi + PF < ng) {
            const char* p = (const char*)(sz + ((int64_t)(gi + PF) * N + nb0 * 64) * 2);
            for (int l = 0; l < nbc * 256; l += 64) _mm_prefetch(p + l, _MM_HINT_T0);
        }
        const float xs = xsum[gi];
        for (int c = 0; c < nbc; c++) {
            const uint8_t* wb = w + (nb0 + c) * (int64_t)(K / 2) * 64;
            __m512 acc[2][4];  /* two sets (even, odd m): dpbf16's latency */
            for (int q = 0; q < 4; q++) {
                acc[0][q] = _mm512_set1_ps(-136.0f * xs);  /* Σ (128 + u) x - 136 Σ x */
                acc[1][q] = _mm512_setzero_ps();
            }
            for (int m = gi * g / 2; m < (gi + 1) * g / 2; m += 2)
                for (int a = 0; a < 2; a++) {
                    __m512i u[4];
                    uint32_t xv;
                    _mm_prefetch((const char*)(wb + (int64_t)(m + a + WPF) * 64), _MM_HINT_T0);
                    decode(wb + (int64_t)(m + a) * 64, u);
                    memcpy(&xv, x + 2 * (m + a), 4);
                    __m512bh xb = (__m512bh)_mm512_set1_epi32((int)xv);
                    for (int q = 0; q < 4; q++) acc[a][q] = _mm512_dpbf16_ps(acc[a][q], (__m512bh)u[q], xb);
                }
            const uint16_t* s = sz + ((int64_t)gi * N + (nb0 + c) * 64) * 2;
            for (int q = 0; q < 4; q++) {
                __m512i d = _mm512_loadu_si512((const void*)(s + 32 * q));
                __m512 sc = _mm512_castsi512_ps(_mm512_slli_epi32(d, 16));
                __m512 zr = _mm512_castsi512_ps(_mm512_and_si512(d, zmask));
                __m512 sum = _mm512_add_ps(acc[0][q], acc[1][q]);
                tot[c][q] = _mm512_fmadd_ps(sc, sum, _mm512_fmadd_ps(zr, _mm512_set1_ps(xs), tot[c][q]));
            }
        }
    }
    for (int c = 0; c < nbc; c++)
        for (int q = 0; q < 4; q++) _mm512_storeu_ps(out[c] + 16 * q, tot[c][q]);
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <sys/syscall.h>
#include <unistd.h>
#define QL_AMX 1
#define LEAD 2  /* column-pair tiles decoded ahead of the tile multiply that reads them */

typedef struct { uint8_t palette, start; uint8_t reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; } tilecfg;

/* The process may use AMX tiles (Linux asks for it once; torch's oneDNN asks as well). */
static int amx_allowed(void) {
    static int state = 0;
    if (state == 0) state = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0 ? 1 : -1;
    return state > 0;
}

/* This thread's tiles for M input rows: C 0-3 [M][16] fp32, A 4 [M][32] bf16, B 5-7 [16][32] bf16. The
   thread's own configuration (oneDNN's) is saved and put back by amx_end. */
static void amx_begin(int M, tilecfg* saved) {
    tilecfg c;
    _tile_storeconfig(saved);
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 8; t++) { c.colsb[t] = 64; c.rows[t] = t < 5 ? M : 16; }
    _tile_loadconfig(&c);
}

static void amx_end(const tilecfg* saved) {
    if (saved->palette) _tile_loadconfig(saved); else _tile_release();
}

/* 16 column pairs from m0 decoded into the four B tiles' rows (stage: [4][16][64] bytes). */
static inline __attribute__((always_inline)) void decode16(const uint8_t* wb, int m0, uint8_t* st) {
    for (int j = 0; j < 16; j++) {
        __m512i u[4];
        _mm_prefetch((const char*)(wb + (int64_t)(m0 + j + WPF) * 64), _MM_HINT_T0);
        decode(wb + (int64_t)(m0 + j) * 64, u);
        for (int q = 0; q < 4; q++) _mm512_store_si512((void*)(st + (q * 16 + j) * 64), u[q]);
    }
}

/* out[t][16 q + i] += scale · (Σ (128 + u) x - 136 Σ x) + zero · Σ x: a group's sums cb [4][16][16]. */
static inline void amx_scale(const float cb[4][16][16], const uint16_t* s, int M, const float* xsum, int ng,
                             int gi, float out[16][64]) {
    const __m512i zmask = _mm512_set1_epi32((int)0xffff0000);
    for (int q = 0; q < 4; q++) {
        __m512i d = _mm512_loadu_si512((const void*)(s + 32 * q));
        __m512 sc = _mm512_castsi512_ps(_mm512_slli_epi32(d, 16));
        __m512 zr = _mm512_castsi512_ps(_mm512_and_si512(d, zmask));
        for (int t = 0; t < M; t++) {
            __m512 xs = _mm512_set1_ps(xsum[t * ng + gi]);
            __m512 sum = _mm512_fmadd_ps(xs, _mm512_set1_ps(-136.0f), _mm512_load_ps(cb[q][t]));
            __m512 tot = _mm512_loadu_ps(out[t] + 16 * q);
            _mm512_storeu_ps(out[t] + 16 * q, _mm512_fmadd_ps(sc, sum, _mm512_fmadd_ps(zr, xs, tot)));
        }
    }
}

/* 64 rows (block nb) for M <= 16 input rows through the tile unit (configured for M rows, or for 16 with x
   padded to whole tiles): each 16 column pairs decoded (as the vector path does) into four B tiles of 16
   pairs × 16 rows, multiplied by x's 32 columns (A); a group's sums stored and scaled as in block_nt.
   Software-pipelined: the pairs two tiles on are decoded before the tiles load this one's (the tiles read
   what the stores wrote), a group's sums scaled one group later. */
static void block_amx(const uint8_t* w, const uint16_t* sz, int64_t N, int K, int g, int64_t nb, int M,
                      const uint16_t* x, int64_t ldx, const float* xsum, float out[16][64]) {
    const int ng = K / g, S = K / 32, spg = g / 32;  /* tiles of 16 pairs: in all, a group */
    const uint8_t* wb = w + nb * (int64_t)(K / 2) * 64;
    uint8_t stage[4][4 * 16 * 64] __attribute__((aligned(64)));
    float cb[2][4][16][16] __attribute__((aligned(64)));
    for (int t = 0; t < M; t++) memset(out[t], 0, 64 * sizeof(float));
    for (int d = 0; d < LEAD && d < S; d++) decode16(wb, 16 * d, stage[d & 3]);
    for (int si = 0; si < S; si++) {
        const uint8_t* st = stage[si & 3];
        int gi = si / spg;
        if (si % spg == 0) prefetch_table(sz, N, ng, nb, gi);
        if (si % spg == 0) { _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3); }
        _tile_loadd(4, x + 32 * si, ldx * 2);
        _tile_loadd(5, st, 64);
        _tile_dpbf16ps(0, 4, 5);
        _tile_loadd(6, st + 1024, 64);
        _tile_dpbf16ps(1, 4, 6);
        _tile_loadd(7, st + 2048, 64);
        _tile_dpbf16ps(2, 4, 7);
        _tile_loadd(5, st + 3072, 64);
        _tile_dpbf16ps(3, 4, 5);
        if (si + LEAD < S) decode16(wb, 16 * (si + LEAD), stage[(si + LEAD) & 3]);
        if ((si + 1) % spg == 0) {
            float (*c)[16][16] = cb[gi & 1];
            _tile_stored(0, c[0], 64); _tile_stored(1, c[1], 64); _tile_stored(2, c[2], 64); _tile_stored(3, c[3], 64);
            if (gi > 0) amx_scale(cb[(gi - 1) & 1], sz + ((int64_t)(gi - 1) * N + nb * 64) * 2, M, xsum, ng, gi - 1, out);
        }
    }
    amx_scale(cb[(ng - 1) & 1], sz + ((int64_t)(ng - 1) * N + nb * 64) * 2, M, xsum, ng, ng - 1, out);
}
#endif

#else
#define QL_FAST 0

static void block_rows(const uint8_t* w, const uint16_t* sz, int64_t N, int K, int g, int64_t nb, int NT,
                       const uint16_t* x, int64_t ldx, const float* xsum, float out[4][64]) {
    const int ng = K / g;
    float xf[256];
    for (int t = 0; t < NT; t++) {
        float total[64] = {0};
        for (int gi = 0; gi < ng; gi++) {
            float acc[64] = {0};
            for (int k = 0; k < g; k++) xf[k] = bf16_float(x[t * ldx + gi * g + k]);
            for (int m = 0; m < g / 2; m++) {
                const uint8_t* b = w + (nb * (K / 2) + gi * g / 2 + m) * 64;
                float x0 = xf[2 * m], x1 = xf[2 * m + 1];
                for (int j = 0; j < 32; j++) {
                    acc[j] += ((int)(b[j] & 15) - 8) * x0 + ((int)(b[32 + j] & 15) - 8) * x1;
                    acc[32 + j] += ((int)(b[j] >> 4) - 8) * x0 + ((int)(b[32 + j] >> 4) - 8) * x1;
                }
            }
            const uint16_t* s = sz + ((int64_t)gi * N + nb * 64) * 2;
            for (int r = 0; r < 64; r++) total[r] += bf16_float(s[2 * r]) * acc[r] + bf16_float(s[2 * r + 1]) * xsum[t * ng + gi];
        }
        memcpy(out[t], total, sizeof total);
    }
}

static void blocks_row1(const uint8_t* w, const uint16_t* sz, int64_t N, int K, int g, int64_t nb0, int nbc,
                        const uint16_t* x, const float* xsum, float out[CB][64]) {
    for (int c = 0; c < nbc; c++) block_rows(w, sz, N, K, g, nb0 + c, 1, x, K, xsum, (float (*)[64])out[c]);
}
#endif

#ifndef QL_AMX
#define QL_AMX 0
typedef int tilecfg;
static int amx_allowed(void) { return 0; }
static void amx_begin(int M, tilecfg* saved) { (void)M; (void)saved; }
static void amx_end(const tilecfg* saved) { (void)saved; }
static void block_amx(const uint8_t* w, const uint16_t* sz, int64_t N, int K, int g, int64_t nb, int M,
                      const uint16_t* x, int64_t ldx, const float* xsum, float out[16][64]) {
    (void)w; (void)sz; (void)N; (void)K; (void)g; (void)nb; (void)M; (void)x; (void)ldx; (void)xsum; (void)out;
}
#endif

/* out[0]: the AVX512-BF16 path was compiled, out[1]: the AMX one */
void int4_fast_path(int* out) { out[0] = QL_FAST; out[1] = QL_AMX; }

/* The tile path for T rows and groups of g: compiled, asked for (use), and the OS lets us. One row of
   groups under 128 runs as fast on the vector path (a group's sums leave the tiles through memory: at
   g = 32 that is every 16 column pairs). */
static int amx_for(int use, int T, int g) {
    return QL_AMX && use && (T >= 2 || g >= 128) && amx_allowed();
}

/* Rows 64 nb .. of x [T][ldx] @ Wᵀ, all T rows (through the tiles 16 at a time where amx: x then holds
   whole tiles of rows, else four at a time): y [T][ldy] fp32 or bf16, first n rows. */
static void block_store(const uint8_t* w, const uint16_t* sz, int64_t N, int K, int g, int64_t nb, int T,
                        const uint16_t* x, int64_t ldx, const float* xsum, int64_t n, void* y, int64_t ldy,
                        int y_bf16, int amx) {
    float out[16][64] __attribute__((aligned(64)));
    int rows = n - nb * 64 < 64 ? (int)(n - nb * 64) : 64;
    int step = amx ? 16 : 4;
    for (int t0 = 0; t0 < T; t0 += step) {
        int nt = T - t0 < step ? T - t0 : step;
        if (amx) block_amx(w, sz, N, K, g, nb, nt, x + t0 * ldx, ldx, xsum + t0 * (K / g), out);
        else block_rows(w, sz, N, K, g, nb, nt, x + t0 * ldx, ldx, xsum + t0 * (K / g), (float (*)[64])out);
        for (int t = 0; t < nt; t++) {
            int64_t o = (t0 + t) * ldy + nb * 64;
            if (y_bf16) for (int r = 0; r < rows; r++) ((uint16_t*)y)[o + r] = float_bf16(out[t][r]);
            else memcpy((float*)y + o, out[t], rows * sizeof(float));
        }
    }
}

/* Blocks nb0 .. nb0 + nbc - 1 (nbc <= CB) as block_store, one row of the vector path CB blocks at once. */
static void run_blocks(const uint8_t* w, const uint16_t* sz, int64_t N, int K, int g, int64_t nb0, int nbc,
                       int T, const uint16_t* x, int64_t ldx, const float* xsum, int64_t n, void* y,
                       int64_t ldy, int y_bf16, int amx) {
    if (T > 1 || amx) {
        for (int c = 0; c < nbc; c++) block_store(w, sz, N, K, g, nb0 + c, T, x, ldx, xsum, n, y, ldy, y_bf16, amx);
        return;
    }
    float out[CB][64] __attribute__((aligned(64)));
    blocks_row1(w, sz, N, K, g, nb0, nbc, x, xsum, out);
    for (int c = 0; c < nbc; c++) {
        int64_t nb = nb0 + c;
        int rows = n - nb * 64 < 64 ? (int)(n - nb * 64) : 64;
        if (y_bf16) for (int r = 0; r < rows; r++) ((uint16_t*)y)[nb * 64 + r] = float_bf16(out[c][r]);
        else memcpy((float*)y + nb * 64, out[c], rows * sizeof(float));
    }
}

/* y [T][n] (bf16 if y_bf16, else fp32) = x [T][K] (bf16) @ Wᵀ for W [N][K] in the kernel layout (N a
   multiple of 64, n <= N rows kept), sz [K/g][N][2] bf16. */
void int4_matvec(const uint8_t* w, const uint16_t* sz, int64_t N, int K, int g, int T, const uint16_t* x,
                 int64_t n, void* y, int y_bf16, int use_amx) {
    float* xsum = malloc(sizeof(float) * T * (K / g));
    group_sums(x, K, T, K, g, xsum);
    int64_t blocks = (n + 63) / 64, tasks = (blocks + CB - 1) / CB;
    int amx = amx_for(use_amx, T, g);
    uint16_t* xpad = NULL;  /* more than 16 rows: tiles of 16 rows, x padded to whole tiles with zeros */
    if (amx && T > 16) {
        xpad = calloc((size_t)(T + 15) / 16 * 16 * K, sizeof(uint16_t));
        memcpy(xpad, x, (size_t)T * K * sizeof(uint16_t));
        x = xpad;
    }
    /* tasks handed out ~256 KB at a time: a thread that another process slows takes fewer; but at least
       one chunk a thread (a [1024, 512] weight is 4 tasks of 64 KB: one chunk ran it on one thread) */
    int64_t chunk = (1 << 18) / ((int64_t)K * 32 * CB) > 1 ? (1 << 18) / ((int64_t)K * 32 * CB) : 1;
    const int64_t share = (tasks + omp_get_max_threads() - 1) / omp_get_max_threads();
    chunk = chunk < share ? chunk : share;
    #pragma omp parallel
    {
        tilecfg saved;
        if (amx) amx_begin(T < 16 ? T : 16, &saved);
        #pragma omp for schedule(dynamic, chunk)
        for (int64_t i = 0; i < tasks; i++) {
            int nbc = blocks - i * CB < CB ? (int)(blocks - i * CB) : CB;
            run_blocks(w, sz, N, K, g, i * CB, nbc, T, x, K, xsum, n, y, n, y_bf16, amx);
        }
        if (amx) amx_end(&saved);
    }
    free(xsum);
    free(xpad);
}

/* A experts (slot a at base + slots[a] * stride): gate_up [2I, D] and down [D, I] in the kernel layout,
   their [G, N, 2] bf16 tables; x [D] bf16 -> y [A, D] fp32. Scratch: h [A, 2I] fp32, hb [A, I] bf16
   (SwiGLU's output rounded to bf16, as the two-call path rounds it), xs [D/g_gu + A * I/g_d]. */
void int4_experts(const uint8_t* base, int64_t stride, const int64_t* slots, int A, int D, int I,
                  int64_t off_gu, int64_t off_down, int64_t off_gusz, int64_t off_dsz, int g_gu, int g_d,
                  const uint16_t* x, float* h, uint16_t* hb, float* xs, float* y, int use_amx) {
    float* xs_gu = xs;
    float* xs_d = xs + D / g_gu;
    group_sums(x, D, 1, D, g_gu, xs_gu);
    int amx_gu = amx_for(use_amx, 1, g_gu), amx_d = amx_for(use_amx, 1, g_d);
    int64_t tasks_gu = (2 * I / 64 + CB - 1) / CB, tasks_d = (D / 64 + CB - 1) / CB;
    #pragma omp parallel
    {
        tilecfg saved;
        if (amx_gu || amx_d) amx_begin(1, &saved);
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < (int64_t)A * tasks_gu; r++) {
            int64_t a = r / tasks_gu, nb = r % tasks_gu * CB;
            int nbc = 2 * I / 64 - nb < CB ? (int)(2 * I / 64 - nb) : CB;
            const uint8_t* slot = base + slots[a] * stride;
            run_blocks(slot + off_gu, (const uint16_t*)(slot + off_gusz), 2 * I, D, g_gu, nb, nbc, 1, x, D, xs_gu,
                       2 * I, h + a * 2 * I, 2 * I, 0, amx_gu);
        }
        #pragma omp for schedule(static)
        for (int64_t a = 0; a < A; a++) {
            const float* ha = h + a * 2 * I;
            for (int i = 0; i < I; i++) {
                float gt = ha[i];
                hb[a * I + i] = float_bf16(gt / (1.0f + expf(-gt)) * ha[I + i]);
            }
            group_sums(hb + a * I, I, 1, I, g_d, xs_d + a * (I / g_d));
        }
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < (int64_t)A * tasks_d; r++) {
            int64_t a = r / tasks_d, nb = r % tasks_d * CB;
            int nbc = D / 64 - nb < CB ? (int)(D / 64 - nb) : CB;
            const uint8_t* slot = base + slots[a] * stride;
            run_blocks(slot + off_down, (const uint16_t*)(slot + off_dsz), D, I, g_d, nb, nbc, 1, hb + a * I, I,
                       xs_d + a * (I / g_d), D, y + a * D, D, 0, amx_d);
        }
        if (amx_gu || amx_d) amx_end(&saved);
    }
}
"""
SOURCE = BF16_C + BODY

MATVEC_ARGS = ("p", "p", "i64", "i", "i", "i", "p", "i64", "p", "i", "i")
EXPERTS_ARGS = ("p", "i64", "p", "i", "i", "i") + ("i64",) * 4 + ("i", "i") + ("p",) * 5 + ("i",)
GROUPS = (32, 64, 128, 256)  # group sizes the kernel takes (the plain-C path holds a group of x: 256 at most)

PORTABLE = False  # build the plain-C path even where the fast one compiles (tests set it)
AMX = True  # the tile path where the CPU has one and it pays (tests turn it off to test the other)


def _source(portable: bool) -> str:
    return ("#define QL_PORTABLE 1\n" if portable else "") + SOURCE


def _name(portable: bool) -> str:
    return "int4_cpu_portable" if portable else "int4_cpu"


def _fn(symbol: str, args: tuple[str, ...]) -> Callable | None:
    return build(_name(PORTABLE), _source(PORTABLE), symbol, args)


def matvec_library() -> Callable | None:
    """`int4_matvec`, None without a compiler (callers use torch's kernel)."""
    return _fn("int4_matvec", MATVEC_ARGS)


def experts_library() -> Callable | None:
    """`int4_experts`, None without a compiler or where the kernels are not `selected` (torch's kernel
    one expert at a time)."""
    return _fn("int4_experts", EXPERTS_ARGS) if selected() else None


def selected() -> bool:
    """Whether the C kernels run the int4 calls: where their AVX512-BF16 path builds. The plain-C path
    measured slower than torch's int4pack kernel (a Sapphire Rapids Xeon, 2 threads: a [16384, 4096]
    matvec 3.1 vs 1.7 ms, a 397B-shaped top-10 step 9-13 vs 16-17 GB/s), so without the fast path
    torch's kernel runs; PORTABLE (its tests) selects the plain-C path anyway."""
    return PORTABLE or _paths(False)[0]


def paths() -> tuple[bool, bool]:
    """(the AVX512-BF16 path, the AMX one) the library was built with: (False, False) for the plain-C
    one, or without a library."""
    return _paths(PORTABLE)


@functools.cache
def _paths(portable: bool) -> tuple[bool, bool]:
    fast, amx = flags(_name(portable), _source(portable), "int4_fast_path", 2)
    return fast, amx


def fast_path() -> bool:
    """The library was built with the AVX512-BF16 path (False: the plain-C one, or no library)."""
    return paths()[0]


def fits(x: torch.Tensor, weight: torch.Tensor, table: torch.Tensor) -> bool:
    """The C kernel takes this call: bf16 on the CPU, whole 64-row blocks, a group size it knows, and the
    kernels `selected` on this CPU."""
    n_pad, half = weight.shape
    groups = table.shape[0]
    return (
        selected()
        and x.dtype == torch.bfloat16
        and table.dtype == torch.bfloat16
        and x.device.type == "cpu"
        and weight.device.type == "cpu"
        and weight.is_contiguous()
        and table.is_contiguous()
        and n_pad % 64 == 0
        and (2 * half) % groups == 0
        and (2 * half) // groups in GROUPS
    )


def matvec(x: torch.Tensor, weight: torch.Tensor, table: torch.Tensor, n: int) -> torch.Tensor | None:
    """x [T, K] bf16 @ Wᵀ -> [T, n] bf16, W uint8 [N_pad, K/2] in the kernel layout with its [G, N_pad, 2]
    bf16 table; None where the library does not build (the caller runs torch's kernel)."""
    fn = matvec_library()
    if fn is None:
        return None
    x = x.contiguous()
    t, k = x.shape
    y = torch.empty(t, n, dtype=torch.bfloat16)
    group = k // table.shape[0]
    args = (weight.data_ptr(), table.data_ptr(), weight.shape[0], k, group, t, x.data_ptr(), n, y.data_ptr())
    fn(*args, 1, int(AMX))
    return y
