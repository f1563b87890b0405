"""Gated DeltaNet (linear attention) layer, with the chunked prefill kernel beside its reference recurrence.

Legend: T = tokens, C = conv channels (2·Hk·dk + Hv·dv), Hk/Hv = key/value heads, dk/dv = head dims,
S = recurrent state [Hv, dk, dv] (fp32), L = chunk length (64).
Per step, for each value head:  S <- exp(g)·S;  S <- S + k ⊗ beta·(v − Sᵀk);  o = Sᵀq.
"""

from __future__ import annotations

from itertools import accumulate

import torch
import torch.nn.functional as F

from ..kernels import deltanet_cpu
from ..weights.config import TextConfig
from .cache import DeltaNetState
from .layers import gated_rms_norm, linear, rms_normalize

CHUNK = 64
L2_EPS = 1e-6  # of the q/k l2norm


def l2norm(x: torch.Tensor, eps: float = L2_EPS) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference recurrence, one token at a time. q, k [Hv, T, dk], v [Hv, T, dv], g/beta [Hv, T] fp32
    (q already scaled by dk^-1/2); state [Hv, dk, dv]. Returns (o [Hv, T, dv], new state)."""
    out = torch.empty_like(v)
    for t in range(q.shape[1]):
        state = state * g[:, t].exp()[:, None, None]
        kv_mem = (state * k[:, t, :, None]).sum(dim=-2)  # [Hv, dv]
        delta = (v[:, t] - kv_mem) * beta[:, t, None]
        state = state + k[:, t, :, None] * delta[:, None, :]
        out[:, t] = (state * q[:, t, :, None]).sum(dim=-2)
    return out, state


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked (UT-transform) form of the same recurrence, same shapes and result.

    Within a chunk the L delta updates collapse into one triangular solve; across chunks the state is
    carried sequentially. Operation order follows the reference so bf16 prefill rounds the same way.
    """
    H, T, _ = q.shape
    pad = (CHUNK - T % CHUNK) % CHUNK
    q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    beta, g = (F.pad(x, (0, pad)) for x in (beta, g))
    n = (T + pad) // CHUNK
    v_beta = v * beta[..., None]
    k_beta = k * beta[..., None]
    q, k, k_beta, v_beta = (
        x.reshape(H, n, CHUNK, x.shape[-1]) for x in (q, k, k_beta, v_beta)
    )  # [H, n, L, d]
    g = g.reshape(H, n, CHUNK).cumsum(dim=-1)  # [H, n, L]: log decay from chunk start
    upper = torch.ones(CHUNK, CHUNK, dtype=torch.bool, device=q.device).triu(1)
    decay = (g[..., :, None] - g[..., None, :]).masked_fill(upper, float("-inf")).exp()  # [H, n, L, L]
    ut = (k_beta @ k.transpose(-1, -2)) * decay
    intra = (q @ k.transpose(-1, -2)) * decay
    u = torch.linalg.solve_triangular(ut, v_beta, upper=False, unitriangular=True)  # [H, n, L, dv]
    w = torch.linalg.solve_triangular(ut, k_beta * g.exp()[..., None], upper=False, unitriangular=True)
    q = q * g.exp()[..., None]
    k = k * (g[..., -1:] - g).exp()[..., None]
    chunk_decay = g[..., -1].exp()[..., None, None]  # [H, n, 1, 1]
    out = torch.empty_like(u)
    for i in range(n):
        v_new = u[:, i] - w[:, i] @ state
        out[:, i] = q[:, i] @ state + intra[:, i] @ v_new
        state = state * chunk_decay[:, i] + k[:, i].transpose(-1, -2) @ v_new
    return out.reshape(H, n * CHUNK, -1)[:, :T], state


