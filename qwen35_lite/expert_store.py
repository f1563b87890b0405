"""Where each routed expert lives on disk, and reading one expert's bytes.

Two layouts exist in the wild (see docs/ARCHITECTURE.md):
- fused:      `layers.L.mlp.experts.gate_up_proj` [E, 2I, D] and `...experts.down_proj` [E, D, I];
              expert e is one contiguous slice of the leading dim in each tensor.
- per-expert: `layers.L.mlp.experts.{e}.{gate,up,down}_proj.weight` ([I, D], [I, D], [D, I]),
              optionally FP8 with a `weight_scale_inv` beside each.
Either way an expert is a list of byte ranges. `read` returns fresh tensors (the reference path);
`read_into` / `read_many` pread the ranges straight into caller-owned flat uint8 slots, so the caches
never map a shard and never allocate per read. A slot holds gate_up [2I, D] then down [D, I], back to
back, in the compute dtype; when that differs from the stored dtype (FP8, bf16 -> fp32) the raw bytes
go through a caller-owned staging buffer first.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import Checkpoint, TensorInfo, dequantize_fp8, read_range
from .config import TextConfig
from .errors import CheckpointError

IOV_MAX = min(os.sysconf("SC_IOV_MAX"), 1024) if hasattr(os, "sysconf") else 1024
RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)  # Linux: read only what the page cache holds, never wait
ALIGN = 64  # offsets of the parts inside a staging buffer: every dtype view stays aligned


@dataclass(frozen=True)
class ExpertParts:
    """The tensors of one expert: gate_up as one [2I, D] range or gate and up as two [I, D] ranges."""

    gate_up: tuple[TensorInfo, ...]  # one fused range, or (gate, up)
    down: TensorInfo
    scales: tuple[TensorInfo | None, ...] = ()  # FP8 scale_inv for (gate, up, down), per-expert layout only

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (*self.gate_up, self.down, *[s for s in self.scales if s]))

    def ranges(self) -> list[TensorInfo]:
        """Every byte range in staging order: weights back to back, then the scales."""
        return [*self.gate_up, self.down, *[s for s in self.scales if s]]


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


def _offsets(ranges: Sequence[TensorInfo]) -> list[int]:
    """Offsets of the ranges in a staging buffer: weights of one dtype back to back, scales aligned."""
    out, pos, dtype = [], 0, ranges[0].dtype
    for r in ranges:
        if r.dtype != dtype:
            pos = -(-pos // ALIGN) * ALIGN
        out.append(pos)
        pos += r.nbytes
    return out


@dataclass
class _Segment:
    """One pread: `nbytes` at `start` of `file` into `dest` (a memoryview of a slot or staging buffer)."""

    file: Path
    start: int
    dest: memoryview

    @property
    def end(self) -> int:
        return self.start + len(self.dest)


class ExpertStore:
    """Byte ranges of every (layer, expert), reads into fixed slots, and a plain reference read."""

    def __init__(self, ckpt: Checkpoint, cfg: TextConfig, io_threads: int = 4) -> None:
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
        self.expert_nbytes = first.nbytes  # bytes on disk per expert (scales included)
        self.stored_dtype = first.down.dtype
        self.has_scales = bool(first.scales)
        self._offsets = _offsets(first.ranges())
        self.raw_nbytes = self._offsets[-1] + first.ranges()[-1].nbytes  # staging buffer size
        I, D = cfg.moe_intermediate_size, cfg.hidden_size
        self.gate_up_shape, self.down_shape = (2 * I, D), (D, I)
        shapes = [r.shape for r in first.ranges()]
        for key, p in self.parts.items():
            if [r.shape for r in p.ranges()] != shapes or p.down.dtype != self.stored_dtype:
                raise CheckpointError(
                    f"expert {key[1]} of layer {key[0]} has a different shape or dtype than expert 0",
                    "the checkpoint is inconsistent: re-download it",
                )
        self.io_threads = io_threads
        self._fds: dict[Path, int] = {}
        self._fd_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._nowait = RWF_NOWAIT  # cleared if the filesystem refuses the flag
        # preadv runs served whole by the page cache / that had to wait for the disk (both threads add)
        self.runs_cached = self.runs_from_disk = 0

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

    # ---- the reference path -------------------------------------------------------------------

    def read(self, layer: int, e: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Read one expert from disk: (gate_up [2I, D], down [D, I]) in `dtype`, on the CPU."""
        parts = self.parts[(layer, e)]
        tensors = [read_range(t) for t in (*parts.gate_up, parts.down)]
        if parts.scales:
            tensors = [dequantize_fp8(t, read_range(s)) if s else t for t, s in zip(tensors, parts.scales)]
        gate_up = tensors[0] if len(parts.gate_up) == 1 else torch.cat(tensors[:2], dim=0)
        return gate_up.to(dtype), tensors[-1].to(dtype)

    # ---- reads into fixed slots ---------------------------------------------------------------

    def slot_nbytes(self, dtype: torch.dtype | None = None) -> int:
        """Bytes of one slot holding gate_up and down in `dtype` (default: the stored dtype)."""
        dtype = dtype or self.stored_dtype
        (a, b), (c, d) = self.gate_up_shape, self.down_shape
        return (a * b + c * d) * dtype.itemsize

    def needs_staging(self, dtype: torch.dtype | None) -> bool:
        """True when the stored bytes must be converted (FP8 scales or another dtype) on the way in."""
        return self.has_scales or (dtype is not None and dtype != self.stored_dtype)

    def slot_views(
        self, slot: torch.Tensor, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up [2I, D], down [D, I]) viewed in a flat uint8 slot (any device); no copy."""
        dtype = dtype or self.stored_dtype
        gu = self.gate_up_shape[0] * self.gate_up_shape[1] * dtype.itemsize
        n = self.slot_nbytes(dtype)
        return slot[:gu].view(dtype).view(self.gate_up_shape), slot[gu:n].view(dtype).view(self.down_shape)

    def read_into(
        self,
        layer: int,
        e: int,
        slot: torch.Tensor,
        dtype: torch.dtype | None = None,
        staging: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """pread expert e of `layer` into `slot` (flat uint8, >= slot_nbytes(dtype)); return views into it.

        With a conversion (`needs_staging(dtype)`), the raw bytes land in `staging` (flat uint8,
        >= raw_nbytes; allocated here when not given) and are converted into the slot.
        """
        return self.read_many(layer, [e], [slot], dtype, staging)[e]

    def read_many(
        self,
        layer: int,
        experts: Sequence[int],
        slots: Sequence[torch.Tensor],
        dtype: torch.dtype | None = None,
        staging: torch.Tensor | None = None,
    ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Read several experts of one layer into their slots in one pass ordered by file offset.

        Ranges that touch in the file (neighbouring experts of a fused tensor) become one preadv.
        Returns {e: (gate_up, down)} viewed in the slots.
        """
        if len(experts) != len(slots):
            raise ValueError(f"{len(experts)} experts but {len(slots)} slots")
        if not self.needs_staging(dtype):
            segs = [seg for e, s in zip(experts, slots) for seg in self._segments(layer, e, s)]
            self._pread(segs)
            return {e: self.slot_views(s, dtype) for e, s in zip(experts, slots)}
        if staging is None:
            staging = torch.empty(self.raw_nbytes, dtype=torch.uint8)
        out = {}
        order = sorted(zip(experts, slots), key=lambda es: self.parts[(layer, es[0])].down.start)
        for e, slot in order:  # one staging buffer: one expert at a time, still in file order
            self._pread(self._segments(layer, e, staging))
            out[e] = self._convert(layer, e, staging, slot, dtype)
        return out

    def _segments(self, layer: int, e: int, buf: torch.Tensor) -> list[_Segment]:
        view = memoryview(buf.numpy()).cast("B")
        return [
            _Segment(r.file, r.start, view[o : o + r.nbytes])
            for r, o in zip(self.parts[(layer, e)].ranges(), self._offsets)
        ]

    def _convert(
        self, layer: int, e: int, staging: torch.Tensor, slot: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stored bytes in `staging` -> compute-dtype gate_up / down in `slot`."""
        parts = self.parts[(layer, e)]
        raw = [
            staging[o : o + r.nbytes].view(r.dtype).view(r.shape)
            for r, o in zip(parts.ranges(), self._offsets)
        ]
        gate_up, down = self.slot_views(slot, dtype)
        weights = raw[: len(parts.gate_up) + 1]  # [gate_up] or [gate, up], then down
        if parts.scales:
            scales = iter(raw[len(weights) :])
            weights = [dequantize_fp8(w, next(scales)) if s else w for w, s in zip(weights, parts.scales)]
        if len(parts.gate_up) == 1:
            gate_up.copy_(weights[0])
        else:
            half = self.gate_up_shape[0] // 2
            gate_up[:half].copy_(weights[0])
            gate_up[half:].copy_(weights[1])
        down.copy_(weights[-1])
        return gate_up, down

    def _pread(self, segs: list[_Segment]) -> None:
        """Sort by (file, offset), merge touching ranges into preadv runs, read them (threads if several)."""
        segs.sort(key=lambda s: (str(s.file), s.start))
        runs: list[list[_Segment]] = []
        for s in segs:
            last = runs[-1] if runs else None
            if last and last[-1].file == s.file and last[-1].end == s.start and len(last) < IOV_MAX:
                last.append(s)
            else:
                runs.append([s])
        # From the page cache a read is a memory copy: done here, a thread would only add a hand-off.
        # What must come from the disk goes to the pool (pread releases the GIL: queue depth).
        runs = [run for run in runs if not self._pread_cached(run)]
        if len(runs) > 1 and self.io_threads > 1:
            with self._fd_lock:  # the prefetch thread may get here at the same time
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(self.io_threads, thread_name_prefix="expert-io")
            list(self._pool.map(self._pread_run, runs))
        else:
            for run in runs:
                self._pread_run(run)

    def _pread_cached(self, run: list[_Segment]) -> bool:
        """Read the run only if the page cache holds all of it (RWF_NOWAIT: never waits for the disk).

        Counts the outcome in runs_cached / runs_from_disk. False: nothing usable was read (a partial
        read is read again in full; its bytes are cached by then) or the filesystem cannot say."""
        if not self._nowait:
            return False
        views = [s.dest for s in run]
        total = sum(len(v) for v in views)
        try:
            k = os.preadv(self._fd(run[0].file), views, run[0].start, self._nowait)
        except BlockingIOError:  # none of it cached
            k = 0
        except OSError:  # EOPNOTSUPP and the like
            self._nowait = 0
            return False
        if k == total:
            self.runs_cached += 1
            return True
        self.runs_from_disk += 1
        return False

    def _pread_run(self, run: list[_Segment]) -> None:
        fd = self._fd(run[0].file)
        views, offset = [s.dest for s in run], run[0].start
        total = sum(len(v) for v in views)
        got = 0
        while views:
            k = os.preadv(fd, views, offset + got)
            if k <= 0:
                raise CheckpointError(
                    f"{run[0].file.name} ended early at byte {offset + got} of {offset + total}",
                    "re-download it",
                )
            got += k
            while views and k >= len(views[0]):  # drop the buffers that are full, trim a partial one
                k -= len(views[0])
                views.pop(0)
            if views and k:
                views[0] = views[0][k:]

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            with self._fd_lock:
                fd = self._fds.get(path)
                if fd is None:
                    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                    if hasattr(os, "posix_fadvise"):
                        # experts are read at random: no readahead past the bytes asked for
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
                    self._fds[path] = fd
        return fd

    def files(self) -> list[Path]:
        """The shard files that hold routed experts."""
        return sorted({r.file for p in self.parts.values() for r in p.ranges()})

    def close(self) -> None:
        with self._fd_lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: os may already be gone
            pass


def evict_page_cache(files: Iterable[Path | str]) -> int:
    """Ask the kernel to drop these files' pages from the page cache (cold-read benchmarks).

    Returns how many files were advised. A no-op where posix_fadvise does not exist (macOS, Windows).
    """
    if not hasattr(os, "posix_fadvise"):
        return 0
    n = 0
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            n += 1
        finally:
            os.close(fd)
    return n
