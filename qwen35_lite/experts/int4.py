"""int4 weights in the compressed-tensors `pack-quantized` layout (W4A16), bit for bit as compressed-tensors 0.20.1.

Per quantised Linear [out, in] the checkpoint stores
  weight_packed      int32 [out, ceil(in/8)]   eight 4-bit values per word, element i of each 8 at bits 4i..4i+3,
                                               each stored as q + 8 (q in [-8, 7])
  weight_scale       float [out, in/group]     (channel strategy: [out, 1])
  weight_shape       int   [2]                 (out, in)
  weight_zero_point  int32 [ceil(out/8), in/group]  asymmetric only: the int zero-points (also in [-8, 7]),
                                               packed the same way but along dim 0 (down the rows)

Values are signed for both schemes: unpacking returns q in [-8, 7] and the zero-point in [-8, 7], and
W = (q - zp) * scale (zp = 0 when symmetric), computed in the scale's dtype — the op order of
compressed-tensors' `decompress` (quantization/lifecycle/forward.py `_dequantize`).
Little-endian hosts only (the packing goes through a byte view, as compressed-tensors' own 4-bit unpacker).
This module never imports compressed-tensors: it is a test-only oracle.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError

BITS = 4
Q_MIN, Q_MAX = -8, 7
OFFSET = 8  # stored nibble = q + OFFSET
PER_WORD = 32 // BITS


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 q [rows, cols] in [-8, 7] -> int32 [rows, ceil(cols/8)], element i of each 8 at bits 4i..4i+3."""
    rows, cols = q.shape
    u = (q.to(torch.int32) + OFFSET).to(torch.uint8)  # [rows, cols] nibbles 0..15
    pad = -cols % PER_WORD
    if pad:  # compressed-tensors pads with nibble 0 and keeps ceil(cols*4/32) words
        u = torch.nn.functional.pad(u, (0, pad))
    byte = u[:, 0::2] | (u[:, 1::2] << 4)  # [rows, padded/2]: even element in the low nibble
    return byte.contiguous().view(torch.int32)  # [rows, padded/8]


