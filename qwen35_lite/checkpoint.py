"""A Hugging Face safetensors checkpoint: every tensor's file, dtype, shape and byte range, read lazily.

The headers are parsed here (not through safetensors' Python API) because the expert store needs the
absolute byte range of every tensor to read one expert without mapping a whole shard.
Tensor names are canonicalised: `model.language_model.` (VLM checkpoints) and `model.` (text-only
checkpoints) are stripped, so the engine sees `layers.0.mlp.gate.weight`, `embed_tokens.weight`,
`norm.weight`, `lm_head.weight`; the vision tower is `visual.*`; `mtp.*` is kept under its own name.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CheckpointError

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}

FP8_BLOCK = 128


@dataclass(frozen=True)
class TensorInfo:
    name: str  # the name as stored in the file
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def canonical_name(stored: str) -> str:
    for prefix in ("model.language_model.", "model.visual.", "model."):
        if stored.startswith(prefix):
            rest = stored[len(prefix) :]
            return "visual." + rest if prefix == "model.visual." else rest
    return stored


def read_header(path: Path) -> tuple[dict, int]:
    """Return (header dict, data offset) of one safetensors file, with typed errors for bad files."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path.name} is truncated (no header)", "re-download this shard")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > 100_000_000:
                raise CheckpointError(f"{path.name} is truncated or not a safetensors file", "re-download it")
            header = json.loads(f.read(n))
    except FileNotFoundError as e:
        raise CheckpointError(
            f"shard {path.name} is missing from {path.parent}", "re-download the checkpoint"
        ) from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path.name} has a corrupt header", "re-download this shard") from e
    return header, 8 + n


def _scan_file(path: Path) -> list[TensorInfo]:
    header, base = read_header(path)
    size = path.stat().st_size
    infos = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES.get(meta["dtype"])
        if dtype is None:
            raise CheckpointError(f"{path.name}: tensor {name} has unsupported dtype {meta['dtype']}", "")
        start, end = (base + o for o in meta["data_offsets"])
        if end > size:
            raise CheckpointError(
                f"{path.name} is truncated ({size} bytes, tensors reach {end})",
                "the download was interrupted: re-download this shard",
            )
        infos.append(TensorInfo(name, path, dtype, tuple(meta["shape"]), start, end))
    return infos


def _shard_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index.name} is corrupt", "re-download the checkpoint") from e
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (model_dir / f).is_file()]
        if missing:
            raise CheckpointError(
                f"{len(missing)} shard(s) listed in {index.name} are missing, first {missing[0]}",
                "the download is incomplete: run the same command online to resume it",
            )
        return [model_dir / f for f in files]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {model_dir}", "is this a Hugging Face checkpoint?")
    return files


class Checkpoint:
    """Lazy view over the shards of one checkpoint directory."""

    def __init__(self, model_dir: Path | str) -> None:
        self.dir = Path(model_dir)
        self.tensors: dict[str, TensorInfo] = {}
        for path in _shard_files(self.dir):
            for info in _scan_file(path):
                self.tensors[canonical_name(info.name)] = info
        self._handles: dict[Path, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError as e:
            raise CheckpointError(
                f"tensor {name} is missing from {self.dir}", "the checkpoint is incomplete"
            ) from e

    def names(self, prefix: str = "") -> list[str]:
        return [n for n in self.tensors if n.startswith(prefix)]

    def nbytes(self, prefix: str = "") -> int:
        return sum(i.nbytes for n, i in self.tensors.items() if n.startswith(prefix))

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read one tensor into a fresh CPU tensor (a copy, so the shard can be unmapped)."""
        info = self.info(name)
        t = read_range(info)
        if info.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            t = self._dequantize_fp8(name, t)
        return t if dtype is None else t.to(dtype)

    def _dequantize_fp8(self, name: str, w: torch.Tensor) -> torch.Tensor:
        scale_name = name + "_scale_inv"
        if scale_name not in self.tensors:
            return w.float()
        return dequantize_fp8(w, read_range(self.info(scale_name)))


def dequantize_fp8(w: torch.Tensor, scale_inv: torch.Tensor, block: int = FP8_BLOCK) -> torch.Tensor:
    """Block-wise FP8: value = w[r, c] * scale_inv[r // block, c // block] (scale_inv [ceil(out/b), ceil(in/b)])."""
    s = (
        scale_inv.float()
        .repeat_interleave(block, 0)[: w.shape[0]]
        .repeat_interleave(block, 1)[:, : w.shape[1]]
    )
    return w.float() * s


def read_range(info: TensorInfo, out: torch.Tensor | None = None) -> torch.Tensor:
    """Read a tensor's bytes with pread into `out` (or a new buffer) and view them with its dtype and shape."""
    n = info.nbytes
    buf = out if out is not None else torch.empty(n, dtype=torch.uint8)
    view = memoryview(buf.numpy()).cast("B")[:n] if n else memoryview(b"")
    fd = os.open(info.file, os.O_RDONLY)
    try:
        got = 0
        while got < n:
            k = os.preadv(fd, [view[got:]], info.start + got)
            if k <= 0:
                raise CheckpointError(
                    f"{info.file.name} ended early while reading {info.name}", "re-download it"
                )
            got += k
    finally:
        os.close(fd)
    return buf[:n].view(info.dtype).view(info.shape)
