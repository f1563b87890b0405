"""FP8 block-128 experts computed by the CPU straight from FP8 slots: a small C kernel (compiled once, on
first use, with the machine's C compiler, and loaded through ctypes), and the torch reference beside it.

Why a kernel: converting FP8 to bf16 with torch ops costs several full passes over the weights (torch's
own `.to()` is scalar on x86; the bit-level conversion of weights/fp8.py six elementwise passes), far
slower than the matrix-vector product itself, so FP8 slots used to be dequantised on entry into bf16
slots (twice the bytes, half the slots). The kernel reads each FP8 byte once. Its fast path (AVX512-BF16
and VBMI) turns 64 bytes into 64 exact bf16 values by two 128-entry byte lookups and multiplies them with
bf16 x by vdpbf16ps (fp32 sums); each 128-column block's sum is scaled by the block's scale. The plain-C
path (any compiler, any CPU) widens each byte through a 256-entry fp32 table, several times slower than
memory: the format takes the kernel by default only where the fast path is built. A decode step's A
experts run in one call (one OpenMP region: gate_up rows, SwiGLU, down rows), the slot numbers read by the
kernel from the device-side tensor: no host read, no copy of any weight.

A prefill's rows (`prefill_ffn`): the expert dequantised once a call into fp32 by one C pass (the same
bits as weights/fp8.py), then fp32 matmuls over blocks of PREFILL_ROWS rows; `prefill_nbytes` is what
that holds, counted by the memory plan.

No compiler, a failed build (kernels/cbuild.py), or shapes that are not whole 128-blocks: `available()` is
False and the format keeps dequantising on entry (the path before).

Legend: A = experts run, D = hidden, I = expert FFN width, B = 128 (block).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ...kernels.cbuild import build, flags
from ...weights.fp8 import FP8_BLOCK, dequantize_block

SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>
#if defined(__AVX512BF16__) && defined(__AVX512VBMI__) && !defined(FP8_PORTABLE)
#define FP8_BF16 1
#include <immintrin.h>
#endif

/* e4m3fn byte -> float: exponent e (4 bits, bias 7), mantissa m (3 bits); e = 0 is m * 2^-9. */
static inline float e4m3(uint8_t b) {
    int em = b & 0x7F, e = em >> 3, m = em & 7;
    float v = e ? ldexpf((float)(8 + m), e - 10) : ldexpf((float)m, -9);
    return (b & 0x80) ? -v : v;
}

#ifdef FP8_BF16
/* AVX512-BF16 + VBMI: 64 FP8 bytes a step become 64 bf16 values (exact: e4m3 has 4 significant bits) by
   two 128-entry byte lookups (vpermi2b: the bf16's low and high bytes of |value|, subnormals included),
   the sign or-ed into the high byte, and the bytes interleaved into 16-bit lanes (unpacklo/hi, within
   128-bit lanes); vdpbf16ps multiplies them by bf16 x and sums pairs in fp32. x is bf16 in the lanes'
   order (xpos: a 64-column chunk's element k sits at xpos(k)), so no shuffle is spent on the weights. */
typedef uint16_t xval;

static inline uint16_t to_x(float f) {  /* fp32 -> bf16, round to nearest even */
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

static inline int64_t xpos(int64_t c) {
    int64_t k = c & 63, lane = k >> 4, j = k & 15;
    return (c - k) + (j < 8 ? lane * 8 + j : 32 + lane * 8 + j - 8);
}

static void tables(__m512i t[4]) {
    uint8_t lo[128], hi[128];
    for (int em = 0; em < 128; em++) {
        float v = e4m3((uint8_t)em);
        uint32_t u;
        memcpy(&u, &v, 4);
        u = em == 0x7F ? 0x7FC0 : u >> 16;  /* 0x7F is NaN (never in a checkpoint); the rest are exact */
        lo[em] = u & 0xFF;
        hi[em] = u >> 8;
    }
    t[0] = _mm512_loadu_si512(lo); t[1] = _mm512_loadu_si512(lo + 64);
    t[2] = _mm512_loadu_si512(hi); t[3] = _mm512_loadu_si512(hi + 64);
}

/* 64 FP8 bytes at w as bf16 times x (64 bf16 in the lanes' order), added into acc0 / acc1. */
static inline void dot64(const uint8_t* w, const xval* x, const __m512i* t, __m512* acc0, __m512* acc1) {
    const __m512i sign = _mm512_set1_epi8((char)0x80);
    _mm_prefetch((const char*)w + 1024, _MM_HINT_T0);  /* 16 lines ahead: +20-30% from DRAM, measured */
    __m512i u = _mm512_loadu_si512(w);
    __m512i lo = _mm512_permutex2var_epi8(t[0], u, t[1]);  /* index: the byte's low 7 bits */
    __m512i hi = _mm512_permutex2var_epi8(t[2], u, t[3]);
    hi = _mm512_ternarylogic_epi32(hi, u, sign, 0xF8);  /* hi | (u & 0x80) */
    *acc0 = _mm512_dpbf16_ps(*acc0, (__m512bh)_mm512_unpacklo_epi8(lo, hi), (__m512bh)_mm512_loadu_si512(x));
    *acc1 = _mm512_dpbf16_ps(*acc1, (__m512bh)_mm512_unpackhi_epi8(lo, hi), (__m512bh)_mm512_loadu_si512(x + 32));
}

/* One row: sum over 128-blocks of scale[block] * dot(w[block], x[block]); four independent sums a block
   (the dot products' latency, not their rate, would bound one chain). */
static float row_dot(const uint8_t* w, const float* s, const xval* x, int cols, const __m512i* t) {
    __m512 acc_all = _mm512_setzero_ps();
    for (int b = 0; b < cols; b += 128) {
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        dot64(w + b, x + b, t, &a0, &a1);
        dot64(w + b + 64, x + b + 64, t, &a2, &a3);
        __m512 acc = _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3));
        acc_all = _mm512_fmadd_ps(_mm512_set1_ps(s[b / 128]), acc, acc_all);
    }
    return _mm512_reduce_add_ps(acc_all);
}
#define TABLES __m512i t[4]; tables(t);
#else
/* Portable: each byte's fp32 value from a 256-entry table (e4m3 above), an fp32 dot per block; x fp32
   in its own order. Several times slower than memory: the format takes this kernel by default only where
   the fast path is built (fp8_fast). */
typedef float xval;
static inline float to_x(float f) { return f; }
static inline int64_t xpos(int64_t c) { return c; }

static float row_dot(const uint8_t* w, const float* s, const xval* x, int cols, const float* t) {
    float total = 0.0f;
    for (int b = 0; b < cols; b += 128) {
        float acc = 0.0f;
        for (int c = b; c < b + 128; c++) acc += t[w[c]] * x[c];
        total += s[b / 128] * acc;
    }
    return total;
}
#define TABLES float t[256]; for (int i = 0; i < 256; i++) t[i] = e4m3((uint8_t)i);
#endif

/* *fast = 1 where the AVX512-BF16 path is built (the kernel then runs near memory speed), else 0. */
void fp8_fast(int32_t* fast) {
#ifdef FP8_BF16
    *fast = 1;
#else
    *fast = 0;
#endif
}

/* y [rows] = W x for one FP8 matrix W [rows, cols] with block scales s [rows/128, cols/128]; x [cols]
   fp32; scratch [cols] fp32 (the kernel's own row loop, exposed for its tests). */
void fp8_matvec(const uint8_t* w, const float* s, int rows, int cols, const float* x, float* scratch,
                float* y) {
    TABLES
    xval* xp = (xval*)scratch;
    for (int64_t c = 0; c < cols; c++) xp[xpos(c)] = to_x(x[c]);
    #pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++)
        y[r] = row_dot(w + r * cols, s + (r / 128) * (cols / 128), xp, cols, t);
}

/* A experts of one layer's FP8 slots (slot k at base + slots[k] * stride; parts at the given offsets:
   gate_up weights [2I, D], down [D, I], their fp32 block scales [2I/128, D/128] and [D/128, I/128]).
   x [D] fp32 -> y [A, D] fp32; h [A * 2I + D + A * I] fp32 scratch (gate_up's outputs, then x and the A
   down inputs as the row loop reads them). */
void fp8_experts(const uint8_t* base, int64_t stride, const int64_t* slots, int A, int D, int I,
                 int64_t off_gu, int64_t off_down, int64_t off_gus, int64_t off_ds,
                 const float* x, float* h, float* y) {
    TABLES
    xval* xp = (xval*)(h + (int64_t)A * 2 * I);
    xval* hp = xp + D;
    for (int64_t c = 0; c < D; c++) xp[xpos(c)] = to_x(x[c]);
    #pragma omp parallel
    {
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < (int64_t)A * 2 * I; r++) {
            int64_t a = r / (2 * I), i = r % (2 * I);
            const uint8_t* slot = base + slots[a] * stride;
            h[r] = row_dot(slot + off_gu + i * D, (const float*)(slot + off_gus) + (i / 128) * (D / 128),
                           xp, D, t);
        }
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < (int64_t)A * I; r++) {
            int64_t a = r / I, i = r % I;
            float g = h[a * 2 * I + i], u = h[a * 2 * I + I + i];
            hp[a * I + xpos(i)] = to_x(g / (1.0f + expf(-g)) * u);  /* silu(g) * u */
        }
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < (int64_t)A * D; r++) {
            int64_t a = r / D, d = r % D;
            const uint8_t* slot = base + slots[a] * stride;
            y[r] = row_dot(slot + off_down + d * I, (const float*)(slot + off_ds) + (d / 128) * (I / 128),
                           hp + a * I, I, t);
        }
    }
}

/* out [rows, cols] fp32 = lut[w] * s per 128-block (s [ceil(rows/128), ceil(cols/128)]): an FP8 matrix
   dequantised in one pass; lut = the 256 codes' fp32 values (torch's own conversion, so the same bits
   as weights/fp8.py's dequantize_block). */
void fp8_dequant(const uint8_t* w, const float* s, int rows, int cols, const float* lut, float* out) {
    int nb = (cols + 127) / 128;
    #pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const uint8_t* wr = w + r * cols;
        const float* sr = s + (r / 128) * nb;
        float* o = out + r * cols;
        for (int c = 0; c < cols; c++) o[c] = lut[wr[c]] * sr[c / 128];
    }
}
"""


