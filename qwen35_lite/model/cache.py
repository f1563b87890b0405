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

    @property
    def used_nbytes(self) -> int:
        """The bytes of the positions filled so far (what `clone` holds), not of the grown buffer."""
        return self.k[:, : self.length].numel() * self.k.element_size() * 2

    def clone(self) -> KVCache:
        """A deep copy of the filled positions only: the next append grows it as usual."""
        copy = KVCache.__new__(KVCache)
        copy.k = self.k[:, : self.length].clone()
        copy.v = self.v[:, : self.length].clone()
        copy.length = self.length
        return copy


class DeltaNetState:
    """The causal-conv window (last K raw pre-conv inputs) and the fp32 recurrent state of one layer."""

    def __init__(self, conv_dim: int, kernel: int, n_v_heads: int, dk: int, dv: int, dtype, device) -> None:
        self.conv = torch.zeros(conv_dim, kernel, dtype=dtype, device=device)  # [C, K]
        self.recurrent = torch.zeros(n_v_heads, dk, dv, dtype=torch.float32, device=device)  # [Hv, dk, dv]
        self.started = False  # False: no token seen yet (prefill starts from zeros)

    @property
    def nbytes(self) -> int:
        return self.conv.numel() * self.conv.element_size() + self.recurrent.numel() * 4

    used_nbytes = nbytes  # fixed size: all of it is in use

    def clone(self) -> DeltaNetState:
        copy = DeltaNetState.__new__(DeltaNetState)
        copy.conv = self.conv.clone()
        copy.recurrent = self.recurrent.clone()
        copy.started = self.started  # decides recurrence vs chunked rule for the next single token
        return copy


@dataclass
class ModelCache:
    layers: list[KVCache | DeltaNetState]
    offset: int = 0  # tokens processed so far
    rope_delta: int = 0  # position shift left by image blocks (M-RoPE): decode position = offset + delta
    token_ids: list[int] = field(default_factory=list)  # every id fed so far, for penalties and checks

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.layers)

    @property
    def used_nbytes(self) -> int:
        """The bytes a `clone` takes: KV up to the filled length, DeltaNet state whole."""
        return sum(c.used_nbytes for c in self.layers)

    @torch.inference_mode()  # like the tensors the model writes: the copy is fed to forward as they are
    def clone(self) -> ModelCache:
        """A deep copy on the same device: feeding either one leaves the other as it was."""
        return ModelCache(
            [c.clone() for c in self.layers], self.offset, self.rope_delta, list(self.token_ids)
        )
