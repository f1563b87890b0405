"""The expert formats this runner reads, and choosing one: from config.json's `quantization_config`
(parsed here, once) and, when there is a checkpoint, from its tensors.

A new compressed-tensors bit width is one line in PACKED; another kind of format, one branch in `choose`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ...errors import CheckpointError, ConfigError
from ...weights.fp8 import FP8_DTYPES
from ...weights.packed import quantization_config
from . import fp8
from .base import ExpertFormat
from .compressed import CompressedQuantization, PackedFormat, parse_config
from .dense import DenseFormat
from .int4 import Int4Format
from .int8 import Int8Format

if TYPE_CHECKING:
    from ...weights.checkpoint import Checkpoint

# compressed-tensors pack-quantized experts by num_bits
PACKED: dict[int, type[PackedFormat]] = {f.bits: f for f in (Int4Format, Int8Format)}

Quantization = CompressedQuantization | fp8.Fp8Block  # a parsed quantization_config

PROBE = "layers.0.mlp.experts.0.gate_proj."  # layer 0's first expert, per-expert layout
FUSED = "layers.0.mlp.experts.gate_up_proj"


def supported() -> str:
    widths = " or ".join(f"W{b}A16" for b in sorted(PACKED))
    bits = " or ".join(str(b) for b in sorted(PACKED))
    return f"compressed-tensors pack-quantized {widths} (int, {bits} bits, group or channel, no activation scheme)"


def _refuse(found: str) -> ConfigError:
    return ConfigError(
        f"unsupported quantization_config: {found}",
        f"supported: {supported()}, or FP8 block-128 (quant_method fp8); use a bf16 checkpoint "
        "and `qwen35-lite quantize` to make an int4 one",
    )


def parse_quantization_config(raw: dict | None) -> Quantization | None:
    """config.json's `quantization_config` -> the routed experts' compressed-tensors scheme (of several
    config groups, the one whose targets select the experts: e.g. experts 4-bit beside 8-bit resident
    layers), the FP8 block marker, or None when absent. Raises ConfigError naming what was found when the
    runner cannot read it.
    """
    if not raw:
        return None
    if raw.get("quant_method") == "fp8":
        return fp8.parse_config(raw, _refuse)
    return parse_config(raw, tuple(PACKED), _refuse)


def choose(
    raw_config: dict,
    hidden: int,
    inter: int,
    device: torch.device | str,
    dtype: torch.dtype | None,
    ckpt: Checkpoint | None = None,
    stored: torch.dtype | None = None,
) -> ExpertFormat:
    """The format of this checkpoint's routed experts for compute `dtype` on `device`: from the tensors
    when there is a checkpoint, else from config.json's `quantization_config` (and `stored`, the dtype of a
    plain checkpoint). dtype None: as stored (dense), float32 for the quantised formats.

    An unsupported quantization_config is refused here, whatever the tensors (ConfigError)."""
    quant = parse_quantization_config(quantization_config(raw_config))
    device = torch.device(device)
    if ckpt is None:
        if quant is None:
            return DenseFormat(hidden, inter, dtype or stored or torch.bfloat16, stored or dtype, fused=False)
        if isinstance(quant, fp8.Fp8Block):
            return fp8.Fp8BlockFormat.build(
                hidden, inter, device, dtype or torch.float32, torch.float8_e4m3fn
            )
        return _packed(quant, hidden, inter, device, dtype, None)
    if PROBE + "weight_packed" in ckpt:
        return _packed(quant, hidden, inter, device, dtype, ckpt.info(PROBE + "weight_scale").dtype)
    fused = FUSED in ckpt
    if not fused and PROBE + "weight" not in ckpt:
        raise CheckpointError(
            "no routed expert tensors for layer 0 (neither fused nor per-expert)",
            "the checkpoint is incomplete or not a Qwen3.5-MoE checkpoint",
        )
    first = ckpt.info(FUSED if fused else PROBE + "weight")
    if first.dtype in FP8_DTYPES:
        return fp8.from_checkpoint(ckpt, first, fused, hidden, inter, device, dtype)
    return DenseFormat(hidden, inter, dtype or first.dtype, first.dtype, fused)


def _packed(
    quant: Quantization | None,
    hidden: int,
    inter: int,
    device: torch.device,
    dtype: torch.dtype | None,
    scale_dtype: torch.dtype | None,
) -> PackedFormat:
    if not isinstance(quant, CompressedQuantization):
        raise ConfigError(
            "the experts are int4-packed (weight_packed) but config.json has no compressed-tensors"
            " quantization_config",
            "re-download config.json of this checkpoint",
        )
    fmt_cls = PACKED[quant.scheme.bits]
    return fmt_cls.build(quant, hidden, inter, device, dtype or torch.float32, scale_dtype)


def packed_format(bits: int) -> type[PackedFormat] | None:
    """The compressed-tensors format of `bits`-bit experts (what `quantize --bits` writes), None if none."""
    return PACKED.get(bits)
