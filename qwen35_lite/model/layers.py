"""Small numeric building blocks shared by the layers, each matching the reference's operation order.

Decode on the CPU pays per op launched, so these are written in as few ops as exactness allows (the
`_reference` forms are kept to test against); the norm weights arrive precomputed (model/fuse.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels import (
    linear,  # x @ wᵀ: torch.mv for one row, F.linear for more, a compact weight's kernel
    norm_cpu,
)

_CONSTANTS: dict[tuple, torch.Tensor] = {}


def constant(values: tuple[float, ...], like: torch.Tensor) -> torch.Tensor:
    """A small constant tensor in like's dtype and device, made once: an operand that costs no op per use
    (a Python scalar operand costs a copy of its own)."""
    key = (values, like.dtype, like.device)
    if key not in _CONSTANTS:
        _CONSTANTS[key] = torch.tensor(values, dtype=like.dtype, device=like.device)
    return _CONSTANTS[key]


def plus_minus(x: torch.Tensor) -> torch.Tensor:
    """[..., D] -> [..., 2D]: [x, −x] in one op (negating is exact)."""
    return (x.unsqueeze(-2) * constant((1.0, -1.0), x)[:, None]).flatten(-2)


def rms_normalize(x: torch.Tensor, eps: float, weight: torch.Tensor | None = None) -> torch.Tensor:
    """x · rsqrt(mean(x², -1) + eps) (times weight [D] if given), computed in fp32 and rounded once to the
    dtype of x: one op where the written-out form takes five or more.

    It is the LayerNorm of [x, −x]: that has mean 0, so its variance is mean(x²). (The mean comes out as
    ~1e-7·rms rather than exactly 0, an error of fp32's order: tests/model/test_layers.py.) `weight` must be
    fp32 of length 2D (its first half applies); with one, the CPU kernel takes bf16 x as it is and rounds
    once, as the written-out form does."""
    D = x.shape[-1]
    if weight is not None and weight.dtype != x.dtype and x.device.type != "cpu":
        # layer_norm's mixed input/weight dtypes are a CPU feature: elsewhere normalise in fp32, round once
        return rms_normalize(x.float(), eps, weight).to(x.dtype)
    return F.layer_norm(plus_minus(x), (2 * D,), weight, None, eps)[..., :D]


def rms_norm_1p(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """Zero-centred RMSNorm. `scale` is the applied factor (1 + w) in fp32, twice over ([2D]:
    fuse.norm_scale): normalised and scaled in fp32, cast once at the end. Contiguous, as the MLP may view
    it (a no-op for one token, whose row is contiguous already). One row on the CPU: one C call
    (kernels/norm_cpu.py)."""
    if norm_cpu.usable(x, scale):
        return norm_cpu.add_rms_norm(x, None, scale, eps)[1]
    return rms_normalize(x, eps, scale).contiguous()


def add_rms_norm_1p(
    h: torch.Tensor, delta: torch.Tensor, scale: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add and the norm after it: (h + delta, rms_norm_1p(h + delta)), one C call for one row
    on the CPU (a decode step), torch's two otherwise."""
    if norm_cpu.usable(h, scale) and delta.dtype == h.dtype and delta.is_contiguous():
        return norm_cpu.add_rms_norm(h, delta, scale, eps)
    h = h + delta
    return h, rms_norm_1p(h, scale, eps)


def rms_norm_1p_reference(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """The stored weight w applied as (1 + w), as transformers writes it: kept to test against."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * (1.0 + w.float())).type_as(x)


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """DeltaNet's output norm: plain weight (not 1 + w), normalised value cast back before the weight.
    gate is fp32 (silu taken in fp32, as the reference does after casting it)."""
    return (F.silu(gate) * (w * rms_normalize(x, eps))).to(x.dtype)


def gated_rms_norm_reference(
    x: torch.Tensor, gate: torch.Tensor, w: torch.Tensor, eps: float
) -> torch.Tensor:
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    y = w * y.to(x.dtype)
    return (y * F.silu(gate.float())).to(x.dtype)


def swiglu(x: torch.Tensor, gate_up, down) -> torch.Tensor:
    """The SwiGLU MLP on gate/up fused at load: gate_up [2I, D], down [D, I]; the same operations as a
    dense expert (experts/formats/base.ffn with `linear`), so the dense family rounds as transformers does."""
    g, u = linear(x, gate_up).chunk(2, dim=-1)
    return linear(F.silu(g) * u, down)


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
        self._on: torch.device | None = None

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """inv_freq and the slot rows on `device`, each doubled to rotary_dim, and the sign of rotate_half."""
        if self._on != device:
            self._inv_freq2 = self.inv_freq.repeat(2).to(device)
            self._row2 = self.row_of_slot.repeat(2).to(device)
            n = self.rotary_dim // 2
            self._sign = torch.cat((-torch.ones(n), torch.ones(n))).to(device)
            self._on = device
        return self._inv_freq2, self._row2, self._sign

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [3, T] -> cos, signed sin [T, rotary_dim] in `dtype` (the reference casts before use).

        The sin is signed for rotate_half (-sin on the first half, see apply_rope): negating is exact, so
        rotate_half(x)·sin has the bits of roll(x)·signed sin."""
        inv_freq2, row2, sign = self._tables(positions.device)
        picked = positions.float()[row2].T  # [T, r]: each slot's position row
        emb = picked * inv_freq2  # the slot's frequency times its row's position, each half the same
        return emb.cos().to(dtype), (emb.sin() * sign).to(dtype)


def apply_rope_(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> None:
    """Rotate the first rotary_dim dims of x [..., T, hd] in place; the rest pass through.

    x·cos + rotate_half(x)·sin with rotate_half(x)·sin = roll(x, r/2)·signed_sin, in x's dtype."""
    r = cos.shape[-1]
    x_rot = x[..., :r]
    rolled = x_rot.roll(r // 2, dims=-1).mul_(signed_sin)
    x_rot.mul_(cos).add_(rolled)


def apply_rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' form with the plain sin: kept to test apply_rope_ against."""
    r = cos.shape[-1]
    x_rot, x_pass = x[..., :r], x[..., r:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)
