"""A Hugging Face safetensors checkpoint: every tensor's file, dtype, shape and byte range, read lazily.

The headers are parsed here (not through safetensors' Python API) because the expert store needs the
absolute byte range of every tensor to read one expert without mapping a whole shard.
Tensor names are canonicalised: `model.language_model.` (VLM checkpoints) and `model.` (text-only
checkpoints) are stripped, so the engine sees `layers.0.mlp.gate.weight`, `embed_tokens.weight`,
`norm.weight`, `lm_head.weight`; the vision tower is `visual.*`; `mtp.*` is kept under its own name.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch

from ..errors import CheckpointError
from ..kernels import PackedWeight
from .fp8 import FP8_DTYPES, dequantize_fp8
from .packed import quantization_config
from .resident import PackedLinear, covered_scheme, other_format, resolve_packed

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

HEADER_LIMIT = 100_000_000  # safetensors' own cap on the header size


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
    """Return (header dict, data offset) of one safetensors file, with typed errors for bad files.

    The file is opened non-blocking and must be a regular file, so a FIFO or a device named
    `*.safetensors` is refused instead of hanging the loader."""
    with os.fdopen(_open_regular(path), "rb") as f:
        size = os.fstat(f.fileno()).st_size
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path.name} is truncated (no header)", "re-download this shard")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > HEADER_LIMIT:
            raise CheckpointError(f"{path.name} is truncated or not a safetensors file", "re-download it")
        text = f.read(n)
    try:
        header = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{path.name} has a corrupt header", "re-download this shard") from e
    if not isinstance(header, dict):
        raise CheckpointError(
            f"{path.name} has a corrupt header (not a JSON object)", "re-download this shard"
        )
    return header, 8 + n


def _open_regular(path: Path) -> int:
    """A read-only descriptor of `path`, refused unless it is a regular file (O_NONBLOCK: a FIFO opens
    at once instead of waiting for a writer, then fails the check)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError as e:
        raise CheckpointError(
            f"shard {path.name} is missing from {path.parent}", "re-download the checkpoint"
        ) from e
    except OSError as e:
        raise CheckpointError(
            f"shard {path.name} cannot be opened: {e.strerror}", "check the file and its permissions"
        ) from e
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CheckpointError(
            f"shard {path.name} is not a regular file", "replace it with the downloaded safetensors file"
        )
    return fd


def _scan_file(path: Path) -> list[TensorInfo]:
    """Every tensor of one shard, checked as the safetensors library checks them: known dtype, a shape
    whose bytes fill its range, ranges in order, without gaps or overlaps, exactly covering the data."""
    header, base = read_header(path)
    size = os.stat(path).st_size
    infos = [_tensor_info(path, name, meta, base) for name, meta in header.items() if name != "__metadata__"]
    _check_metadata(path, header.get("__metadata__", {}))
    infos.sort(key=lambda i: (i.start, i.end))
    offset = base
    for info in infos:
        if info.start != offset:
            what = "overlaps the previous tensor" if info.start < offset else "leaves a gap before it"
            raise CheckpointError(f"{path.name}: tensor {info.name} {what}", "re-download this shard")
        offset = info.end
    if offset > size:
        raise CheckpointError(
            f"{path.name} is truncated ({size} bytes, tensors reach {offset})",
            "the download was interrupted: re-download this shard",
        )
    if offset < size:
        raise CheckpointError(
            f"{path.name} has {size - offset} bytes after its last tensor", "re-download this shard"
        )
    return infos


def _tensor_info(path: Path, name: str, meta: object, base: int) -> TensorInfo:
    # The common case in a few operations (a 397B checkpoint has ~100k tensors); the diagnosis only on failure.
    try:
        code, shape, offsets = meta["dtype"], meta["shape"], meta["data_offsets"]
        dtype = SAFETENSORS_DTYPES[code]
        begin, end = offsets
        ok = _is_counts(shape) and _is_counts(offsets) and end - begin == math.prod(shape) * dtype.itemsize
    except (TypeError, KeyError, ValueError):
        ok = False
    if not ok:
        raise _tensor_error(path, name, meta)
    return TensorInfo(name, path, dtype, tuple(shape), base + begin, base + end)