def unpack_int4(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """int32 [..., rows, words] -> int8 q [..., rows, in_features] in [-8, 7] (leading dims: a stack)."""
    lead = packed.shape[:-1]
    byte = packed.contiguous().view(torch.uint8)  # [..., rows, 4*words]
    nibbles = torch.stack((byte & 0xF, byte >> 4), dim=-1).view(*lead, -1)  # [..., rows, 8*words]
    return nibbles[..., :in_features].to(torch.int8) - OFFSET


def pack_zero_point(zp: torch.Tensor) -> torch.Tensor:
    """int8 zero-points [out, groups] in [-8, 7] -> int32 [ceil(out/8), groups] (packed down the rows)."""
    return pack_int4(zp.t()).t().contiguous()


def unpack_zero_point(packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """int32 [..., ceil(out/8), groups] -> int8 zero-points [..., out, groups] in [-8, 7]."""
    return unpack_int4(packed.transpose(-1, -2), out_features).transpose(-1, -2)


def dequantize_int4(
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    group_size: int,
    dtype: torch.dtype,
    shape: tuple[int, int],
) -> torch.Tensor:
    """W [out, in] in `dtype` from weight_packed, weight_scale [out, groups], packed weight_zero_point or None
    (any leading dims: a stack of experts' matrices).

    Equals compressed-tensors' `decompress(...)["weight"].to(dtype)` bit for bit: every step runs in the
    scale's dtype, as its `_dequantize` does, and only the result is cast.
    """
    out_features, in_features = int(shape[0]), int(shape[1])
    groups = scale.shape[-1]  # channel strategy: 1 group of in_features
    q = unpack_int4(packed, in_features).unflatten(-1, (groups, in_features // groups))  # [out, groups, g]
    w = q.to(scale.dtype)
    if zero_point is not None:
        zp = unpack_zero_point(zero_point, out_features)  # [out, groups]
        w = w - zp.to(scale.dtype).unsqueeze(-1)
    w = w * scale.unsqueeze(-1)
    return w.flatten(start_dim=-2).to(dtype)


def _qparams(
    min_vals: torch.Tensor, max_vals: torch.Tensor, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """compressed-tensors' `calculate_qparams` for INT4 from per-group min/max, in the weight's dtype."""
    # 0 must stay representable
    min_vals = torch.min(min_vals, torch.zeros_like(min_vals))
    max_vals = torch.max(max_vals, torch.zeros_like(max_vals))
    bit_min, bit_max = torch.tensor(float(Q_MIN)), torch.tensor(float(Q_MAX))
    bit_range = bit_max - bit_min  # 15: a symmetric scale is absmax / 7.5, as compressed-tensors has it
    if symmetric:
        max_pos = torch.max(torch.abs(min_vals), torch.abs(max_vals))
        scales = max_pos / (bit_range.to(max_pos.dtype) / 2)
        zero_points = torch.zeros(scales.shape, dtype=min_vals.dtype)
    else:
        scales = (max_vals - min_vals) / bit_range.to(max_vals.dtype)
        zero_points = torch.clamp(bit_min - (min_vals / scales), bit_min, bit_max)
    eps = torch.finfo(scales.dtype).eps  # an all-zero group would divide by 0
    scales = torch.where(scales == 0, torch.tensor(eps, dtype=scales.dtype), scales)
    zero_points = torch.round(torch.clamp(zero_points, -128, 127)).to(torch.int8)
    return scales, zero_points


def _round(groups: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' `quantize`: x / scale + zp, clamp to [-8, 7], round half to even -> int8."""
    scaled = groups / scale.unsqueeze(-1)
    scaled += zp.unsqueeze(-1).to(groups.dtype)
    return torch.round(torch.clamp(scaled, float(Q_MIN), float(Q_MAX))).to(torch.int8)


# Clip ratios tried by the MSE search: the group's range shrunk by up to 30%.
CLIP_GRID = tuple(1 - 0.02 * i for i in range(16))


def _mse_qparams(groups: torch.Tensor, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group, the clip ratio of CLIP_GRID whose qparams give the least squared weight error."""
    min_vals, max_vals = torch.amin(groups, dim=-1), torch.amax(groups, dim=-1)
    best = None
    for ratio in CLIP_GRID:
        scale, zp = _qparams(min_vals * ratio, max_vals * ratio, symmetric)
        q = _round(groups, scale, zp)
        back = (q.float() - zp.float().unsqueeze(-1)) * scale.float().unsqueeze(-1)
        err = (back - groups.float()).square().sum(-1)  # [out, groups]
        if best is None:
            best = [err, scale, zp]
            continue
        better = err < best[0]
        best = [
            torch.where(better, err, best[0]),
            torch.where(better, scale, best[1]),
            torch.where(better, zp, best[2]),
        ]
    return best[1], best[2]


def quantize_int4(
    w: torch.Tensor, group_size: int, symmetric: bool, mse_clip: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest W [out, in] -> (weight_packed, weight_scale [out, in/group] in w's dtype, packed zp or None).

    Min/max per group, scale and zero-point as compressed-tensors' `calculate_qparams`, then its
    `quantize` (x / scale + zp, clamp to [-8, 7], round half to even), so the result equals what its
    compressor writes for the same w. `mse_clip` instead picks, per group, the clipped range (CLIP_GRID)
    with the least squared error: same format, usually a smaller error, no longer compressed-tensors' choice.
    """
    out_features, in_features = w.shape
    if in_features % group_size:
        raise ValueError(f"in_features {in_features} is not a multiple of group_size {group_size}")
    groups = w.unflatten(-1, (in_features // group_size, group_size))  # [out, groups, g]
    if mse_clip:
        scale, zp = _mse_qparams(groups, symmetric)
    else:
        scale, zp = _qparams(torch.amin(groups, dim=-1), torch.amax(groups, dim=-1), symmetric)
    q = _round(groups, scale, zp).flatten(start_dim=-2)  # [out, in]
    return pack_int4(q), scale, (None if symmetric else pack_zero_point(zp))


# --- quantization_config ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantScheme:
    """One weight-only integer scheme: `group_size` None means one scale per output channel."""

    bits: int = BITS
    group_size: int | None = 128
    symmetric: bool = True
    scale_dtype: torch.dtype | None = None  # None: the dtype the checkpoint stores the scales in


@dataclass(frozen=True)
class Int4Quantization:
    """What a compressed-tensors pack-quantized config covers: Linear modules by name, as it matches them."""

    scheme: QuantScheme
    targets: tuple[str, ...]
    ignore: tuple[str, ...] = field(default_factory=tuple)

    def covers(self, module_name: str) -> bool:
        """True when the Linear `module_name` (e.g. `model.layers.0.mlp.experts.3.up_proj`) is quantised."""
        if any(_match(module_name, pattern) for pattern in self.ignore):
            return False
        return any(t == "Linear" or _match(module_name, t) for t in self.targets)


@dataclass(frozen=True)
class Fp8Block:
    """Marker: an FP8 block-wise checkpoint (`quant_method: fp8`), read by the FP8 path, not here."""

    block: int = 128


SUPPORTED = "compressed-tensors pack-quantized W4A16 (int, 4 bits, group or channel, no activation scheme)"


def _match(name: str, pattern: str) -> bool:
    # compressed-tensors' match_name: "re:" prefix is a regex matched from the start, otherwise exact
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return pattern == name


def _refuse(found: str) -> ConfigError:
    return ConfigError(
        f"unsupported quantization_config: {found}",
        f"supported: {SUPPORTED}, or FP8 block-128 (quant_method fp8); use a bf16 checkpoint "
        "and `qwen35-lite quantize` to make an int4 one",
    )


def _fp8_marker(raw: dict) -> Fp8Block:
    block = raw.get("weight_block_size") or [128, 128]
    if list(block) != [128, 128]:
        raise _refuse(f"quant_method fp8 with weight_block_size {block}")
    return Fp8Block()


def _weights_scheme(name: str, group: dict) -> QuantScheme:
    for kind in ("input_activations", "output_activations"):
        if group.get(kind):
            raise _refuse(f"config group {name} quantises {kind} ({group[kind]})")
    w = group.get("weights")
    if not w:
        raise _refuse(f"config group {name} has no weights scheme")
    wtype, bits, strategy = w.get("type", "int"), w.get("num_bits"), w.get("strategy")
    if wtype != "int":
        raise _refuse(f'config group {name} has weights of type "{wtype}"')
    if bits != BITS:
        raise _refuse(f"config group {name} has {bits}-bit weights")
    if strategy not in ("group", "channel") or w.get("dynamic") or w.get("actorder") not in (None, "static"):
        raise _refuse(f"config group {name} has weights strategy {strategy!r}, dynamic {w.get('dynamic')}")
    group_size = w.get("group_size") if strategy == "group" else None
    if strategy == "group" and not (isinstance(group_size, int) and group_size > 0):
        raise _refuse(f"config group {name} has group strategy with group_size {group_size}")
    scale_dtype = w.get("scale_dtype")
    if scale_dtype is not None:
        raise _refuse(f"config group {name} rounds its scales to {scale_dtype}")
    return QuantScheme(bits=bits, group_size=group_size, symmetric=bool(w.get("symmetric", True)))


def parse_quantization_config(raw: dict | None) -> Int4Quantization | Fp8Block | None:
    """config.json's `quantization_config` -> what it quantises, the FP8 marker, or None when absent.

    Raises ConfigError naming what was found when the scheme is not one the runner reads.
    """
    if not raw:
        return None
    method = raw.get("quant_method")
    if method == "fp8":
        return _fp8_marker(raw)
    if method != "compressed-tensors":
        raise _refuse(f"quant_method {method!r}")
    fmt = raw.get("format")
    if fmt != "pack-quantized":
        raise _refuse(f"compressed-tensors format {fmt!r}")
    if raw.get("quantization_status", "compressed") != "compressed":
        raise _refuse(f"quantization_status {raw.get('quantization_status')!r} (weights not compressed)")
    if raw.get("kv_cache_scheme"):
        raise _refuse(f"a kv_cache_scheme ({raw['kv_cache_scheme']})")
    groups = raw.get("config_groups") or {}
    if not groups:
        raise _refuse("compressed-tensors config without config_groups")
    schemes = {name: _weights_scheme(name, g) for name, g in groups.items()}
    if len(set(schemes.values())) > 1:
        raise _refuse(f"several weight schemes in one checkpoint ({sorted(schemes)})")
    for name, g in groups.items():
        if g.get("format") not in (None, "pack-quantized"):
            raise _refuse(f"config group {name} in format {g['format']!r}")
    targets = tuple(t for g in groups.values() for t in g.get("targets", []))
    return Int4Quantization(next(iter(schemes.values())), targets, tuple(raw.get("ignore") or []))