ARGS = ("p", "i64", "p", "i", "i", "i", "i64", "i64", "i64", "i64", "p", "p", "p")
DEQUANT_ARGS = ("p", "p", "i", "i", "p", "p")
MATVEC_ARGS = ("p", "p", "i", "i", "p", "p", "p")
PORTABLE = "#define FP8_PORTABLE 1\n"  # the plain-C path on any machine (its tests)
PREFILL_ROWS = 64  # a prefill call's rows go through the fp32 FFN this many at a time (bounded temporaries)


def library():
    """The compiled kernel (kernels/cbuild.py), None without a compiler or when the build fails."""
    return build("fp8_experts", SOURCE, "fp8_experts", ARGS)


def matvec_fn(portable: bool = False):
    """fp8_matvec (one FP8 matrix times an fp32 vector: the kernel's row loop), the portable C path if
    asked; None where the kernel does not build."""
    name, source = ("fp8_portable", PORTABLE + SOURCE) if portable else ("fp8_experts", SOURCE)
    return build(name, source, "fp8_matvec", MATVEC_ARGS)


def fits(hidden: int, inter: int) -> bool:
    """Whole 128-blocks on both sides of every matrix (the kernel has no ragged last block)."""
    return hidden % FP8_BLOCK == 0 and inter % FP8_BLOCK == 0


