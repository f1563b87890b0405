"""What every expert format is: the `ExpertFormat` base, the dense SwiGLU FFN its experts compute, and the
helpers the formats share (per-expert tensor names, the cost of a dequantising gather).

A format knows an expert's tensors on disk (`locate`: the byte ranges, in a fixed order), the layout of
those raw bytes in a buffer (`raw`), what a cache slot holds (`slot_nbytes`; the raw bytes themselves when
`direct`, else what `prepare` makes of them when the expert enters a cache), and how to compute the
expert's SwiGLU FFN from a slot (`bind(slot)` -> a callable `x -> y`; `stack` for all slots at once).
Slots, tiers, prefetch and the GPU copy only move opaque slot bytes.

Legend: D = hidden, I = expert FFN width.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ...errors import CheckpointError
from ...kernels import dense_cpu, linear
from ..layout import Part
from ..stacks import StackedExperts

if TYPE_CHECKING:  # the formats only call methods of a checkpoint: no import of the reader at run time
    from ...weights.checkpoint import Checkpoint, TensorInfo

PROJ = ("gate", "up", "down")

Expert = Callable[[torch.Tensor], torch.Tensor]  # x [T, D] -> y [T, D]


def ffn(
    x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, matmul: Callable = F.linear
) -> torch.Tensor:
    """The SwiGLU FFN on dense weights: gate_up [2I, D], down [D, I]; `matmul(x, w)` = x @ wᵀ."""
    g, u = matmul(x, gate_up).chunk(2, dim=-1)
    return matmul(F.silu(g) * u, down)


class DenseExpert:
    """An expert held as dense gate_up / down tensors (views into a slot, or fresh tensors)."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        self.gate_up, self.down = gate_up, down

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1 and dense_cpu.usable(self.gate_up, x):  # as StackedExperts.kernel sums a row
            return ffn(x, self.gate_up, self.down, linear)
        return ffn(x, self.gate_up, self.down)


class ExpertFormat:
    """Base: subclasses set `name`, `raw` (layout of the disk tensors in `locate` order), `slot_nbytes`,
    `direct`, and implement `locate`, `dense`, `bind`, `for_compute` (and `prepare` when not direct)."""

    name: str
    raw: list[Part]
    raw_nbytes: int
    slot_nbytes: int
    direct: bool  # the slot holds the raw bytes as read: no conversion on the read path

    def __init__(self, hidden: int, inter: int, dtype: torch.dtype) -> None:
        self.D, self.I, self.dtype = hidden, inter, dtype

    @property
    def disk_nbytes(self) -> int:
        return sum(p.nbytes for p in self.raw)

    @property
    def uses_cpu_kernel(self) -> bool:
        """The experts run by a dedicated CPU kernel (torch's int4/int8 matmuls), not as F.linear on dense
        weights: the plan then counts no oneDNN primitives for them (plan.sizes.cpu_matmul_retained)."""
        return False

    @property
    def staging_nbytes(self) -> int:
        """A read buffer for the raw bytes, for formats whose slots are prepared from them (0 if direct)."""
        return 0 if self.direct else self.raw_nbytes

    def describe(self) -> str:
        return self.name

    def for_compute(self, device: torch.device | str, dtype: torch.dtype) -> ExpertFormat:
        """The same stored format computing in `dtype` on `device` (what is stored is known already: no
        detection; the slot layout may change, e.g. a CPU kernel's)."""
        raise NotImplementedError

    def locate(self, ckpt: Checkpoint, layer: int, e: int) -> list[TensorInfo]:
        raise NotImplementedError

    def dense(self, raw: list[torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference decoding: raw tensors (in `locate` order) -> (gate_up [2I, D], down [D, I])."""
        raise NotImplementedError

    def prepare(self, raw: list[torch.Tensor], slot: torch.Tensor) -> None:
        """Raw tensors -> the slot's layout (formats that are not `direct`)."""
        raise NotImplementedError

    def bind(self, slot: torch.Tensor) -> Expert:
        """The expert held in `slot` (a flat uint8 buffer on the compute device) as a callable."""
        raise NotImplementedError

    def stack(self, buffer: torch.Tensor, n_slots: int, stride: int) -> StackedExperts | None:
        """Every slot of a layer's buffer as one StackedExperts, for formats whose slots can run stacked;
        None otherwise (their experts run one by one through `bind`)."""
        return None

    def gather_nbytes(self, top_k: int) -> int:
        """What a decode step's stacked experts hold at once (StackedExperts: the top-k gate_up
        matrices gathered; formats dequantised per use also their raw bytes and fp32 intermediates)."""
        return 0

    def prefill_nbytes(self) -> int:
        """What one expert run on a prefill block's rows holds besides the activations: the expert
        dequantised for the call, where the format dequantises per call (formats whose slots hold dense
        weights: nothing)."""
        return 0

    def raw_views(self, buf: torch.Tensor) -> list[torch.Tensor]:
        return [p.view(buf) for p in self.raw]

    def _dequantising(self, raw: list[torch.Tensor]) -> Expert:
        """An expert from its raw (quantised) tensors, dequantised at every call: the exact path."""
        return lambda x: ffn(x, *self.dense(raw, x.dtype))

    def check(self, key: tuple[int, int], infos: list[TensorInfo]) -> None:
        """Every expert must have the tensors this format expects, with its shapes and dtypes."""
        got = [(i.dtype, tuple(i.shape)) for i in infos]
        want = [(p.dtype, p.shape) for p in self.raw]
        if got != want:
            raise CheckpointError(
                f"expert {key[1]} of layer {key[0]} has tensors {got}, expected {want}",
                "the checkpoint is inconsistent: re-download it",
            )


def per_expert(ckpt: Checkpoint, layer: int, e: int, suffixes: Sequence[str]) -> list[TensorInfo]:
    """layers.L.mlp.experts.E.{gate,up,down}_proj.<suffix>, suffix-major: all weights, then all scales."""
    p = f"layers.{layer}.mlp.experts.{e}."
    return [ckpt.info(f"{p}{k}_proj.{s}") for s in suffixes for k in PROJ]


def dense_gather(fmt: ExpertFormat, top_k: int) -> int:
    """A stacked dense step: the top-k gate_up matrices gathered in the compute dtype."""
    return top_k * 2 * fmt.I * fmt.D * fmt.dtype.itemsize


def dequantised_gather(fmt: ExpertFormat, top_k: int) -> int:
    """Raw bytes of top-k experts, gate and up in fp32 and concatenated, and the cast to the compute dtype."""
    return top_k * (fmt.raw_nbytes + 2 * fmt.I * fmt.D * (8 + fmt.dtype.itemsize))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
