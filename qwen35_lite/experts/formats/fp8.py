"""FP8 block-128: the official FP8 release's layout, everything about it in one place.

On disk: float8_e4m3fn weights + fp32 `weight_scale_inv` [ceil(out/128), ceil(in/128)] per matrix, and
`quantization_config` {"quant_method": "fp8", "weight_block_size": [128, 128]}. A value is
w[r, c] * scale_inv[r // 128, c // 128] in fp32 (`dequantize_fp8`; `dequantize_block` the same bits,
faster; both in the codec module `fp8.py` beside the checkpoint reader, which dequantises resident FP8
tensors with it, as `quantize` does FP8 sources and `synthetic` writes FP8 experts with `quantize_block`).

Legend: D = hidden, I = expert FFN width, A = experts run (top-k).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ...errors import CheckpointError, ConfigError
from ...weights.fp8 import (  # the numbers live beside the checkpoint reader
    FP8_BLOCK,
    dequantize_block,
)
from ..layout import pack_layout, stack_parts
from ..stacks import StackedDequantised, StackedExperts, one_row_by
from . import fp8_cpu
from .base import (
    DenseExpert,
    Expert,
    ExpertFormat,
    dense_gather,
    dequantised_gather,
    dtype_name,
    per_expert,
)

if TYPE_CHECKING:
    from ...weights.checkpoint import Checkpoint, TensorInfo

# ---- quantization_config ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Fp8Block:
    """What an FP8 block-wise `quantization_config` (`quant_method: fp8`) says: the block size."""

    block: int = FP8_BLOCK


def parse_config(raw: dict, refuse: Callable[[str], ConfigError]) -> Fp8Block:
    """`quant_method: fp8` -> Fp8Block; refused (`refuse(what was found)`) unless the blocks are 128x128."""
    block = raw.get("weight_block_size") or [128, 128]
    if list(block) != [128, 128]:
        raise refuse(f"quant_method fp8 with weight_block_size {block}")
    return Fp8Block()


# ---- the expert format -----------------------------------------------------------------------------


class Fp8BlockFormat(ExpertFormat):
    """float8_e4m3fn weights + fp32 weight_scale_inv [ceil(out/128), ceil(in/128)], per expert.

    On CUDA (`dequantise_on_use`) slots hold the raw FP8 bytes and scales (half the bytes of bf16 in RAM,
    on the bus and on the GPU) and the GPU dequantises an expert when it runs. On the CPU with bf16/fp16
    compute, slots hold the FP8 bytes too: a decode step's experts run by the C kernel straight from them
    (fp8_cpu.py), a prefill's rows by fp32 matmuls on the expert dequantised once a call. Elsewhere on the
    CPU (fp32 compute, no kernel) the expert is dequantised once, when it enters the cache, into a
    compute-dtype slot (the disk still reads half the bytes of bf16). Either way W = w.float() *
    scale_inv per block (dequantize_block)."""

    def __init__(
        self,
        hidden: int,
        inter: int,
        dtype: torch.dtype,
        stored: torch.dtype,
        dequantise_on_use: bool,
        cpu: bool = True,
    ) -> None:
        super().__init__(hidden, inter, dtype)
        D, I, b = hidden, inter, FP8_BLOCK
        self.stored = stored
        w = [(stored, (I, D)), (stored, (I, D)), (stored, (D, I))]
        s = [(torch.float32, (math.ceil(o / b), math.ceil(i / b))) for o, i in ((I, D), (I, D), (D, I))]
        self.raw, self.raw_nbytes = pack_layout(w + s)
        self.direct = dequantise_on_use
        if dequantise_on_use:
            self.slot_nbytes = self.raw_nbytes
        else:
            self.slot, self.slot_nbytes = pack_layout([(dtype, (2 * I, D)), (dtype, (D, I))])
        self.name = f"fp8 block-{b}" + (
            "" if dequantise_on_use else f" (dequantised into the cache: {dtype_name(dtype)})"
        )
        # cpu: computing on the CPU (a CUDA run's RAM slots keep the GPU's FP8 path and its scratch sizes)
        self.cpu_kernel = cpu and dequantise_on_use and _cpu_kernel(dtype, stored, D, I)
        if self.cpu_kernel:
            self.name += " (CPU FP8 kernel)"

    @classmethod
    def build(
        cls, hidden: int, inter: int, device: torch.device, dtype: torch.dtype, stored: torch.dtype
    ) -> Fp8BlockFormat:
        """Dequantised on use on a GPU; on the CPU kept FP8 and run by the FP8 kernel (fp8_cpu.py) for
        bf16/fp16 compute where it builds, else dequantised into the cache (fp32 compute: the exact path)."""
        cpu = torch.device(device).type == "cpu"
        on_use = not cpu or _cpu_kernel(dtype, stored, hidden, inter)
        return cls(hidden, inter, dtype, stored, on_use, cpu=cpu)

    def for_compute(self, device: torch.device | str, dtype: torch.dtype) -> Fp8BlockFormat:
        return Fp8BlockFormat.build(self.D, self.I, torch.device(device), dtype, self.stored)

    def locate(self, ckpt: Checkpoint, layer: int, e: int) -> list[TensorInfo]:
        return per_expert(ckpt, layer, e, ["weight", "weight_scale_inv"])

    def dense(self, raw: list[torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up, down = (dequantize_block(w, s).to(dtype) for w, s in zip(raw[:3], raw[3:]))
        return torch.cat([gate, up], dim=0), down

    def prepare(self, raw: list[torch.Tensor], slot: torch.Tensor) -> None:
        gate_up, down = (p.view(slot) for p in self.slot)
        gate_up[: self.I].copy_(dequantize_block(raw[0], raw[3]))
        gate_up[self.I :].copy_(dequantize_block(raw[1], raw[4]))
        down.copy_(dequantize_block(raw[2], raw[5]))

    def bind(self, slot: torch.Tensor) -> Expert:
        if not self.direct:
            return DenseExpert(*(p.view(slot) for p in self.slot))
        raw = self.raw_views(slot)
        if self.cpu_kernel and slot.device.type == "cpu":
            D, I = self.D, self.I

            def rows(x: torch.Tensor) -> torch.Tensor:  # a prefill's rows: fp32 on the expert made dense
                return fp8_cpu.prefill_ffn(x, raw, D, I)

            return one_row_by(self.stack(slot, 1, slot.numel()), rows)
        return self._dequantising(raw)

    def stack(self, buffer: torch.Tensor, n_slots: int, stride: int) -> StackedExperts | None:
        if self.direct and buffer.device.type == "cpu" and self.cpu_kernel:
            # gate and up (weights, then scales) lie back to back in the raw layout
            offsets = (self.raw[0].offset, self.raw[2].offset, self.raw[3].offset, self.raw[5].offset)
            return fp8_cpu.StackedFp8Cpu(buffer, stride, self.D, self.I, offsets)
        if self.direct:  # the FP8 bytes and scales: gathered, then dequantised together
            return StackedFp8(stack_parts(self.raw, buffer, n_slots, stride), FP8_BLOCK)
        return StackedExperts(*stack_parts(self.slot, buffer, n_slots, stride))

    @property
    def uses_cpu_kernel(self) -> bool:
        return self.cpu_kernel

    def prefill_nbytes(self) -> int:
        if self.cpu_kernel:  # the expert in fp32 and one row block's fp32 temporaries (fp8_cpu.prefill_ffn)
            return fp8_cpu.prefill_nbytes(self.D, self.I)
        # dequantised on use: each call makes the expert dense (fp32, then the compute dtype)
        return dequantised_gather(self, 1) if self.direct else 0

    def gather_nbytes(self, top_k: int) -> int:
        if self.cpu_kernel:
            return fp8_cpu.decode_nbytes(self.D, self.I, top_k, self.dtype)
        return dequantised_gather(self, top_k) if self.direct else dense_gather(self, top_k)


# "0": FP8 experts dequantised into bf16 cache slots on the CPU (the path before the kernel); "1": the
# kernel even where only its portable C path builds (several times slower than memory); unset: the kernel
# where its AVX512-BF16 path builds. QWEN35_LITE_NO_KERNELS=1 turns it off with the other C kernels.
KERNEL_ENV = "QWEN35_LITE_FP8_CPU_KERNEL"


def _cpu_kernel(dtype: torch.dtype, stored: torch.dtype, hidden: int, inter: int) -> bool:
    """The CPU FP8 kernel runs these experts: not turned off (KERNEL_ENV), e4m3 weights, a half-precision
    compute dtype (fp32 keeps the exact dequantise-into-the-cache path), whole 128-blocks, the kernel built
    (its fast path unless KERNEL_ENV=1)."""
    asked = os.environ.get(KERNEL_ENV)
    if asked == "0":
        return False
    half = dtype in (torch.bfloat16, torch.float16)
    return half and stored == torch.float8_e4m3fn and fp8_cpu.available(hidden, inter, asked != "1")


class StackedFp8(StackedDequantised):
    """FP8 slots (weights + block scales) stacked: the A experts' FP8 bytes are gathered (a byte an
    element) and dequantised together, as `Fp8BlockFormat.dense` does one by one (w.float() * scale per
    block, fp32), then cast by the caller."""

    def __init__(self, parts: list[torch.Tensor], block: int) -> None:
        self.parts, self.block = parts, block  # gate, up, down weights; then their scales

    def _dense(self, i: int, slots: torch.Tensor) -> torch.Tensor:
        w, scale = self.parts[i].index_select(0, slots), self.parts[3 + i].index_select(0, slots)
        _, o, n = w.shape
        b = self.block
        full = scale.float().repeat_interleave(b, 1)[:, :o].repeat_interleave(b, 2)[:, :, :n]
        return w.float() * full  # [A, o, n]


def from_checkpoint(
    ckpt: Checkpoint, first: TensorInfo, fused: bool, hidden: int, inter: int, device, dtype
) -> Fp8BlockFormat:
    """FP8 experts (`first`: layer 0's first expert tensor): only per expert with block scales."""
    probe = "layers.0.mlp.experts.0.gate_proj.weight_scale_inv"
    if fused or probe not in ckpt:
        raise CheckpointError(
            "FP8 experts without per-expert block scales (weight_scale_inv)",
            "qwen35-lite reads the official block-128 FP8 layout; quantize from the bf16 release",
        )
    return Fp8BlockFormat.build(hidden, inter, device, dtype or torch.float32, first.dtype)