def available(hidden: int, inter: int, fast_only: bool = True) -> bool:
    """The kernel runs these experts here: whole blocks and a library built (`fast_only`: with its
    AVX512-BF16 path, near memory speed; the portable C path runs several times slower)."""
    if not fits(hidden, inter) or library() is None:
        return False
    return not fast_only or _fast()


@functools.cache
def _fast() -> bool:
    return flags("fp8_experts", SOURCE, "fp8_fast", 1)[0]


class StackedFp8Cpu:
    """A layer's FP8 slots run by the kernel. `offsets`: byte offsets in a slot of gate_up's weights,
    down's weights, gate_up's scales, down's scales (the raw layout puts gate and up back to back)."""

    def __init__(self, buffer: torch.Tensor, stride: int, D: int, I: int, offsets: tuple[int, int, int, int]):
        self.buffer, self.stride, self.D, self.I, self.offsets = buffer, stride, D, I, offsets

    def __call__(self, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """x [1, D], slots [A] (on the CPU) -> [A, D] in x's dtype, slots order."""
        slots = slots.to(torch.int64).contiguous()
        A = slots.shape[0]
        xf = x.reshape(-1).float().contiguous()
        h = torch.empty(A * 2 * self.I + self.D + A * self.I)  # scratch: fp8_experts' h
        y = torch.empty(A, self.D)
        library()(
            self.buffer.data_ptr(), self.stride, slots.data_ptr(), A, self.D, self.I, *self.offsets,
            xf.data_ptr(), h.data_ptr(), y.data_ptr(),
        )  # fmt: skip
        return y.to(x.dtype)

    def rows(self, x: torch.Tensor, slots: list[int]) -> torch.Tensor:
        return self(x, torch.tensor(slots, dtype=torch.int64))


# ---- prefill: an expert dequantised once a call, its rows through fp32 matmuls ------------------------


@functools.cache
def _lut() -> torch.Tensor:
    """The 256 e4m3fn codes' fp32 values, by torch's own conversion (the dequantisation's table)."""
    return torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()


def dequantize_into(w: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """FP8 w [o, i] (contiguous) with fp32 block scales -> `out` [o, i] fp32 in one pass (the C kernel):
    the bits of weights/fp8.py's dequantize_block, without its fp32 and int16 temporaries."""
    fn = build("fp8_experts", SOURCE, "fp8_dequant", DEQUANT_ARGS)
    o, i = w.shape
    fn(w.data_ptr(), scale.contiguous().data_ptr(), o, i, _lut().data_ptr(), out.data_ptr())
    return out


def prefill_ffn(x: torch.Tensor, raw: list[torch.Tensor], D: int, I: int) -> torch.Tensor:
    """x [T, D] through the expert whose raw parts (gate, up, down weights, then scales) are `raw`: the
    weights dequantised into fp32 once, the rows run PREFILL_ROWS at a time by fp32 matmuls, the output in
    x's dtype. fp32 because torch's bf16 CPU matmul (oneDNN) keeps a primitive and its scratch for every
    row count it meets, memory the run does not give back (a 600-token prefill held ~77 MiB of it); fp32
    (MKL) keeps none, and the fp32 weights are what the dequantisation makes anyway."""
    gate_up, down = torch.empty(2 * I, D), torch.empty(D, I)
    dequantize_into(raw[0], raw[3], gate_up[:I])
    dequantize_into(raw[1], raw[4], gate_up[I:])
    dequantize_into(raw[2], raw[5], down)
    out = torch.empty_like(x)
    for r in range(0, x.shape[0], PREFILL_ROWS):
        g, u = F.linear(x[r : r + PREFILL_ROWS].float(), gate_up).chunk(2, dim=-1)  # [R, I] each
        out[r : r + PREFILL_ROWS] = F.linear(F.silu(g) * u, down)
    return out


def decode_nbytes(D: int, I: int, A: int, dtype: torch.dtype) -> int:
    """What a StackedFp8Cpu call holds: x in fp32, the kernel's scratch, its fp32 output and the cast."""
    return (D + A * 2 * I + D + A * I + A * D) * 4 + A * D * dtype.itemsize


def prefill_nbytes(D: int, I: int) -> int:
    """What `prefill_ffn` holds besides x and its output: the fp32 weights and one row block's fp32
    temporaries (x, gate_up's output, silu(g), silu(g) * u, the down output)."""
    return 3 * I * D * 4 + PREFILL_ROWS * (2 * D + 4 * I) * 4


def reference_ffn(x: torch.Tensor, raw: list[torch.Tensor]) -> torch.Tensor:
    """The kernel's reference: the expert's FP8 weights dequantised in fp32 (w * scale per block), then the
    SwiGLU FFN in fp32; raw = gate, up, down weights, then their scales."""
    gate, up, down = (dequantize_block(w, s) for w, s in zip(raw[:3], raw[3:]))
    g, u = F.linear(x.float(), torch.cat([gate, up])).chunk(2, dim=-1)
    return F.linear(F.silu(g) * u, down)
