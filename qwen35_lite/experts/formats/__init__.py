"""Expert formats: the one place that knows how a routed expert is encoded, one module per format.

- `dense`: bf16/fp16/fp32 weights; slots in the compute dtype (converted on entry when the stored dtype
  differs).
- `fp8`: the official FP8 release (float8_e4m3fn weights + fp32 `weight_scale_inv` per 128x128 block);
  slots hold the FP8 bytes and scales, dequantised on the compute device when the expert runs (on the
  CPU: dequantised once, into the cache).
- `compressed`: compressed-tensors `pack-quantized` integer weights, what every bit width shares (exact
  mode keeps the packed bytes and dequantises as transformers does); one module per width adds its packing
  and a CPU kernel (`int4`: torch's `_weight_int4pack_mm_for_cpu`, ...).

`registry` lists the formats read and chooses one, once per load (plan.load), from config.json and the
checkpoint's tensors; `base.ExpertFormat` is what every format provides.
"""

from __future__ import annotations

from ...weights.fp8 import dequantize_block, dequantize_fp8, e4m3_to_float  # the FP8 numbers
from ..layout import ALIGN, Part, pack_layout
from .base import DenseExpert, Expert, ExpertFormat, ffn
from .compressed import CompressedQuantization, PackedFormat, QuantScheme
from .dense import DenseFormat
from .fp8 import Fp8BlockFormat
from .int4 import Int4Format
from .registry import choose, parse_quantization_config

expert_format = choose  # the name callers and tests know

__all__ = [
    "ALIGN",
    "CompressedQuantization",
    "DenseExpert",
    "DenseFormat",
    "Expert",
    "ExpertFormat",
    "Fp8BlockFormat",
    "Int4Format",
    "PackedFormat",
    "Part",
    "QuantScheme",
    "choose",
    "dequantize_block",
    "dequantize_fp8",
    "e4m3_to_float",
    "expert_format",
    "ffn",
    "pack_layout",
    "parse_quantization_config",
]