def _tensor_error(path: Path, name: str, meta: object) -> CheckpointError:
    """What is wrong with one header entry, in the order the fields are read."""

    def bad(problem: str) -> CheckpointError:
        return CheckpointError(f"{path.name}: tensor {name} {problem}", "re-download this shard")

    if not isinstance(meta, dict):
        return bad("has no dtype, shape and data_offsets")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in meta:
            return bad(f"has no {key}")
    code, shape, offsets = meta["dtype"], meta["shape"], meta["data_offsets"]
    dtype = SAFETENSORS_DTYPES.get(code) if isinstance(code, str) else None
    if dtype is None:
        return CheckpointError(
            f"{path.name}: tensor {name} has unsupported dtype {code!r}",
            f"qwen35-lite reads {', '.join(SAFETENSORS_DTYPES)}",
        )
    if not _is_counts(shape):
        return bad(f"has a malformed shape {shape!r}")
    if not (_is_counts(offsets) and len(offsets) == 2):
        return bad(f"has malformed data_offsets {offsets!r}")
    begin, end = offsets
    if end < begin:
        return bad(f"has reversed data_offsets {offsets}")
    return bad(
        f"of shape {shape} in {code} needs {math.prod(shape) * dtype.itemsize} bytes, not {end - begin}"
    )


def _is_counts(value: object) -> bool:
    """A JSON list of whole numbers >= 0 (not booleans, which isinstance(int) would let through); loops in
    C, since a 397B checkpoint has ~100k tensors to check at every load."""
    return type(value) is list and set(map(type, value)) <= {int} and min(value, default=0) >= 0


def _check_metadata(path: Path, metadata: object) -> None:
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise CheckpointError(
            f"{path.name} has a corrupt header (__metadata__ must map strings to strings)",
            "re-download this shard",
        )


def _shard_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({_shard_path(model_dir, name, index.name) for name in _weight_map(index).values()})
        missing = [f.name for f in files if not os.path.lexists(f)]
        if missing:
            raise CheckpointError(
                f"{len(missing)} shard(s) listed in {index.name} are missing, first {missing[0]}",
                "the download is incomplete: run the same command online to resume it",
            )
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {model_dir}", "is this a Hugging Face checkpoint?")
    return files


