"""Per-sequence state, created by the model and passed in by the caller (mlx-lm style).

A chat keeps one ModelCache across turns, so earlier tokens are never processed again.
DeltaNet layers hold a fixed-size state (conv window + recurrent matrix): it does not grow with context.
Only full-attention layers hold a KV cache, which grows in fixed steps to avoid a copy per token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

KV_GROW_STEP = 256


class KVCache:
    """Keys (after norm and RoPE) and raw values of one attention layer: [Hkv, S, hd] each."""

    def __init__(self, n_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        self.k = torch.empty(n_kv_heads, 0, head_dim, dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add k, v [Hkv, T, hd]; return all keys and values so far."""
        t = k.shape[1]
        need = self.length + t
        if need > self.k.shape[1]:
            cap = -(-need // KV_GROW_STEP) * KV_GROW_STEP
            self.k = self._grow(self.k, cap)
            self.v = self._grow(self.v, cap)
        self.k[:, self.length : need] = k
        self.v[:, self.length : need] = v
        self.length = need
        return self.k[:, :need], self.v[:, :need]

    def _grow(self, buf: torch.Tensor, cap: int) -> torch.Tensor:
        new = torch.empty(buf.shape[0], cap, buf.shape[2], dtype=buf.dtype, device=buf.device)
        new[:, : self.length] = buf[:, : self.length]
        return new

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


class DeltaNetState:
    """The causal-conv window (last K raw pre-conv inputs) and the fp32 recurrent state of one layer."""

    def __init__(self, conv_dim: int, kernel: int, n_v_heads: int, dk: int, dv: int, dtype, device) -> None:
        self.conv = torch.zeros(conv_dim, kernel, dtype=dtype, device=device)  # [C, K]
        self.recurrent = torch.zeros(n_v_heads, dk, dv, dtype=torch.float32, device=device)  # [Hv, dk, dv]
        self.started = False  # False: no token seen yet (prefill starts from zeros)

    @property
    def nbytes(self) -> int:
        return self.conv.numel() * self.conv.element_size() + self.recurrent.numel() * 4


@dataclass
class ModelCache:
    layers: list[KVCache | DeltaNetState]
    offset: int = 0  # tokens processed so far
    rope_delta: int = 0  # position shift left by image blocks (M-RoPE): decode position = offset + delta
    token_ids: list[int] = field(default_factory=list)  # every id fed so far, for penalties and checks

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.layers)
