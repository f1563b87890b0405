"""One decode token of a Gated DeltaNet layer on the CPU, from its fused projection to the gated norm's
output, in one C call (the layer's torch step, model/deltanet.py `GatedDeltaNet._decode` and
`gated_rms_norm`, is the reference, tested against this one on random inputs).

The torch step is ~27 small ops (the conv window, silu, the q/k norms, the decay, three batched products,
the gated norm) of a few µs of work each, where launching each costs ~5-15 µs on a CPU: at 45 DeltaNet
layers that was milliseconds of a token spent on launching. Here the window slides in place, the
recurrence reads and writes the state twice per value head (decay + Sᵀk, then S + k ⊗ delta + Sᵀq), and
the value heads are split across torch's OpenMP threads when the state is large.

Rounding follows the torch step: in bf16 the conv result, its silu, the sigmoid of b, the recurrence's
output, the normalised output (and its product with a bf16 norm weight) and the result are rounded to bf16
where torch's bf16 tensors round them; fp32 sums run in another order (equal within fp32 rounding).
Plain C: `-O3 -march=native` vectorises the loops over dv; no intrinsics to keep per CPU.
"""

from __future__ import annotations

import torch

from .cbuild import BF16_C, build

PARALLEL_BYTES = 1 << 18  # recurrent state (fp32) from which the value heads are split across threads

BODY = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* a value as the model dtype holds it: rounded to bf16 when bf16, as is in fp32 */
static inline float rnd(float f, int bf16) { return bf16 ? bf16_float(float_bf16(f)) : f; }
static inline float get(const void* p, int64_t i, int bf16) {
    return bf16 ? bf16_float(((const uint16_t*)p)[i]) : ((const float*)p)[i];
}
static inline void put(void* p, int64_t i, float f, int bf16) {
    if (bf16) ((uint16_t*)p)[i] = float_bf16(f); else ((float*)p)[i] = f;
}
static inline float silu(float x) { return x / (1.0f + expf(-x)); }

/* proj [C + Hv*dv + 2*Hv] model dtype: [qkv | z | b | a]; conv [C, K] model dtype (the window: slides in
   place); convw [C, K] fp32; neg_A, dt_bias [Hv] fp32; norm_w [dv] fp32 (round_norm: it is bf16, so its
   product with the normalised output rounds); state [Hv, dk, dv] fp32 in place; out [Hv*dv] model dtype. */