def causal_conv(window: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Depthwise conv of window [C, K - 1 + T] with weight [C, 1, K] -> [C, T], in window's dtype.

    Computed in fp32 and rounded once: CPU bf16 conv1d accumulates in fp32 and rounds once too, so the
    bits are those of `causal_conv_reference` (tests/model/test_deltanet.py), but it is 7-45x slower.
    """
    C = window.shape[0]
    return F.conv1d(window[None].float(), weight.float(), groups=C)[0].to(window.dtype)


def causal_conv_reference(window: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The conv in the model dtype, as transformers runs it (without causal-conv1d)."""
    return F.conv1d(window[None], weight, groups=window.shape[0])[0]


def decode_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
) -> torch.Tensor:
    """One token of the recurrence with batched matmuls, updating `state` [Hv, dk, dv] in place.

    q, k [Hv, 1, dk], v [Hv, 1, dv], decay = exp(g) and beta [Hv, 1, 1], all fp32. Returns o [Hv, 1, dv].
    The sums over dk run as matmuls, in another order than `recurrent_gated_delta_rule`'s: equal to it
    within fp32 rounding (tests/model/test_deltanet.py)."""
    state.mul_(decay)
    delta = torch.baddbmm(v, k, state, alpha=-1).mul_(beta)  # (v − Sᵀk)·beta [Hv, 1, dv]
    state.addcmul_(k.transpose(1, 2), delta)  # S + k ⊗ delta, each product rounded as the reference's
    return torch.bmm(q, state)


