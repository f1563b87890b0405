"""What every compact Linear is: a weight W [N, K] held in some encoding, called as y = W(x) for x [T, K]
in the compute dtype, with the tensors it holds listed (so a spilled layer can pack them into one buffer and
a load can move them) and its weights recoverable (`dequantize`: the reference and the prefill path).

`linear(x, w)` is the one entry the model calls: a dense tensor through torch.mv / F.linear, a compact one
through its kernel.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from . import dense_cpu

# Rows from which a call dequantises its weights (a block of rows at a time) and runs the dense GEMM
# instead of the matvec kernel: a prefill chunk has 512, a decode step 1.
GEMM_ROWS = 32
# Weights dequantised at once (a block of rows): bounds the temporaries of a call (dequant_transient).
DEQUANT_ELEMS = 1 << 22
DEQUANT_BYTES = 16  # temporaries a dequantised weight takes at most: nibbles, fp32 steps, the result


def linear(x: torch.Tensor, w: torch.Tensor | CompactLinear) -> torch.Tensor:
    """x [T, K] @ w [N, K]ᵀ. One row (a decode step) of a dense w goes through torch.mv: on the CPU 10-50%
    faster a call than F.linear's matmul path for the same sums (bit-identical on an AMX Xeon, bf16 and
    fp32), or for a bf16 w of a few rows or more through dense_cpu's kernel (torch.mv's bf16 call costs
    ~20 µs whatever the size); more rows through F.linear. A compact w runs its own kernel."""
    if not isinstance(w, torch.Tensor):
        return w(x)
    if x.shape[0] == 1 and x.dim() == 2:
        if w.shape[0] >= dense_cpu.MIN_ROWS and dense_cpu.usable(w, x):
            return dense_cpu.bf16_mv(w, x[0]).unsqueeze(0)
        return torch.mv(w, x[0]).unsqueeze(0)
    return F.linear(x, w)


def rows_per_block(n: int, k: int, multiple: int = 1) -> int:
    """Rows of an [n, k] weight dequantised at once: DEQUANT_ELEMS worth, a multiple of `multiple`."""
    rows = max(multiple, DEQUANT_ELEMS // max(k, 1) // multiple * multiple)
    return min(rows, -(-n // multiple) * multiple)


_KEPT = threading.local()  # .weights: {id(weight): its dequantised matrix} inside dequantized_once


@contextlib.contextmanager
def dequantized_once() -> Iterator[None]:
    """Inside it, a weight that a call dequantises is kept for the calls after it and dropped at the end:
    a prefill block runs a layer's projections once per 512-token chunk, so a layer dequantises each
    weight once a block instead of once a chunk (Qwen35Model.prefill wraps each layer in it). The kept
    matrices are one layer's packed weights in the compute dtype (the plan's dequant_bytes)."""
    outer = getattr(_KEPT, "weights", None)
    if outer is None:
        _KEPT.weights = {}
    try:
        yield
    finally:
        if outer is None:
            _KEPT.weights = None


def dequant_transient(shape: tuple[int, ...]) -> int:
    """Bytes a call that dequantises an [N, K] weight holds at most beside its output (a block of rows)."""
    n, k = shape
    return rows_per_block(n, k, 64) * k * DEQUANT_BYTES


@dataclasses.dataclass(frozen=True, eq=False)
class CompactLinear:
    """Base of the encodings: subclasses are frozen dataclasses whose tensor fields are listed in
    TENSORS (None allowed) and whose other fields are plain values."""

    TENSORS = ()  # names of the tensor fields

    shape: tuple[int, int]  # (N, K): out, in features

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dequantize(self, dtype: torch.dtype, rows: slice | None = None) -> torch.Tensor:
        """W [N, K] (or the rows `rows`) in `dtype`, as this encoding holds it."""
        raise NotImplementedError

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """What the kernel computes, the obvious way: the weights dequantised, then F.linear."""
        return F.linear(x, self.dequantize(x.dtype))

    def dequantized_linear(self, x: torch.Tensor, multiple: int = 1) -> torch.Tensor:
        """x @ Wᵀ through the dense kernels, W dequantised once for the call (or once inside
        `dequantized_once`), a block of rows at a time (the temporaries stay under DEQUANT_ELEMS weights)."""
        kept = getattr(_KEPT, "weights", None)
        if kept is not None:
            w = kept.get(id(self))
            if w is None or w.dtype != x.dtype:
                w = kept[id(self)] = self._dequantize_blocks(x.dtype, multiple)
            return linear(x, w)
        n, k = self.shape
        step = rows_per_block(n, k, multiple)
        if step >= n:
            return linear(x, self.dequantize(x.dtype))
        parts = [linear(x, self.dequantize(x.dtype, slice(s, s + step))) for s in range(0, n, step)]
        return torch.cat(parts, -1)

    def _dequantize_blocks(self, dtype: torch.dtype, multiple: int) -> torch.Tensor:
        """The whole W [N, K] in `dtype`, dequantised a block of rows at a time into one matrix."""
        n, k = self.shape
        step = rows_per_block(n, k, multiple)
        if step >= n:
            return self.dequantize(dtype)
        w = torch.empty(n, k, dtype=dtype, device=self.device)
        for s in range(0, n, step):
            w[s : s + step] = self.dequantize(dtype, slice(s, s + step))
        return w

    # ---- the tensors it holds ----------------------------------------------------------------------

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in self.TENSORS if getattr(self, k) is not None}

    def with_tensors(self, tensors: dict[str, torch.Tensor]) -> CompactLinear:
        """The same encoding over other tensors of the same shapes (moved, or views into a buffer)."""
        return dataclasses.replace(self, **tensors)

    def to(self, device: torch.device | str) -> CompactLinear:
        return self.with_tensors({k: v.to(device) for k, v in self.tensors().items()})

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors().values())).device

    @property
    def encoding(self) -> str:
        """How `info`, tests and errors name it."""
        raise NotImplementedError