void deltanet_step(const void* proj, void* conv, const float* convw, const float* neg_A,
                   const float* dt_bias, const float* norm_w, int round_norm, float* state, void* out,
                   int C, int K, int hk, int hv, int dk, int dv, float eps, int bf16, int parallel) {
    float* mixed = (float*)malloc(sizeof(float) * (size_t)C);  /* silu(conv) [C]: q [hk*dk] | k | v */
    const int r = hv / hk;
    const float qscale = 1.0f / sqrtf((float)dk);
    #pragma omp parallel if (parallel)
    {
        #pragma omp for schedule(static)
        for (int c = 0; c < C; c++) {
            float acc = 0.0f;
            if (bf16) {
                uint16_t* w = (uint16_t*)conv + (int64_t)c * K;
                memmove(w, w + 1, sizeof(uint16_t) * (K - 1));
                w[K - 1] = ((const uint16_t*)proj)[c];
                for (int k = 0; k < K; k++) acc += bf16_float(w[k]) * convw[(int64_t)c * K + k];
            } else {
                float* w = (float*)conv + (int64_t)c * K;
                memmove(w, w + 1, sizeof(float) * (K - 1));
                w[K - 1] = ((const float*)proj)[c];
                for (int k = 0; k < K; k++) acc += w[k] * convw[(int64_t)c * K + k];
            }
            mixed[c] = rnd(silu(rnd(acc, bf16)), bf16);
        }
        /* q and k: l2-normalised per key head (q also scaled by dk^-1/2), in fp32 */
        #pragma omp for schedule(static)
        for (int j = 0; j < 2 * hk; j++) {
            float* x = mixed + (int64_t)j * dk;
            float ss = 0.0f;
            for (int i = 0; i < dk; i++) ss += x[i] * x[i];
            const float inv = 1.0f / sqrtf(ss + 1e-6f);
            const float s = j < hk ? qscale : 1.0f;
            for (int i = 0; i < dk; i++) x[i] = x[i] * inv * s;
        }
        #pragma omp for schedule(static)
        for (int h = 0; h < hv; h++) {
            const float* q = mixed + (int64_t)(h / r) * dk;
            const float* k = mixed + (int64_t)(hk + h / r) * dk;
            const float* v = mixed + (int64_t)2 * hk * dk + (int64_t)h * dv;
            const int64_t zoff = C, boff = C + (int64_t)hv * dv, aoff = boff + hv;
            const float beta = rnd(1.0f / (1.0f + expf(-get(proj, boff + h, bf16))), bf16);
            const float x = get(proj, aoff + h, bf16) + dt_bias[h];
            const float softplus = x > 20.0f ? x : log1pf(expf(x));
            const float decay = expf(neg_A[h] * softplus);
            float* S = state + (int64_t)h * dk * dv;
            float kv[dv], o[dv];
            for (int j = 0; j < dv; j++) kv[j] = 0.0f;
            for (int i = 0; i < dk; i++) {          /* S <- decay * S;  kv = Sᵀk */
                float* row = S + (int64_t)i * dv;
                const float ki = k[i];
                for (int j = 0; j < dv; j++) { const float s = row[j] * decay; row[j] = s; kv[j] += s * ki; }
            }
            for (int j = 0; j < dv; j++) { kv[j] = (v[j] - kv[j]) * beta; o[j] = 0.0f; }  /* delta */
            for (int i = 0; i < dk; i++) {          /* S <- S + k ⊗ delta;  o = Sᵀq */
                float* row = S + (int64_t)i * dv;
                const float ki = k[i], qi = q[i];
                for (int j = 0; j < dv; j++) { const float s = row[j] + ki * kv[j]; row[j] = s; o[j] += s * qi; }
            }
            /* gated RMS norm over the head: silu(z) * (w * rms_normalize(o)) */
            float ss = 0.0f;
            for (int j = 0; j < dv; j++) { o[j] = rnd(o[j], bf16); ss += o[j] * o[j]; }
            const float inv = 1.0f / sqrtf(ss / dv + eps);
            for (int j = 0; j < dv; j++) {
                float y = rnd(o[j] * inv, bf16) * norm_w[j];
                if (round_norm) y = rnd(y, 1);
                const float z = get(proj, zoff + (int64_t)h * dv + j, bf16);
                put(out, (int64_t)h * dv + j, silu(z) * y, bf16);
            }
        }
    }
    free(mixed);
}
"""
SOURCE = BF16_C + BODY

ARGS = ("p",) * 9 + ("i",) * 6 + ("f", "i", "i")


def library():
    """The compiled step (cbuild.py); None without a compiler or when the build fails."""
    return build("deltanet_step", SOURCE, "deltanet_step", ARGS)


def usable(proj: torch.Tensor, conv: torch.Tensor) -> bool:
    """Whether the step can take this projection and conv window: one bf16 or fp32 row on the CPU, a
    contiguous window of its dtype, and a built kernel."""
    return (
        proj.device.type == "cpu"
        and proj.dtype in (torch.bfloat16, torch.float32)
        and proj.shape[0] == 1
        and proj.is_contiguous()
        and conv.dtype == proj.dtype
        and conv.is_contiguous()
        and library() is not None
    )


def deltanet_step(
    proj: torch.Tensor,
    conv: torch.Tensor,
    conv_w: torch.Tensor,
    neg_a: torch.Tensor,
    dt_bias: torch.Tensor,
    norm_w: torch.Tensor,
    round_norm: bool,
    state: torch.Tensor,
    heads: tuple[int, int, int, int],
    eps: float,
) -> torch.Tensor:
    """proj [1, C + Hv·dv + 2·Hv] (qkv | z | b | a), conv window [C, K] (slid in place, proj's dtype),
    conv_w [C, K] fp32, neg_a/dt_bias [Hv] fp32, norm_w [dv] fp32 (round_norm: its values are bf16's and
    the product with the normalised output rounds to bf16), state [Hv, dk, dv] fp32 (updated in place);
    heads = (Hk, Hv, dk, dv). -> the gated norm's output [1, Hv·dv] in proj's dtype, for out_proj."""
    hk, hv, dk, dv = heads
    C, K = conv.shape
    assert state.is_contiguous()
    out = torch.empty(1, hv * dv, dtype=proj.dtype)
    parallel = int(state.numel() * 4 >= PARALLEL_BYTES and torch.get_num_threads() > 1)
    library()(
        proj.data_ptr(), conv.data_ptr(), conv_w.data_ptr(), neg_a.data_ptr(), dt_bias.data_ptr(),
        norm_w.data_ptr(), int(round_norm), state.data_ptr(), out.data_ptr(),
        C, K, hk, hv, dk, dv, eps, int(proj.dtype == torch.bfloat16), parallel,
    )  # fmt: skip
    return out
