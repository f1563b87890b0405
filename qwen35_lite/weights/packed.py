"""compressed-tensors `pack-quantized` weights (WnA16, integer), the numbers, bit for bit as
compressed-tensors 0.20.1: its `quantization_config` (schemes, targets, ignore), its packing of 4- and 8-bit
values into int32 words, and its dequantisation order. The expert formats (experts/formats/compressed.py,
int4.py, int8.py) build on these; the checkpoint reader dequantises resident quantised Linear layers with
them (resident.py).

Per quantised Linear [out, in] the checkpoint stores
  weight_packed      int32 [out, ceil(in * bits / 32)]   32 / bits values per word, element i at bits
                                                         i*bits.., each stored as q + 2^(bits-1)
  weight_scale       float [out, in/group]     (channel strategy: [out, 1])
  weight_shape       int   [2]                 (out, in)
  weight_zero_point  int32 [ceil(out * bits / 32), in/group]  asymmetric only: packed the same way but
                                                         down the rows
W = (q - zp) * scale (zp = 0 when symmetric), computed in the scale's dtype — the op order of
compressed-tensors' `decompress` (quantization/lifecycle/forward.py `_dequantize`).
Little-endian hosts only (the packing goes through a byte view, as compressed-tensors' own 4-bit unpacker).
This package never imports compressed-tensors: it is a test-only oracle.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..kernels.packing import INT4_OFFSET, INT8_OFFSET, unpack_int4, unpack_int8

Unpack = Callable[
    [torch.Tensor, int], torch.Tensor
]  # packed int32 [..., rows, words], n -> int8 [..., rows, n]


# ---- quantization_config ---------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantScheme:
    """One weight-only integer scheme: `group_size` None means one scale per output channel."""

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = True
    scale_dtype: torch.dtype | None = None  # None: the dtype the checkpoint stores the scales in


@dataclass(frozen=True)
class CompressedQuantization:
    """What a compressed-tensors pack-quantized config covers: Linear modules by name, as it matches them."""

    scheme: QuantScheme
    targets: tuple[str, ...]
    ignore: tuple[str, ...] = field(default_factory=tuple)

    def covers(self, module_name: str) -> bool:
        """True when the Linear `module_name` (e.g. `model.layers.0.mlp.experts.3.up_proj`) is quantised."""
        return covers(self.targets, self.ignore, module_name)


def covers(targets: Sequence[str], ignore: Sequence[str], module_name: str) -> bool:
    """Whether compressed-tensors' targets (class `Linear` or names, `re:` patterns) select the Linear
    `module_name` (its name as stored, e.g. `model.language_model.layers.0.self_attn.q_proj`) and no
    `ignore` entry excludes it."""
    if any(_match(module_name, pattern) for pattern in ignore):
        return False
    return any(t == "Linear" or _match(module_name, t) for t in targets)


def _match(name: str, pattern: str) -> bool:
    # compressed-tensors' match_name: "re:" prefix is a regex matched from the start, otherwise exact
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return pattern == name


def group_scheme(name: str, group: dict, bits_read: tuple[int, ...], refuse) -> QuantScheme:
    """Config group `name`'s weight scheme; `refuse(what)` for anything but weight-only integer weights of a
    width in `bits_read`, group or channel strategy."""
    for kind in ("input_activations", "output_activations"):
        if group.get(kind):
            raise refuse(f"config group {name} quantises {kind} ({group[kind]})")
    w = group.get("weights")
    if not w:
        raise refuse(f"config group {name} has no weights scheme")
    wtype, bits, strategy = w.get("type", "int"), w.get("num_bits"), w.get("strategy")
    if wtype != "int":
        raise refuse(f'config group {name} has weights of type "{wtype}"')
    if bits not in bits_read:
        raise refuse(f"config group {name} has {bits}-bit weights")
    if strategy not in ("group", "channel") or w.get("dynamic") or w.get("actorder") not in (None, "static"):
        raise refuse(f"config group {name} has weights strategy {strategy!r}, dynamic {w.get('dynamic')}")
    group_size = w.get("group_size") if strategy == "group" else None
    if strategy == "group" and not (isinstance(group_size, int) and group_size > 0):
        raise refuse(f"config group {name} has group strategy with group_size {group_size}")
    scale_dtype = w.get("scale_dtype")
    if scale_dtype is not None:
        raise refuse(f"config group {name} rounds its scales to {scale_dtype}")
    return QuantScheme(bits=bits, group_size=group_size, symmetric=bool(w.get("symmetric", True)))


# The routed experts of layer 0 under the names checkpoints store them (VLM, text-only, bare)
EXPERT_PROBES = tuple(
    f"{prefix}layers.0.mlp.experts.0.{proj}"
    for prefix in ("model.language_model.", "model.", "")
    for proj in ("gate_proj", "up_proj", "down_proj")
)


def parse_config(
    raw: dict, bits_read: tuple[int, ...], refuse: Callable[[str], ConfigError]
) -> CompressedQuantization:
    """A compressed-tensors `quantization_config` -> the routed experts' weight scheme and what it covers;
    refused (`refuse(what was found)`) unless it is pack-quantized integer weights of a width in `bits_read`.

    Several config groups (e.g. experts 4-bit, the resident layers 8-bit): the scheme of the groups whose
    targets select the experts (their other layers are read by resident.py, each with its own group's
    scheme). Groups none of which selects the experts: their one scheme, or refused when they differ."""
    method = raw.get("quant_method")
    if method != "compressed-tensors":
        raise refuse(f"quant_method {method!r}")
    fmt = raw.get("format")
    if fmt != "pack-quantized":
        raise refuse(f"compressed-tensors format {fmt!r}")
    if raw.get("quantization_status", "compressed") != "compressed":
        raise refuse(f"quantization_status {raw.get('quantization_status')!r} (weights not compressed)")
    if raw.get("kv_cache_scheme"):
        raise refuse(f"a kv_cache_scheme ({raw['kv_cache_scheme']})")
    groups = raw.get("config_groups") or {}
    if not groups:
        raise refuse("compressed-tensors config without config_groups")
    ignore = tuple(raw.get("ignore") or [])
    experts = {
        name: g
        for name, g in groups.items()
        if any(covers(g.get("targets", []), ignore, probe) for probe in EXPERT_PROBES)
    }
    chosen = experts or groups
    schemes = {name: group_scheme(name, g, bits_read, refuse) for name, g in chosen.items()}
    if len(set(schemes.values())) > 1:
        what = (
            "the routed experts" if experts else "one checkpoint, none of them selecting the routed experts"
        )
        raise refuse(f"several weight schemes for {what} ({sorted(schemes)})")
    for name, g in chosen.items():
        if g.get("format") not in (None, "pack-quantized"):
            raise refuse(f"config group {name} in format {g['format']!r}")
    targets = tuple(t for g in chosen.values() for t in g.get("targets", []))
    return CompressedQuantization(next(iter(schemes.values())), targets, ignore)


# ---- dequantising ---------------------------------------------------------------------------------


def q_range(bits: int) -> tuple[int, int]:
    """The signed integer range of `bits`: [-8, 7] for 4, [-128, 127] for 8."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def dequantize(
    unpack: Unpack,
    bits: int,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
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
    q = unpack(packed, in_features).unflatten(-1, (groups, in_features // groups))  # [out, groups, g]
    w = q.to(scale.dtype)
    if zero_point is not None:
        zp = unpack(zero_point.transpose(-1, -2), out_features).transpose(-1, -2)  # [out, groups]
        w = w - zp.to(scale.dtype).unsqueeze(-1)
    w = w * scale.unsqueeze(-1)
    return w.flatten(start_dim=-2).to(dtype)


# ---- packing (4 and 8 bits; unpacking is kernels/packing.py's, which the compact layers share) ----------


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 q [rows, cols] in [-8, 7] -> int32 [rows, ceil(cols/8)], element i of each 8 at bits 4i..4i+3."""
    u = (q.to(torch.int32) + INT4_OFFSET).to(torch.uint8)  # [rows, cols] nibbles 0..15
    pad = -q.shape[1] % 8
    if pad:  # compressed-tensors pads with nibble 0 and keeps ceil(cols*4/32) words
        u = F.pad(u, (0, pad))
    byte = u[:, 0::2] | (u[:, 1::2] << 4)  # [rows, padded/2]: even element in the low nibble
    # through 1-D: a one-row view of a transposed tensor (a per-channel zero point) may keep stride 1
    return byte.reshape(-1).view(torch.int32).view(q.shape[0], -1)  # [rows, padded/8]


def pack_int8(q: torch.Tensor) -> torch.Tensor:
    """int8 q [rows, cols] in [-128, 127] -> int32 [rows, ceil(cols/4)], element i of each 4 in byte i."""
    u = (q.to(torch.int32) + INT8_OFFSET).to(torch.uint8)  # [rows, cols]
    pad = -q.shape[1] % 4
    if pad:  # compressed-tensors pads with 0 and keeps ceil(cols*8/32) words
        u = F.pad(u, (0, pad))
    return u.reshape(-1).view(torch.int32).view(q.shape[0], -1)  # [rows, padded/4]


UNPACK: dict[int, Unpack] = {4: unpack_int4, 8: unpack_int8}  # the widths read, by num_bits


def quantization_config(raw_config: dict) -> dict | None:
    """config.json's quantization_config, top level or in text_config (VLM checkpoints)."""
    qc = raw_config.get("quantization_config")
    if qc is None and isinstance(raw_config.get("text_config"), dict):
        qc = raw_config["text_config"].get("quantization_config")
    if qc is not None and not isinstance(qc, dict):
        raise ConfigError("config.json: quantization_config is not an object", "re-download the checkpoint")
    return qc


def describe(scheme: QuantScheme) -> str:
    """`int4 g128 symmetric`, `int8 per-channel asymmetric`: a scheme as `info` and errors name it."""
    size = f"g{scheme.group_size}" if scheme.group_size else "per-channel"
    return f"int{scheme.bits} {size} {'symmetric' if scheme.symmetric else 'asymmetric'}"


__all__ = [
    "UNPACK",
    "covers",
    "group_scheme",
    "CompressedQuantization",
    "QuantScheme",
    "dequantize",
    "describe",
    "pack_int4",
    "pack_int8",
    "parse_config",
    "q_range",
    "quantization_config",
    "unpack_int4",
    "unpack_int8",
]
