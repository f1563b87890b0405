"""compressed-tensors itself as the int4 oracle (test-only): its quantiser, compressor and decompressor.

`ct_compress` / `ct_decompress` run one matrix through compressed-tensors' own API; `make_ct_checkpoint`
turns a transformers-written tiny checkpoint into a W4A16 pack-quantized one the way compressed-tensors
lays it out (routed experts per expert, everything else untouched).
"""

from __future__ import annotations

import torch
from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

EXPERT_TARGET = r"re:.*mlp\.experts\.\d+\.(gate|up|down)_proj$"


def ct_scheme(group_size: int | None, symmetric: bool) -> QuantizationScheme:
    """W4A16 on the routed experts; group_size None is the channel strategy."""
    strategy = "group" if group_size else "channel"
    weights = QuantizationArgs(
        num_bits=4, type="int", symmetric=symmetric, group_size=group_size, strategy=strategy
    )
    return QuantizationScheme(targets=[EXPERT_TARGET], weights=weights)


def ct_compress(w: torch.Tensor, scheme: QuantizationScheme) -> dict[str, torch.Tensor]:
    """Min/max round-to-nearest qparams (compressed-tensors' calculate_qparams), then its pack compressor."""
    args = scheme.weights
    if args.strategy == "group":
        scale, zp = compute_dynamic_scales_and_zp(w, args, module=None)
    else:  # channel: one min/max per row (dynamic qparams refuse channel, the math is the same)
        from compressed_tensors.quantization.utils import calculate_qparams

        scale, zp = calculate_qparams(w.amin(-1, keepdim=True), w.amax(-1, keepdim=True), args)
    return PackedQuantizationCompressor.compress(
        {"weight": w, "weight_scale": scale, "weight_zero_point": zp}, scheme
    )


def ct_decompress(state: dict[str, torch.Tensor], scheme: QuantizationScheme) -> torch.Tensor:
    return PackedQuantizationCompressor.decompress(dict(state), scheme)["weight"]
