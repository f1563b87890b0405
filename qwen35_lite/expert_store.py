"""Where each routed expert lives on disk, and reading one expert's bytes.

Two layouts exist in the wild (see docs/ARCHITECTURE.md):
- fused:      `layers.L.mlp.experts.gate_up_proj` [E, 2I, D] and `...experts.down_proj` [E, D, I];
              expert e is one contiguous slice of the leading dim in each tensor.
- per-expert: `layers.L.mlp.experts.{e}.{gate,up,down}_proj.weight` ([I, D], [I, D], [D, I]),
              optionally FP8 with a `weight_scale_inv` beside each.
Either way an expert is a list of byte ranges; `read` turns them into (gate_up [2I, D], down [D, I]).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .checkpoint import Checkpoint, TensorInfo, read_range
from .config import TextConfig
from .errors import CheckpointError


@dataclass(frozen=True)
class ExpertParts:
    """The tensors of one expert: gate_up as one [2I, D] range or gate and up as two [I, D] ranges."""

    gate_up: tuple[TensorInfo, ...]  # one fused range, or (gate, up)
    down: TensorInfo
    scales: tuple[TensorInfo | None, ...] = ()  # FP8 scale_inv for (gate, up, down), per-expert layout only

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (*self.gate_up, self.down, *[s for s in self.scales if s]))


def _slice(info: TensorInfo, e: int) -> TensorInfo:
    """Expert e's slice of a fused [E, ...] tensor: contiguous because e is the leading dim."""
    per = info.nbytes // info.shape[0]
    return dataclasses.replace(
        info,
        name=f"{info.name}[{e}]",
        shape=info.shape[1:],
        start=info.start + e * per,
        end=info.start + (e + 1) * per,
    )


class ExpertStore:
    """Byte ranges of every (layer, expert) and a plain read of one expert."""

    def __init__(self, ckpt: Checkpoint, cfg: TextConfig) -> None:
        self.ckpt = ckpt
        self.cfg = cfg
        self.fused = "layers.0.mlp.experts.gate_up_proj" in ckpt
        if not self.fused and "layers.0.mlp.experts.0.gate_proj.weight" not in ckpt:
            raise CheckpointError(
                "no routed expert tensors for layer 0 (neither fused nor per-expert)",
                "the checkpoint is incomplete or not a Qwen3.5-MoE checkpoint",
            )
        self.parts = {
            (layer, e): self._locate(layer, e)
            for layer in range(cfg.num_hidden_layers)
            for e in range(cfg.num_experts)
        }
        first = self.parts[(0, 0)]
        self.expert_nbytes = first.nbytes
        self.stored_dtype = first.down.dtype

    def _locate(self, layer: int, e: int) -> ExpertParts:
        p = f"layers.{layer}.mlp.experts."
        if self.fused:
            return ExpertParts(
                (_slice(self.ckpt.info(p + "gate_up_proj"), e),), _slice(self.ckpt.info(p + "down_proj"), e)
            )
        names = [f"{p}{e}.{k}_proj.weight" for k in ("gate", "up", "down")]
        infos = [self.ckpt.info(n) for n in names]
        scales = tuple(self.ckpt.tensors.get(n + "_scale_inv") for n in names)
        return ExpertParts((infos[0], infos[1]), infos[2], scales if any(scales) else ())

    def read(self, layer: int, e: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Read one expert from disk: (gate_up [2I, D], down [D, I]) in `dtype`, on the CPU."""
        parts = self.parts[(layer, e)]
        tensors = [read_range(t) for t in (*parts.gate_up, parts.down)]
        if parts.scales:
            tensors = [_dequantize(t, read_range(s)) if s else t for t, s in zip(tensors, parts.scales)]
        gate_up = tensors[0] if len(parts.gate_up) == 1 else torch.cat(tensors[:2], dim=0)
        return gate_up.to(dtype), tensors[-1].to(dtype)


def _dequantize(w: torch.Tensor, scale_inv: torch.Tensor, block: int = 128) -> torch.Tensor:
    """Block-wise FP8: value = w[r, c] * scale_inv[r // block, c // block]."""
    s = (
        scale_inv.float()
        .repeat_interleave(block, 0)[: w.shape[0]]
        .repeat_interleave(block, 1)[:, : w.shape[1]]
    )
    return w.float() * s