def _weight_map(index: Path) -> dict[str, str]:
    """The index's tensor -> shard map, refused unless it is a JSON object of strings to strings."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (ValueError, RecursionError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index.name} is corrupt", "re-download the checkpoint") from e
    if not (isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())):
        raise CheckpointError(
            f"{index.name} is corrupt (weight_map must map tensor names to shard files)",
            "re-download the checkpoint",
        )
    return weight_map


def _shard_path(model_dir: Path, name: str, index_name: str) -> Path:
    """A shard named by the index: a bare `*.safetensors` file name, so no entry reaches outside the
    checkpoint directory (`../../etc/passwd`, `/abs/path`) before anything is opened."""
    if name != PurePosixPath(name).name or name in ("", ".", "..") or "\\" in name or "\0" in name:
        raise CheckpointError(
            f"{index_name} names a shard outside the checkpoint directory: {name!r}",
            "the index is corrupt or tampered with: re-download the checkpoint",
        )
    if not name.endswith(".safetensors"):
        raise CheckpointError(
            f"{index_name} names a shard that is not a .safetensors file: {name!r}",
            "re-download the checkpoint",
        )
    return model_dir / name


class Checkpoint:
    """Lazy view over the shards of one checkpoint directory."""

    def __init__(self, model_dir: Path | str) -> None:
        self.dir = Path(model_dir)
        self.tensors: dict[str, TensorInfo] = {}
        for path in _shard_files(self.dir):
            for info in _scan_file(path):
                name = canonical_name(info.name)
                if name in self.tensors:
                    raise CheckpointError(
                        f"tensor {info.name} is stored twice, in {self.tensors[name].file.name} and {path.name}",
                        "re-download the checkpoint",
                    )
                self.tensors[name] = info
        self._handles: dict[Path, object] = {}
        self._quant_config: dict | None | bool = False  # config.json's, read on first need

    @property
    def quant_config(self) -> dict | None:
        """config.json's quantization_config (None without one or without a config.json beside the shards)."""
        if self._quant_config is False:
            try:
                raw = json.loads((self.dir / "config.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                raw = {}
            self._quant_config = quantization_config(raw) if isinstance(raw, dict) else None
        return self._quant_config

    def resident(self, name: str) -> TensorInfo | PackedLinear:
        """A resident tensor as stored: dense, or a Linear's pack-quantized parts (weights/resident.py);
        refused when missing or stored in a format not read."""
        if name in self.tensors:
            return self.tensors[name]
        module = name.removesuffix(".weight")
        if module != name:
            packed = resolve_packed(self.tensors, self.quant_config, module)
            if packed is not None:
                return packed
            other_format(self.tensors, self.quant_config, module)
        return self.info(name)

    def stored_nbytes(self, name: str) -> int:
        """Bytes a resident tensor takes on disk (a packed Linear: all its parts)."""
        return self.resident(name).nbytes

    def is_packed(self, name: str) -> bool:
        return isinstance(self.resident(name), PackedLinear)

    def resident_format(self, name: str) -> str:
        """How a resident tensor is stored: its dtype (`bfloat16`) or its packed scheme (`int4 g32 symmetric`)."""
        r = self.resident(name)
        return r.format if isinstance(r, PackedLinear) else str(r.dtype).removeprefix("torch.")

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError as e:
            raise CheckpointError(
                f"tensor {name} is missing from {self.dir}", "the checkpoint is incomplete"
            ) from e

    def check_resident(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Refuse resident tensors that config.json does not describe: each must be present, floating-point
        (FP8 included: it is dequantised on read), or a Linear stored pack-quantized (W4A16 / W8A16, dequantised on
        read), and of the shape the config implies (`shapes`, from
        plan_sizes.tensor_shapes). Routed experts and their quantised forms are not resident: not checked."""
        for name, shape in shapes.items():
            info = self.resident(name)
            if isinstance(info, PackedLinear):
                info.check_shape(tuple(shape))
                continue
            if len(shape) == 2 and name != "embed_tokens.weight":  # a Linear a config group may select
                covered_scheme(
                    self.quant_config, info.name.removesuffix(".weight"), name.removesuffix(".weight")
                )
            if not info.dtype.is_floating_point:
                raise CheckpointError(
                    f"tensor {info.name} is stored as {str(info.dtype).removeprefix('torch.')}, not a float type",
                    "norms, projections and embeddings must be F32, F16, BF16 or FP8: re-download the checkpoint",
                )
            if info.shape != tuple(shape):
                raise CheckpointError(
                    f"tensor {info.name} has shape {list(info.shape)} but config.json implies {list(shape)}",
                    "config.json does not describe these weights: use the config.json of the same checkpoint",
                )

    def names(self, prefix: str = "") -> list[str]:
        return [n for n in self.tensors if n.startswith(prefix)]

    def nbytes(self, prefix: str = "") -> int:
        return sum(i.nbytes for n, i in self.tensors.items() if n.startswith(prefix))

    def read(
        self, name: str, dtype: torch.dtype | None = None, packed: bool = False
    ) -> torch.Tensor | PackedWeight:
        """Read one tensor into a fresh CPU tensor (a copy, so the shard can be unmapped); a Linear stored
        pack-quantized dequantised to `dtype`, or with `packed` as stored (a kernels.PackedWeight)."""
        info = self.resident(name)
        if isinstance(info, PackedLinear):
            out_f, words = info.parts["weight_packed"].shape
            in_f = self._packed_in_features(info, words)
            if packed:
                return info.load(read_range, (out_f, in_f))
            return info.read(read_range, (out_f, in_f), dtype)
        t = read_range(info)
        if info.dtype in FP8_DTYPES:
            t = self._dequantize_fp8(name, t)
        return t if dtype is None else t.to(dtype)

    @staticmethod
    def _packed_in_features(p: PackedLinear, words: int) -> int:
        """A packed Linear's in_features: its weight_shape when stored, else every packed value."""
        shape_info = p.parts.get("weight_shape")
        if shape_info is not None and shape_info.shape == (2,):
            return int(read_range(shape_info)[1])
        return words * (32 // p.scheme.bits)

    def _dequantize_fp8(self, name: str, w: torch.Tensor) -> torch.Tensor:
        scale_name = name + "_scale_inv"
        if scale_name not in self.tensors:
            return w.float()
        return dequantize_fp8(w, read_range(self.info(scale_name)))


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


# An unfinished `quantize` output holds this manifest until its last shard is in place (quantize.py).
PARTIAL_MARKER = ".qwen35-quantize-partial.json"


def check_not_partial(model_dir: Path) -> None:
    """Refuse a directory that an unfinished `quantize` left behind."""
    try:
        marker = json.loads((Path(model_dir) / PARTIAL_MARKER).read_text())
    except FileNotFoundError:
        return
    except ValueError:  # unreadable (not JSON, not UTF-8): still an unfinished output
        marker = {}
    done, total = len(marker.get("done", [])), len(marker.get("shards", []))
    raise CheckpointError(
        f"{model_dir} is an unfinished quantize output ({done} of {total} shards written)",
        f"rerun the same `qwen35-lite quantize {marker.get('source', 'SRC')} {model_dir}` command to finish it",
    )
