"""Where each routed expert lives on disk, and reading its bytes into fixed slots.

The expert's format (`formats.ExpertFormat`) names its tensors (fused or per-expert layout, dense, FP8
with block scales, int4 packed with scales); the store resolves them to byte ranges once and preads them
straight into caller-owned flat uint8 slots, so the caches never map a shard and never allocate per read.
A `direct` format's slot holds the bytes as stored; otherwise they land in a caller-owned staging buffer
and the format prepares the slot from them (a dtype conversion, a repack for a kernel).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..weights.checkpoint import Checkpoint, read_range
from ..weights.config import TextConfig
from .formats import Expert, ExpertFormat, choose

IOV_MAX = min(os.sysconf("SC_IOV_MAX"), 1024) if hasattr(os, "sysconf") else 1024
RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)  # Linux: read only what the page cache holds, never wait


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
    """Byte ranges of every (layer, expert) in its format, reads into fixed slots, and a reference read."""

    def __init__(
        self,
        ckpt: Checkpoint,
        cfg: TextConfig,
        fmt: ExpertFormat | None = None,
        io_threads: int = 4,
        raw_config: dict | None = None,
    ) -> None:
        self.ckpt = ckpt
        self.cfg = cfg
        if fmt is None:  # the format as stored: slots hold the checkpoint's own bytes
            fmt = choose(raw_config or {}, cfg.hidden_size, cfg.moe_intermediate_size, "cpu", None, ckpt)
        self.format = fmt
        self.parts = {
            (layer, e): fmt.locate(ckpt, layer, e)
            for layer in range(cfg.num_hidden_layers)
            for e in range(cfg.num_experts)
        }
        for key, infos in self.parts.items():
            fmt.check(key, infos)
        self.expert_nbytes = fmt.disk_nbytes  # bytes on disk per expert (scales included)
        self.io_threads = io_threads
        self._fds: dict[Path, int] = {}
        self._fd_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._nowait = RWF_NOWAIT  # cleared if the filesystem refuses the flag
        # preadv runs served whole by the page cache / that had to wait for the disk (both threads add)
        self.runs_cached = self.runs_from_disk = 0

    def for_compute(self, device: torch.device | str, dtype: torch.dtype) -> ExpertStore:
        """This store when its format computes in `dtype` already (a load chose it so: plan.load), else
        one over the same checkpoint whose format is the same stored format computing in `dtype` on
        `device` (ExpertFormat.for_compute: nothing is detected again)."""
        if self.format.dtype == dtype:
            return self
        return ExpertStore(self.ckpt, self.cfg, self.format.for_compute(device, dtype), self.io_threads)

    # ---- the reference path -------------------------------------------------------------------

    def read(self, layer: int, e: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Read one expert from disk into fresh tensors, decoded by the format's reference path:
        (gate_up [2I, D], down [D, I]) in `dtype`, on the CPU."""
        return self.format.dense([read_range(t) for t in self.parts[(layer, e)]], dtype)

    def read_expert(self, layer: int, e: int, device: torch.device) -> Expert:
        """Read one expert into a fresh slot on `device` and bind it (the uncached provider's path)."""
        slot = torch.empty(self.format.slot_nbytes, dtype=torch.uint8)
        staging = None if self.format.direct else torch.empty(self.format.raw_nbytes, dtype=torch.uint8)
        self.read_many(layer, [e], [slot], staging)
        return self.format.bind(slot.to(device))

    # ---- reads into fixed slots ---------------------------------------------------------------

    @property
    def slot_nbytes(self) -> int:
        return self.format.slot_nbytes

    @property
    def raw_nbytes(self) -> int:
        return self.format.raw_nbytes

    def needs_staging(self) -> bool:
        return not self.format.direct

    def read_many(
        self,
        layer: int,
        experts: Sequence[int],
        slots: Sequence[torch.Tensor],
        staging: torch.Tensor | None = None,
    ) -> None:
        """Read several experts of one layer into their slots (flat uint8, >= slot_nbytes) in one pass
        ordered by file offset. Ranges that touch in the file (neighbouring experts of a fused tensor)
        become one preadv. A format that is not `direct` goes through `staging` (>= raw_nbytes; allocated
        here when not given) one expert at a time, still in file order."""
        if len(experts) != len(slots):
            raise ValueError(f"{len(experts)} experts but {len(slots)} slots")
        fmt = self.format
        if fmt.direct:
            self._pread([seg for e, s in zip(experts, slots) for seg in self._segments(layer, e, s)])
            return
        if staging is None:
            staging = torch.empty(fmt.raw_nbytes, dtype=torch.uint8)
        order = sorted(zip(experts, slots), key=lambda es: self.parts[(layer, es[0])][0].start)
        for e, slot in order:
            self._pread(self._segments(layer, e, staging))
            fmt.prepare(fmt.raw_views(staging), slot)

    def _segments(self, layer: int, e: int, buf: torch.Tensor) -> list[_Segment]:
        view = memoryview(buf.numpy()).cast("B")
        return [
            _Segment(r.file, r.start, view[p.offset : p.offset + r.nbytes])
            for r, p in zip(self.parts[(layer, e)], self.format.raw)
        ]

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
        return sorted({r.file for infos in self.parts.values() for r in infos})

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
