"""Compact Linear layers: a weight held packed in memory and the kernel that multiplies by it (docs/
ARCHITECTURE.md, "A resident format"). Each encoding is one class with its reference (dequantise, then
F.linear) beside it; `compact` picks one for a device and dtype, `linear` runs any weight. Beside them, the
small C kernels of a CPU decode step (`*_cpu.py`, built by cbuild.py), each with its torch reference."""

from .base import CompactLinear, dequant_transient, dequantized_once, linear
from .blocks import RowBlocks, fuse_rows
from .choose import compact, compact_nbytes
from .int4 import Int4Kernel
from .int8 import Int8Group, Int8Kernel, Int8Split
from .packed import PackedWeight

__all__ = [
    "CompactLinear",
    "Int4Kernel",
    "Int8Group",
    "Int8Kernel",
    "Int8Split",
    "PackedWeight",
    "RowBlocks",
    "compact",
    "compact_nbytes",
    "dequant_transient",
    "dequantized_once",
    "fuse_rows",
    "linear",
]
