"""Random pack-quantized Linears, as compressed-tensors stores them, for the kernel tests."""

from __future__ import annotations

import torch

from qwen35_lite.kernels import PackedWeight
from qwen35_lite.weights.packed import pack_int4, pack_int8


def random_packed(
    bits: int,
    n: int,
    k: int,
    group: int | None,
    symmetric: bool,
    seed: int = 0,
    scale_dtype: torch.dtype = torch.bfloat16,
) -> tuple[PackedWeight, dict[str, torch.Tensor]]:
    """(the PackedWeight, its stored tensors weight_packed / weight_scale / weight_zero_point)."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = (-8, 8) if bits == 4 else (-128, 128)
    q = torch.randint(lo, hi, (n, k), dtype=torch.int8, generator=g)
    groups = k // group if group else 1
    scale = (torch.rand(n, groups, generator=g) * 0.02 + 0.001).to(scale_dtype)
    pack = pack_int4 if bits == 4 else pack_int8
    stored = {"weight_packed": pack(q), "weight_scale": scale}
    if not symmetric:
        zp = torch.randint(lo, hi, (n, groups), dtype=torch.int8, generator=g)
        zt = torch.empty(groups, n, dtype=torch.int8).copy_(zp.t())  # row strides even for one group
        stored["weight_zero_point"] = pack(zt).t().contiguous()
    pw = PackedWeight.from_stored(
        bits, stored["weight_packed"], scale, stored.get("weight_zero_point"), (n, k)
    )
    return pw, stored


def assert_near(y: torch.Tensor, want: torch.Tensor, rel: float = 1.5e-2) -> None:
    """Within bf16's rounding of the outputs (and of the weights where a kernel rounds them): the largest
    error under `rel` of the largest value."""
    err = (y.float() - want.float()).abs().max().item()
    assert err <= rel * want.float().abs().max().item(), (err, want.abs().max().item())
