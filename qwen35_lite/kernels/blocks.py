"""Projections fused at load (model/fuse.py) whose parts are not all held the same way: the rows of each
run of parts that can be concatenated (dense of one dtype, or packed of one scheme) become one weight, and
the runs are called one after the other, their outputs side by side. Fused this way equals unfused: each
output column is the same row of the same weight (tests/kernels/test_blocks.py)."""

from __future__ import annotations

import dataclasses

import torch

from .base import CompactLinear, linear
from .packed import PackedWeight

Weight = torch.Tensor | CompactLinear


@dataclasses.dataclass(frozen=True, eq=False)
class RowBlocks(CompactLinear):
    """Weights [N_i, K] called as one [ΣN_i, K]: y = [W_0(x) | W_1(x) | ...]."""

    TENSORS = ()

    parts: tuple[Weight, ...]

    @property
    def encoding(self) -> str:
        return " + ".join(_encoding(p) for p in self.parts)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([linear(x, p) for p in self.parts], dim=-1)

    def dequantize(self, dtype: torch.dtype, rows: slice | None = None) -> torch.Tensor:
        w = torch.cat(
            [p.to(dtype) if isinstance(p, torch.Tensor) else p.dequantize(dtype) for p in self.parts]
        )
        return w if rows is None else w[rows]

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, p in enumerate(self.parts):
            items = {"": p}.items() if isinstance(p, torch.Tensor) else p.tensors().items()
            out.update({f"{i}.{k}": v for k, v in items})
        return out

    def with_tensors(self, tensors: dict[str, torch.Tensor]) -> RowBlocks:
        parts = []
        for i, p in enumerate(self.parts):
            mine = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.split(".", 1)[0] == str(i)}
            parts.append(mine[""] if isinstance(p, torch.Tensor) else p.with_tensors(mine))
        return dataclasses.replace(self, parts=tuple(parts))


def _encoding(w: Weight) -> str:
    return str(w.dtype).removeprefix("torch.") if isinstance(w, torch.Tensor) else w.encoding


def _joins(a: Weight, b: Weight) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape[1:] == b.shape[1:]
    return isinstance(a, PackedWeight) and a.same_scheme(b)


def fuse_rows(parts: list[Weight]) -> Weight:
    """The parts' rows one after the other, as one weight where they are all held alike (dense of one dtype:
    torch.cat; packed of one scheme: PackedWeight.cat_rows), else as RowBlocks over the runs that are."""
    runs: list[list[Weight]] = []
    for p in parts:
        if runs and _joins(runs[-1][-1], p):
            runs[-1].append(p)
        else:
            runs.append([p])
    joined = [
        r[0] if len(r) == 1 else torch.cat(r) if isinstance(r[0], torch.Tensor) else PackedWeight.cat_rows(r)
        for r in runs
    ]
    if len(joined) == 1:
        return joined[0]
    return RowBlocks((sum(p.shape[0] for p in parts), parts[0].shape[1]), tuple(joined))
