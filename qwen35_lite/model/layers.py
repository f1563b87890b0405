"""Small numeric building blocks shared by the layers, each matching the reference's operation order."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm_1p(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """Zero-centred RMSNorm: the stored weight w is applied as (1 + w), in fp32, cast once at the end."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * (1.0 + w.float())).type_as(x)


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """DeltaNet's output norm: plain weight (not 1 + w), normalised value cast back before the weight."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    y = w * y.to(x.dtype)
    return (y * F.silu(gate.float())).to(x.dtype)


def swiglu(x: torch.Tensor, gate_w: torch.Tensor, up_w: torch.Tensor, down_w: torch.Tensor) -> torch.Tensor:
    return F.linear(F.silu(F.linear(x, gate_w)) * F.linear(x, up_w), down_w)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class MRoPE:
    """Partial, interleaved multimodal RoPE: frequency slot k takes its position from row t, h or w.

    Slots k % 3 == 1 (below 3 * section[1]) use the h row, k % 3 == 2 (below 3 * section[2]) the w row,
    the rest the t row; for text all three rows are equal and this is ordinary RoPE.
    """

    def __init__(self, rotary_dim: int, theta: float, mrope_section: list[int]) -> None:
        self.rotary_dim = rotary_dim
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float) / rotary_dim))
        n = rotary_dim // 2
        row = torch.zeros(n, dtype=torch.long)
        for axis in (1, 2):
            row[axis : mrope_section[axis] * 3 : 3] = axis
        self.row_of_slot = row  # [n]: which position row feeds each frequency slot

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [3, T] -> cos, sin [T, rotary_dim] in `dtype` (the reference casts before use)."""
        inv_freq = self.inv_freq.to(positions.device)
        freqs = positions[..., None].float() * inv_freq  # [3, T, n]
        row = self.row_of_slot.to(positions.device)
        picked = freqs.gather(0, row.view(1, 1, -1).expand(1, freqs.shape[1], -1))[0]  # [T, n]
        emb = torch.cat((picked, picked), dim=-1)  # [T, rotary_dim]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [H, T, hd]; rotate the first rotary_dim dims of each head, pass the rest through."""
    r = cos.shape[-1]
    x_rot, x_pass = x[..., :r], x[..., r:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)
