"""Plain expert weights (bf16 / fp16 / fp32): fused [E, 2I, D] / [E, D, I] tensors or per-expert [I, D] x 2 +
[D, I]. Slots hold the compute dtype (converted on entry when the stored dtype differs) and run stacked."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from ..layout import pack_layout, stack_parts
from ..stacks import StackedExperts
from .base import DenseExpert, Expert, ExpertFormat, dense_gather, dtype_name, per_expert

if TYPE_CHECKING:
    from ...weights.checkpoint import Checkpoint, TensorInfo


class DenseFormat(ExpertFormat):
    """Plain weights, fused ([E, 2I, D] / [E, D, I]) or per expert ([I, D] x 2 + [D, I])."""

    def __init__(self, hidden: int, inter: int, dtype: torch.dtype, stored: torch.dtype, fused: bool) -> None:
        super().__init__(hidden, inter, dtype)
        D, I = hidden, inter
        self.stored, self.fused = stored, fused
        shapes = [(2 * I, D), (D, I)] if fused else [(I, D), (I, D), (D, I)]
        self.raw, self.raw_nbytes = pack_layout([(stored, s) for s in shapes])
        self.slot, self.slot_nbytes = pack_layout([(dtype, (2 * I, D)), (dtype, (D, I))])
        self.direct = stored == dtype
        self.name = dtype_name(stored) + ("" if self.direct else f" -> {dtype_name(dtype)}")

    def for_compute(self, device: torch.device | str, dtype: torch.dtype) -> DenseFormat:
        return DenseFormat(self.D, self.I, dtype, self.stored, self.fused)

    def locate(self, ckpt: Checkpoint, layer: int, e: int) -> list[TensorInfo]:
        p = f"layers.{layer}.mlp.experts."
        if self.fused:
            return [_slice(ckpt.info(p + "gate_up_proj"), e), _slice(ckpt.info(p + "down_proj"), e)]
        return per_expert(ckpt, layer, e, ["weight"])

    def dense(self, raw: list[torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        gate_up = raw[0] if self.fused else torch.cat(raw[:2], dim=0)
        return gate_up.to(dtype), raw[-1].to(dtype)

    def prepare(self, raw: list[torch.Tensor], slot: torch.Tensor) -> None:
        gate_up, down = (p.view(slot) for p in self.slot)
        if self.fused:
            gate_up.copy_(raw[0])
        else:
            gate_up[: self.I].copy_(raw[0])
            gate_up[self.I :].copy_(raw[1])
        down.copy_(raw[-1])

    def bind(self, slot: torch.Tensor) -> Expert:
        return DenseExpert(*(p.view(slot) for p in self.slot))

    def stack(self, buffer: torch.Tensor, n_slots: int, stride: int) -> StackedExperts | None:
        return StackedExperts(*stack_parts(self.slot, buffer, n_slots, stride))

    def gather_nbytes(self, top_k: int) -> int:
        return dense_gather(self, top_k)


def _slice(info: TensorInfo, e: int) -> TensorInfo:
    """Expert e's slice of a fused [E, ...] tensor: contiguous because e is the leading dim."""
    per = info.nbytes // info.shape[0]
    start = info.start + e * per
    return replace(info, name=f"{info.name}[{e}]", shape=info.shape[1:], start=start, end=start + per)
