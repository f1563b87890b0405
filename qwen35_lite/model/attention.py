"""Gated full attention: q/k RMSNorm (1 + w), partial M-RoPE, GQA over a KV cache, sigmoid output gate.

One fused projection (fuse.py) gives keys, queries, gates and values.

Legend: T = new tokens, S = cached + new tokens, H = query heads, Hkv = key/value heads, hd = head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..weights.config import TextConfig
from .cache import KVCache
from .layers import apply_rope_, linear, rms_normalize


class Attention:
    def __init__(self, cfg: TextConfig, w: dict[str, torch.Tensor]) -> None:
        self.h, self.hkv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.eps = cfg.rms_norm_eps
        # kqv_proj (fuse.py: rows [keys | queries | gates | values]), o_proj, kq_norm.scale [Hkv + H, hd]
        self.w = w

    def make_cache(self, dtype: torch.dtype, device: torch.device) -> KVCache:
        return KVCache(self.hkv, self.hd, dtype, device)

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """x [T, D]; cos and the signed sin [T, rotary_dim] (layers.MRoPE.cos_sin)."""
        T = x.shape[0]
        w = self.w
        nkq, nq = (self.hkv + self.h) * self.hd, self.h * self.hd
        kqgv = linear(x, w["kqv_proj"])  # slices below, not a split: a split is an op of its own
        kq, gate, v = kqgv[:, :nkq], kqgv[:, nkq : nkq + nq], kqgv[:, nkq + nq :]
        # keys and queries normalised (each head with its own norm's factors) and rotated as one tensor
        kq = kq.reshape(T, self.hkv + self.h, self.hd)
        kq = rms_normalize(kq.float(), self.eps).mul_(w["kq_norm.scale"]).to(x.dtype).transpose(0, 1)
        apply_rope_(kq, cos, sin)
        k, q = kq[: self.hkv], kq[self.hkv :]
        past = cache.length
        k, v = cache.append(k, v.view(T, self.hkv, self.hd).transpose(0, 1))  # [Hkv, S, hd]
        o = _attend(q, k, v, past)  # [H, T, hd]
        o = o.transpose(0, 1).reshape(T, nq) * torch.sigmoid(gate)
        return linear(o, w["o_proj"])


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int) -> torch.Tensor:
    """Causal SDPA where the T new queries sit after `past` cached positions; query head h uses kv head h // rep.

    `enable_gqa` lets SDPA index the shared K/V heads instead of materialising them per query head
    (2·H·S·hd elements a call): bit-identical to `_attend_reference` on the CPU (tests/model/test_attention.py).
    """
    T, S = q.shape[1], k.shape[1]
    gqa = q.shape[0] != k.shape[0]
    if T == 1:
        return F.scaled_dot_product_attention(q[None], k[None], v[None], enable_gqa=gqa)[0]
    if past == 0:
        return F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, enable_gqa=gqa)[0]
    mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=past)
    return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, enable_gqa=gqa)[0]


def _attend_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int) -> torch.Tensor:
    """`_attend` with K/V expanded to every query head first: the obvious version, kept to test against."""
    T, S = q.shape[1], k.shape[1]
    rep = q.shape[0] // k.shape[0]
    k = k.repeat_interleave(rep, dim=0)  # [H, S, hd]
    v = v.repeat_interleave(rep, dim=0)
    if T == 1:
        return F.scaled_dot_product_attention(q[None], k[None], v[None])[0]
    if past == 0:
        return F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True)[0]
    mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=past)
    return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask)[0]