class GatedDeltaNet:
    """Weights of one linear-attention layer and its forward over T tokens with an explicit state."""

    def __init__(self, cfg: TextConfig, w: dict[str, torch.Tensor]) -> None:
        self.hk, self.hv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        self.dk, self.dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        self.kernel = cfg.linear_conv_kernel_dim
        self.eps = cfg.rms_norm_eps
        # in_proj_qkvzba (fuse.py: rows [qkv | z | b | a]), conv1d [C, 1, K], dt_bias fp32,
        # neg_A = -exp(A_log) fp32, norm (and norm_f32), out_proj
        self.w = w
        kd = self.hk * self.dk
        # l2norm(x) = rms_normalize(x, eps / dk) / √dk, and q is scaled by 1/√dk after it: q rows are
        # multiplied by 1/dk, k rows by 1/√dk, in the multiply that expands them to the value heads
        r = self.hv // self.hk
        scale = torch.tensor([1.0 / self.dk, self.dk**-0.5], device=w["out_proj"].device)
        self.qk_scale = scale.view(2, 1, 1, 1).expand(2, self.hk, r, 1)  # [2, Hk, r, 1]
        self.splits = [self.conv_dim, self.hv * self.dv, self.hv, self.hv]
        self.qkv_splits = [kd, kd, self.hv * self.dv]

    @property
    def conv_dim(self) -> int:
        return 2 * self.hk * self.dk + self.hv * self.dv

    def make_state(self, dtype: torch.dtype, device: torch.device) -> DeltaNetState:
        return DeltaNetState(self.conv_dim, self.kernel, self.hv, self.dk, self.dv, dtype, device)

    def __call__(self, x: torch.Tensor, state: DeltaNetState) -> torch.Tensor:
        T = x.shape[0]
        w = self.w
        proj = linear(x, w["in_proj_qkvzba"])
        if T == 1 and state.started and deltanet_cpu.usable(proj, state.conv):
            return linear(self._decode_kernel(proj, state), w["out_proj"])
        qkv, _, b, _ = _cut(proj, self.splits)
        _, z, _, a = _cut(proj.float(), self.splits)  # one cast for the parts used in fp32
        beta = b.sigmoid().float()  # [T, Hv]: the sigmoid in the model dtype, as the reference
        g = w["neg_A"] * F.softplus(a + w["dt_bias"])  # [T, Hv] log decay
        z = z.view(T, self.hv, self.dv)
        if T == 1 and state.started:
            o = self._decode(qkv, beta, g, state)
        else:
            o = self._chunk(qkv, beta, g, state)
        state.started = True
        o = gated_rms_norm(o.to(x.dtype), z, w["norm"], self.eps).reshape(T, -1)  # [T, Hv·dv]
        return linear(o, w["out_proj"])

    def _decode_kernel(self, proj: torch.Tensor, state: DeltaNetState) -> torch.Tensor:
        """One token through the fused C step (kernels/deltanet_cpu.py): what `_decode` and the gated norm
        compute, in one call. -> the gated norm's output [1, Hv·dv]."""
        w = self.w
        round_norm = w["norm"].dtype == torch.bfloat16 and proj.dtype == torch.bfloat16
        heads = (self.hk, self.hv, self.dk, self.dv)
        return deltanet_cpu.deltanet_step(
            proj, state.conv, w["conv1d_f32"], w["neg_A"], w["dt_bias"], w["norm_f32"], round_norm,
            state.recurrent, heads, self.eps,
        )  # fmt: skip

    def _decode(self, qkv: torch.Tensor, beta: torch.Tensor, g: torch.Tensor, state: DeltaNetState):
        """One token: the conv as one dot product per channel, the recurrence in place. -> o [1, Hv, dv]."""
        hk, hv, dk, dv = self.hk, self.hv, self.dk, self.dv
        state.conv = torch.cat([state.conv[:, 1:], qkv.T], dim=-1)  # [C, K]: the window slides by one
        # one dot product per channel, as a batch of [1, K] @ [K, 1] matmuls in fp32, rounded once, as the
        # conv kernel accumulates (a bf16 bmm took 10x longer on the CPU: 280 vs 25 us at C = 2048)
        C = state.conv.shape[0]
        conv = torch.bmm(state.conv.float().view(C, 1, self.kernel), self.w["conv1d_f32"])  # [C, 1, 1]
        mixed = F.silu(conv.view(C).to(qkv.dtype)).float()  # [C]
        qk = rms_normalize(mixed[: 2 * hk * dk].view(2, hk, 1, dk), L2_EPS / dk)
        # v heads r·j … r·j+r−1 share q/k head j: the scaling multiply broadcasts each over its r heads
        q, k = (qk * self.qk_scale).view(2, hv, 1, dk)
        v = mixed[2 * hk * dk :].view(hv, 1, dv)
        o = decode_gated_delta_rule(q, k, v, g.exp().view(hv, 1, 1), beta.view(hv, 1, 1), state.recurrent)
        return o.view(1, hv, dv)

    def _chunk(self, qkv: torch.Tensor, beta: torch.Tensor, g: torch.Tensor, state: DeltaNetState):
        """T tokens (a prefill chunk, or the first token): the chunked rule. -> o [T, Hv, dv]."""
        T = qkv.shape[0]
        window = torch.cat([state.conv, qkv.T], dim=-1)  # [C, K - 1 + T + 1]
        state.conv = window[:, -self.kernel :].clone()
        mixed = F.silu(causal_conv(window[:, 1:], self.w["conv1d"])).T  # [T, C]
        q, k, v = _cut(mixed, self.qkv_splits)
        r = self.hv // self.hk
        # v heads r·j … r·j+r−1 share q/k head j: expand with repeat_interleave, not tile
        q = q.reshape(T, self.hk, self.dk).repeat_interleave(r, dim=1).transpose(0, 1).float()  # [Hv, T, dk]
        k = k.reshape(T, self.hk, self.dk).repeat_interleave(r, dim=1).transpose(0, 1).float()
        v = v.reshape(T, self.hv, self.dv).transpose(0, 1).float()  # [Hv, T, dv]
        q = l2norm(q) * self.dk**-0.5
        k = l2norm(k)
        beta, g = beta.T.contiguous(), g.T.contiguous()  # [Hv, T]
        o, state.recurrent = chunk_gated_delta_rule(q, k, v, g, beta, state.recurrent)
        return o.transpose(0, 1)


def _cut(x: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """x split along its last dim into views of `sizes`: slices, which launch nothing (a split does)."""
    ends = list(accumulate(sizes))
    return [x[..., e - n : e] for n, e in zip(sizes, ends)]
