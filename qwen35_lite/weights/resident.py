"""Resident tensors as a checkpoint stores them: dense (a float `.weight`, FP8 included), or a Linear layer
that compressed-tensors `pack-quantized` quantised (W4A16 / W8A16: weight_packed, weight_scale, and
weight_zero_point when asymmetric). The model loads those as they are stored (`PackedLinear.load`: a
kernels.PackedWeight, which the layers fuse and kernels.compact turns into its kernel's encoding), never
dequantised in memory; `read` dequantises one exactly as compressed-tensors' `decompress` does
(packed.dequantize), for whoever wants the dense matrix.

A layer is read as quantised where the checkpoint holds its `weight_packed`, with the scheme of the
`config_groups` entry whose targets select it (class `Linear` or `re:` patterns, minus `ignore`), as
transformers + compressed-tensors read it. A scheme this runner does not read on a resident layer, or
tensors of another quantisation format, are refused naming the layer and what it found.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..errors import CheckpointError, ConfigError
from ..kernels import PackedWeight
from .packed import UNPACK, QuantScheme, covers, dequantize, describe, group_scheme

if TYPE_CHECKING:
    from .checkpoint import TensorInfo

PARTS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")
SUPPORTED = "compressed-tensors pack-quantized W4A16 or W8A16 (int, group or channel, no activation scheme)"


@dataclass(frozen=True)
class PackedLinear:
    """One resident Linear stored pack-quantized: its tensors (by suffix) and its config group's scheme."""

    module: str  # canonical, e.g. layers.0.self_attn.q_proj
    scheme: QuantScheme
    parts: dict[str, TensorInfo]

    @property
    def nbytes(self) -> int:
        """Bytes on disk, every part."""
        return sum(i.nbytes for i in self.parts.values())

    @property
    def format(self) -> str:
        return describe(self.scheme)

    def check_shape(self, shape: tuple[int, ...]) -> None:
        """The stored parts against the [out, in] config.json implies for this layer."""
        out_f, in_f = shape
        bits, g = self.scheme.bits, self.scheme.group_size or in_f
        groups = in_f // g if in_f % g == 0 else None
        want = {
            "weight_packed": (out_f, -(-in_f * bits // 32)),
            "weight_scale": (out_f, groups),
            "weight_zero_point": (-(-out_f * bits // 32), groups),
        }
        for suffix, expected in want.items():
            info = self.parts.get(suffix)
            if info is not None and info.shape != expected:
                raise CheckpointError(
                    f"tensor {info.name} has shape {list(info.shape)} but config.json and the "
                    f"{self.format} scheme imply {list(expected)}",
                    "config.json does not describe these weights: use the config.json of the same checkpoint",
                )

    def read(
        self, read: Callable[[TensorInfo], torch.Tensor], shape: tuple[int, int], dtype: torch.dtype | None
    ) -> torch.Tensor:
        """W [out, in] dequantised as compressed-tensors does (in the scale's dtype), then cast to `dtype`."""
        packed, scale = read(self.parts["weight_packed"]), read(self.parts["weight_scale"])
        zp = None if self.scheme.symmetric else read(self.parts["weight_zero_point"])
        unpack = UNPACK[self.scheme.bits]
        return dequantize(unpack, self.scheme.bits, packed, scale, zp, dtype or scale.dtype, shape)

    def load(self, read: Callable[[TensorInfo], torch.Tensor], shape: tuple[int, int]) -> PackedWeight:
        """The Linear as stored (packed words, scales in their dtype, zero points), for the model to hold."""
        packed, scale = read(self.parts["weight_packed"]), read(self.parts["weight_scale"])
        zp = None if self.scheme.symmetric else read(self.parts["weight_zero_point"])
        return PackedWeight.from_stored(self.scheme.bits, packed, scale, zp, shape)


def resolve_packed(
    tensors: Mapping[str, TensorInfo], quant_config: dict | None, module: str
) -> PackedLinear | None:
    """The packed Linear `module` (canonical name) when the checkpoint holds its weight_packed, else None."""
    packed = tensors.get(module + ".weight_packed")
    if packed is None:
        return None
    stored = packed.name.removesuffix(".weight_packed")
    scheme = scheme_for(quant_config, stored, module)
    parts = {s: tensors[f"{module}.{s}"] for s in PARTS if f"{module}.{s}" in tensors}
    need = ["weight_scale"] + ([] if scheme.symmetric else ["weight_zero_point"])
    missing = [s for s in need if s not in parts]
    if missing:
        raise CheckpointError(
            f"{module} is stored packed ({describe(scheme)}) but {module}.{missing[0]} is missing",
            "the checkpoint is incomplete: re-download it",
        )
    return PackedLinear(module, scheme, parts)


def scheme_for(quant_config: dict | None, stored: str, module: str) -> QuantScheme:
    """The weight scheme of the config group selecting the Linear `stored` (its name in the file); refused
    naming `module` and the scheme unless it is one this runner reads."""

    def refuse(found: str) -> ConfigError:
        return ConfigError(
            f"resident layer {module} is quantised with {found}",
            f"resident layers load {SUPPORTED}; use a checkpoint quantised that way or a bf16 one",
        )

    qc = quant_config or {}
    if qc.get("quant_method") != "compressed-tensors":
        if not qc:
            raise CheckpointError(
                f"{module} is stored packed (weight_packed) but config.json has no quantization_config",
                "use the config.json of this checkpoint",
            )
        raise refuse(f"quant_method {qc.get('quant_method')!r}")
    if qc.get("format") != "pack-quantized":
        raise refuse(f"compressed-tensors format {qc.get('format')!r}")
    if qc.get("quantization_status", "compressed") != "compressed":
        raise refuse(f"quantization_status {qc.get('quantization_status')!r} (weights not compressed)")
    ignore = qc.get("ignore") or []
    groups = {
        name: g
        for name, g in (qc.get("config_groups") or {}).items()
        if covers(g.get("targets", []), ignore, stored)
    }
    if not groups:
        raise CheckpointError(
            f"{module} is stored packed but no config group of quantization_config targets {stored}",
            "use the config.json of this checkpoint",
        )
    for name, g in groups.items():
        if g.get("format") not in (None, "pack-quantized"):
            raise refuse(f"config group {name} in format {g['format']!r}")
    schemes = {group_scheme(name, g, tuple(UNPACK), refuse) for name, g in groups.items()}
    if len(schemes) > 1:
        raise refuse(f"several schemes at once (config groups {', '.join(sorted(groups))})")
    return schemes.pop()


def covered_scheme(quant_config: dict | None, stored: str, module: str) -> QuantScheme | None:
    """A compressed-tensors config group's scheme where one selects the Linear `stored` (refused naming
    `module` when unsupported), None where none does or the config is not compressed-tensors."""
    qc = quant_config or {}
    if qc.get("quant_method") != "compressed-tensors":
        return None
    ignore = qc.get("ignore") or []
    if not any(
        covers(g.get("targets", []), ignore, stored) for g in (qc.get("config_groups") or {}).values()
    ):
        return None
    return scheme_for(qc, stored, module)


def other_format(tensors: Mapping[str, TensorInfo], quant_config: dict | None, module: str) -> None:
    """Refuse a resident Linear stored neither dense nor pack-quantized (e.g. GPTQ's qweight/qzeros/scales),
    naming the layer, its tensors and the quantization_config's method."""
    found = sorted(n.removeprefix(module + ".") for n in tensors if n.startswith(module + "."))
    if not found:
        return
    qc = quant_config or {}
    method = qc.get("quant_method")
    what = f"quant_method {method!r}" + (f", format {qc['format']!r}" if qc.get("format") else "")
    raise CheckpointError(
        f"resident layer {module} is stored as {', '.join(found)} ({what if method else 'no quantization_config'})",
        f"resident layers load dense weights or {SUPPORTED}",
    )
