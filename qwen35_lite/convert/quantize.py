"""`qwen35-lite quantize`: a bf16 or FP8 checkpoint -> a compressed-tensors W4A16 or W8A16 (pack-quantized) one.

What is quantised, to which scheme, and the `quantization_config` saying so are recipe.py's (`Recipe`:
the routed experts, or with `--scope all` every Linear layer of the community recipe); the quantiser and
packing are the formats' (experts/formats/compressed.py, registry.py). Everything else is copied byte for
byte, except that an FP8 source's block-scaled weights are dequantised to bf16 so the output is a pure
compressed-tensors checkpoint. Fused expert tensors are written per expert, the layout compressed-tensors
uses (`...experts.{e}.{gate,up,down}_proj.weight_packed` etc.).

Memory stays small whatever the model size: every output shard's header is planned from the source headers
alone, then the shard is streamed to disk one tensor (one expert matrix, or a block of rows) at a time.
Resumable: OUT holds a manifest (`PARTIAL_MARKER`) while the run is unfinished; each shard is written under
a temporary name and renamed when complete, so a rerun of the same command keeps the finished shards (name
and size checked against the manifest) and continues. The marker goes last, once the index, config and
tokenizer files are in place: `checkpoint.check_not_partial` refuses a directory that still has it.

Longer than ~450 lines on purpose: one streaming job (plan every shard from the headers, quantise, write,
resume, refuse what cannot be resumed) whose steps share the manifest; the numbers are the formats' own
(experts/formats/, weights/fp8.py).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path

import torch

from ..errors import CheckpointError, ConfigError, InputError
from ..experts.formats.compressed import CompressedQuantization, QuantScheme
from ..experts.formats.registry import PACKED, packed_format, parse_quantization_config
from ..runtime.user_files import size_text
from ..weights.checkpoint import PARTIAL_MARKER, SAFETENSORS_DTYPES, Checkpoint, TensorInfo, read_range
from ..weights.fp8 import FP8_BLOCK, FP8_DTYPES, dequantize_fp8
from ..weights.packed import describe
from .recipe import (
    EXPERTS,
    Recipe,
    as_recipe,
    describe_layers,
    per_channel_unless_divided,
    quantization_config,
    recipe_config,
)

MANIFEST_VERSION = 1
DEFAULT_SHARD_BYTES = 4 << 30
GROUP_SIZES = (32, 64, 128)
COPY_CHUNK = 64 << 20
QUANT_BLOCK = 64 << 20  # fp32 bytes of the rows a large matrix is quantised in at a time
DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
# Routed experts of the decoder (the MTP head's experts stay as they are): per-expert or fused.
EXPERT_NAME = re.compile(
    r"^(?!mtp\.)(?P<prefix>.*\.mlp\.experts\.)"
    r"(?:(?P<e>\d+)\.(?P<proj>gate|up|down)_proj\.weight|(?P<fused>gate_up_proj|down_proj))$"
)
NOT_COPIED = {"config.json", "model.safetensors.index.json", PARTIAL_MARKER}


@dataclass(frozen=True)
class QuantizeProgress:
    done_bytes: int  # output bytes written (finished shards found on disk count as written)
    total_bytes: int
    shards_done: int
    shards_total: int


@dataclass(frozen=True)
class QuantizeResult:
    out: Path
    shards: int
    total_bytes: int
    resumed_shards: int  # finished shards kept from an interrupted run
    layers: tuple[
        tuple[str, str], ...
    ] = ()  # (the layers, their scheme), e.g. ("routed experts", "int4 g32 symmetric")


@dataclass(frozen=True)
class Job:
    """One source matrix (or one expert's slice of a fused tensor) and what becomes of it.

    kind: "copy" (bytes as they are), "fp8" (block-dequantised to bf16), "packed" (quantised: 3 or 4 tensors).
    """

    kind: str
    name: (
        str  # the output name: the tensor's, or for a quantised matrix the module's (`...experts.3.up_proj`)
    )
    source: TensorInfo
    scale_inv: TensorInfo | None = None  # FP8 sources: the block scales of `source`
    outputs: tuple[tuple[str, torch.dtype, tuple[int, ...]], ...] = field(default_factory=tuple)
    scheme: QuantScheme | None = None  # "packed": its scheme
    layer: tuple[str, str] = ("", "")  # "packed": (family, projection), e.g. ("self_attn", "q_proj")

    @property
    def nbytes(self) -> int:
        return sum(math.prod(shape) * dtype.itemsize for _, dtype, shape in self.outputs)


@dataclass(frozen=True)
class Shard:
    file: str
    jobs: tuple[Job, ...]

    @cached_property
    def header(self) -> bytes:
        """The safetensors header, 8-byte aligned; data follows in job order."""
        meta: dict[str, dict] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for job in self.jobs:
            for name, dtype, shape in job.outputs:
                n = math.prod(shape) * dtype.itemsize
                meta[name] = {
                    "dtype": DTYPE_NAMES[dtype],
                    "shape": list(shape),
                    "data_offsets": [offset, offset + n],
                }
                offset += n
        raw = json.dumps(meta, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        return len(raw).to_bytes(8, "little") + raw

    @property
    def nbytes(self) -> int:
        return len(self.header) + sum(job.nbytes for job in self.jobs)


# ---- planning (headers only) -------------------------------------------------------------------------


def _slice(info: TensorInfo, e: int, rows: slice | None = None) -> TensorInfo:
    """Expert e of a fused [E, ...] tensor (contiguous: e is the leading dim), optionally a row range of it."""
    per = info.nbytes // info.shape[0]
    sub = replace(info, shape=info.shape[1:], start=info.start + e * per, end=info.start + (e + 1) * per)
    return sub if rows is None else _rows(sub, rows.start, rows.stop)


def _rows(info: TensorInfo, r0: int, r1: int) -> TensorInfo:
    per = info.nbytes // info.shape[0]
    return replace(
        info, shape=(r1 - r0, *info.shape[1:]), start=info.start + r0 * per, end=info.start + r1 * per
    )


def _packed_outputs(module: str, shape: tuple[int, ...], dtype: torch.dtype, scheme: QuantScheme):
    out_f, in_f = shape
    group = scheme.group_size or in_f
    if in_f % group:
        raise InputError(
            f"{module} has {in_f} input features, not a multiple of --group-size {group}",
            _group_hint([in_f]),
        )
    return packed_format(scheme.bits).tensor_specs(module, shape, dtype, scheme)


def expert_input_features(ckpt: Checkpoint) -> list[int]:
    """The input features of every routed expert matrix (the last dim, fused or per expert), sorted."""
    return sorted({info.shape[-1] for info in ckpt.tensors.values() if EXPERT_NAME.match(info.name)})


def fitting_group_sizes(features: list[int]) -> list[int]:
    """The group sizes quantize writes that divide every one of `features`, largest first."""
    return [g for g in sorted(GROUP_SIZES, reverse=True) if all(f % g == 0 for f in features)]


def default_group_size(src: Path) -> int:
    """The largest of 128, 64, 32 that divides every routed expert's input features (headers only)."""
    features = expert_input_features(Checkpoint(Path(src)))
    if not features:
        raise CheckpointError(f"no routed experts in {src}", "quantize takes a Qwen3.5 MoE checkpoint")
    fits = fitting_group_sizes(features)
    if not fits:
        raise InputError(
            f"the experts' input features ({', '.join(map(str, features))}) are not a multiple of"
            f" {', '.join(map(str, GROUP_SIZES))}",
            "quantize writes groups of 32, 64 or 128 weights; this checkpoint's experts cannot be split so",
        )
    return fits[0]


def _group_hint(features: list[int]) -> str:
    fits = fitting_group_sizes(features)
    if not fits:
        return f"no group size quantize writes ({', '.join(map(str, GROUP_SIZES))}) divides {features[0]}"
    return f"use --group-size {' or '.join(map(str, fits))}, or leave it out to pick the largest that fits"


def _check_group_size(ckpt: Checkpoint, scheme: QuantScheme) -> None:
    """An explicit group size that does not divide every expert: one error naming the sizes that do."""
    features = expert_input_features(ckpt)
    bad = [f for f in features if scheme.group_size and f % scheme.group_size]
    if bad:
        raise InputError(
            f"--group-size {scheme.group_size} does not divide the experts' {bad[0]} input features",
            _group_hint(features),
        )


def _expert_jobs(info: TensorInfo, scale_inv: TensorInfo | None, scheme: QuantScheme) -> Iterator[Job]:
    m = EXPERT_NAME.match(info.name)
    # FP8 experts are dequantised to bf16 before quantising: their scales are then bf16, as on a bf16 model
    dtype = torch.bfloat16 if info.dtype in FP8_DTYPES else info.dtype
    if m["e"] is not None:
        module = f"{m['prefix']}{m['e']}.{m['proj']}_proj"
        yield _packed_job(module, info, scale_inv, scheme, dtype, (EXPERTS, f"{m['proj']}_proj"))
        return
    if scale_inv is not None:
        raise CheckpointError(
            f"{info.name}: FP8 fused experts are not supported", "use a bf16 or per-expert source"
        )
    n_experts, rows = info.shape[0], info.shape[1]
    # gate_up_proj [E, 2I, D]: gate rows first, then up; down_proj [E, D, I]
    halves = (
        [("gate", slice(0, rows // 2)), ("up", slice(rows // 2, rows))]
        if m["fused"] == "gate_up_proj"
        else [("down", None)]
    )
    for e in range(n_experts):
        for proj, part in halves:
            sub = _slice(info, e, part)
            module = f"{m['prefix']}{e}.{proj}_proj"
            yield _packed_job(module, sub, None, scheme, dtype, (EXPERTS, f"{proj}_proj"))


def _packed_job(
    module: str,
    info: TensorInfo,
    scale_inv: TensorInfo | None,
    scheme: QuantScheme,
    dtype: torch.dtype,
    layer: tuple[str, str],
) -> Job:
    outputs = _packed_outputs(module, info.shape, dtype, scheme)
    return Job("packed", module, info, scale_inv, outputs, scheme, layer)


def _resident_job(info: TensorInfo, scale_inv: TensorInfo | None, recipe: Recipe) -> Job | None:
    """The job quantising `info` when the recipe quantises that resident Linear (or lm_head), else None."""
    picked = recipe.resident_layer(info.name)
    if picked is None:
        return None
    module, layer, scheme = picked
    if len(info.shape) != 2:
        raise CheckpointError(f"{info.name} has shape {list(info.shape)}, not a Linear layer's [out, in]", "")
    dtype = torch.bfloat16 if info.dtype in FP8_DTYPES else info.dtype
    return _packed_job(
        module, info, scale_inv, per_channel_unless_divided(scheme, info.shape[1]), dtype, layer
    )


def plan_jobs(ckpt: Checkpoint, recipe: Recipe | QuantScheme) -> list[Job]:
    """Every output tensor, in source order (file, offset)."""
    recipe = as_recipe(recipe)
    infos = sorted(ckpt.tensors.values(), key=lambda i: (i.file.name, i.start))
    by_name = {i.name: i for i in infos}
    jobs: list[Job] = []
    for info in infos:
        if info.name.endswith("_scale_inv"):
            continue  # consumed with its weight
        scale_inv = by_name.get(info.name + "_scale_inv") if info.dtype in FP8_DTYPES else None
        if info.dtype in FP8_DTYPES and scale_inv is None:
            raise CheckpointError(
                f"FP8 tensor {info.name} has no weight_scale_inv", "the checkpoint is incomplete"
            )
        if EXPERT_NAME.match(info.name):
            jobs.extend(_expert_jobs(info, scale_inv, recipe.experts))
        elif (job := _resident_job(info, scale_inv, recipe)) is not None:
            jobs.append(job)
        elif scale_inv is not None:
            jobs.append(Job("fp8", info.name, info, scale_inv, ((info.name, torch.bfloat16, info.shape),)))
        else:
            jobs.append(Job("copy", info.name, info, None, ((info.name, info.dtype, info.shape),)))
    if not any(job.layer[0] == EXPERTS for job in jobs):
        raise CheckpointError(f"no routed experts in {ckpt.dir}", "quantize takes a Qwen3.5 MoE checkpoint")
    return jobs


def layer_schemes(jobs: list[Job]) -> dict[tuple[str, str], QuantScheme]:
    """(family, projection) -> the scheme of every quantised layer of that kind, in the order first met.

    Every layer of a kind has the same shape in a Qwen3.5 model, hence one scheme; and vLLM runs each
    fused group (q/k/v, gate/up, in_proj_qkv/z, an MoE's gate/up/down) with one scheme: refused otherwise."""
    kinds: dict[tuple[str, str], QuantScheme] = {}
    for job in jobs:
        if job.kind == "packed" and kinds.setdefault(job.layer, job.scheme) != job.scheme:
            raise CheckpointError(
                f"{job.name} would be {describe(job.scheme)}, other {'.'.join(job.layer)} layers"
                f" {describe(kinds[job.layer])}",
                "pick a --group-size that divides every layer's input features",
            )
    return kinds


def plan_shards(jobs: list[Job], shard_bytes: int) -> list[Shard]:
    """Fill shards in order up to `shard_bytes` (a single larger tensor gets a shard of its own)."""
    groups: list[list[Job]] = [[]]
    size = 0
    for job in jobs:
        if groups[-1] and size + job.nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(job)
        size += job.nbytes
    n = len(groups)
    return [Shard(f"model-{i + 1:05d}-of-{n:05d}.safetensors", tuple(g)) for i, g in enumerate(groups)]


# ---- writing -----------------------------------------------------------------------------------------


def _as_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def _read_rows(job: Job, r0: int, r1: int) -> torch.Tensor:
    """Rows r0:r1 of the job's matrix; FP8 block-dequantised to bf16 (r0 a multiple of the block)."""
    w = read_range(_rows(job.source, r0, r1))
    if job.scale_inv is None:
        return w
    block_scales = read_range(job.scale_inv)[r0 // FP8_BLOCK : -(-r1 // FP8_BLOCK)]
    return dequantize_fp8(w, block_scales, FP8_BLOCK).to(torch.bfloat16)


def _quantized(job: Job, mse_clip: bool) -> list[torch.Tensor]:
    """The job's output tensors. Every row quantises on its own, so a large matrix (lm_head) goes a block
    of rows at a time (a multiple of 128: whole FP8 blocks and whole packed zero-point words) and the
    packed blocks are joined: the same bytes as the whole matrix at once, in a fraction of the memory."""
    fmt = packed_format(job.scheme.bits)
    rows, cols = job.source.shape
    step = FP8_BLOCK * max(1, QUANT_BLOCK // (FP8_BLOCK * cols * 4))
    blocks = [fmt.quantize(_read_rows(job, r0, min(rows, r0 + step)), job.scheme, mse_clip)
              for r0 in range(0, rows, step)]  # fmt: skip
    if len(blocks) == 1:
        return blocks[0]
    # packed, scale, weight_shape (the whole matrix's), zero point when asymmetric
    joined = [torch.cat([b[i] for b in blocks]) for i in range(len(blocks[0]))]
    joined[2] = torch.tensor([rows, cols], dtype=torch.int64)
    return joined


def _copy_bytes(info: TensorInfo, f) -> None:
    with open(info.file, "rb") as src:
        src.seek(info.start)
        left = info.nbytes
        while left:
            chunk = src.read(min(COPY_CHUNK, left))
            if not chunk:
                raise CheckpointError(
                    f"{info.file.name} ended early while reading {info.name}", "re-download it"
                )
            f.write(chunk)
            left -= len(chunk)


def _write_fp8_dequantised(job: Job, f) -> None:
    """Row blocks of 128 at a time, so an FP8 embedding-sized matrix never sits whole in fp32."""
    rows, cols = job.source.shape
    step = FP8_BLOCK * max(1, COPY_CHUNK // (FP8_BLOCK * cols * 4))
    for r0 in range(0, rows, step):
        f.write(_as_bytes(_read_rows(job, r0, min(rows, r0 + step))))


def _write_job(job: Job, mse_clip: bool, f) -> None:
    if job.kind == "copy":
        _copy_bytes(job.source, f)
    elif job.kind == "fp8":
        _write_fp8_dequantised(job, f)
    else:
        for t in _quantized(job, mse_clip):
            f.write(_as_bytes(t))


def _write_shard(shard: Shard, out: Path, mse_clip: bool, on_job: Callable[[int], None]) -> None:
    tmp = out / (shard.file + ".partial")
    try:
        with open(tmp, "wb") as f:
            f.write(shard.header)
            for job in shard.jobs:
                _write_job(job, mse_clip, f)
                on_job(job.nbytes)
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()  # a full disk gets its space back; the finished shards stay
        raise
    if tmp.stat().st_size != shard.nbytes:
        raise CheckpointError(f"{shard.file} came out {tmp.stat().st_size} bytes, planned {shard.nbytes}", "")
    tmp.replace(out / shard.file)


# ---- the manifest, resuming, refusing ------------------------------------------------------------------


def _scheme_dict(scheme: QuantScheme | None) -> dict | None:
    return None if scheme is None else {k: v for k, v in asdict(scheme).items() if k != "scale_dtype"}


def _manifest(src: Path, recipe: Recipe, mse_clip: bool, shard_bytes: int, shards: list[Shard]) -> dict:
    return {
        "version": MANIFEST_VERSION,
        "source": str(src.resolve()),
        "scheme": _scheme_dict(recipe.experts),
        "resident": _scheme_dict(recipe.resident),
        "head": _scheme_dict(recipe.head),
        "mse_clip": mse_clip,
        "shard_bytes": shard_bytes,
        "shards": [{"file": s.file, "bytes": s.nbytes} for s in shards],
    }


def _save_marker(out: Path, manifest: dict, done: list[str]) -> None:
    tmp = out / (PARTIAL_MARKER + ".tmp")
    tmp.write_text(json.dumps({**manifest, "done": done}, indent=1))
    tmp.replace(out / PARTIAL_MARKER)


def _read_marker(out: Path) -> dict | None:
    try:
        return json.loads((out / PARTIAL_MARKER).read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}  # unreadable: treated as another run's


def _finished_shards(out: Path, marker: dict | None, manifest: dict, force: bool) -> list[str]:
    """The shards an earlier identical run finished; refuse a non-empty OUT that is not such a run."""
    if not out.exists():
        return []
    if not out.is_dir():
        raise InputError(f"{out} exists and is not a directory", "pick another output directory")
    resumable = marker is not None and {k: marker.get(k) for k in manifest} == manifest
    if not resumable:
        if any(out.iterdir()) and not force:
            what = "an unfinished quantize with other options" if marker is not None else "not empty"
            raise InputError(f"{out} is {what}", "pick a new directory, or pass --force to overwrite it")
        return []
    sizes = {s["file"]: s["bytes"] for s in manifest["shards"]}
    return [
        f for f in marker.get("done", []) if (out / f).is_file() and (out / f).stat().st_size == sizes.get(f)
    ]


def _clear_stale(out: Path, keep: list[str]) -> None:
    """--force / a resumed run: drop checkpoint files that are not finished shards of this run."""
    for path in out.iterdir():
        stale = path.name.endswith((".safetensors", ".safetensors.partial", ".safetensors.index.json"))
        if path.is_file() and stale and path.name not in keep:
            path.unlink()


# ---- config and metadata -----------------------------------------------------------------------------


def _source_config(src: Path) -> dict:
    try:
        config = json.loads((src / "config.json").read_text())
    except FileNotFoundError as e:
        raise ConfigError(
            f"no config.json in {src}", "SRC must be a Hugging Face checkpoint directory or hub id"
        ) from e
    except json.JSONDecodeError as e:
        raise ConfigError(f"{src / 'config.json'} is not valid JSON", "re-download the checkpoint") from e
    found = parse_quantization_config(config.get("quantization_config"))
    if isinstance(found, CompressedQuantization):
        raise InputError(
            f"{src} is already quantised to int{found.scheme.bits}", "quantize a bf16 or FP8 checkpoint"
        )
    return config


def _write_metadata(src: Path, out: Path, config: dict, qc: dict, shards: list[Shard]) -> None:
    weight_map = {name: s.file for s in shards for job in s.jobs for name, _, _ in job.outputs}
    index = {
        "metadata": {"total_size": sum(j.nbytes for s in shards for j in s.jobs)},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = {**config, "quantization_config": qc}
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    for path in sorted(src.iterdir()):
        # tokenizer, chat template, generation and preprocessor configs
        if (
            path.is_file()
            and path.suffix in (".json", ".jinja", ".txt", ".model")
            and path.name not in NOT_COPIED
        ):
            shutil.copyfile(path, out / path.name)


# ---- the command's work ------------------------------------------------------------------------------


WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def _check_free_space(out: Path, needed: int) -> None:
    """Refuse at once an OUT whose disk cannot hold what is left to write (it may still fill up meanwhile:
    the write errors are reported as one line too)."""
    where = next((p for p in (out.absolute(), *out.absolute().parents) if p.exists()), None)
    try:
        free = shutil.disk_usage(where).free if where is not None else None
    except OSError:
        free = None
    if free is not None and needed > free:
        raise InputError(
            f"{out} needs {size_text(needed)} more, and its disk has {size_text(free)} free",
            "free some space, or pick an OUT on another disk",
        )


def _is_source_error(e: OSError, src: Path, out: Path) -> bool:
    """An error reading SRC (it names a file there) is not OUT's: it keeps its own words."""
    if e.filename is None:
        return False
    path = Path(e.filename).absolute()
    return path.is_relative_to(src.absolute()) and not path.is_relative_to(out.absolute())


def _write_error(e: OSError, out: Path, done: int, shards: int, left: int) -> InputError:
    """A full disk or a place we may not write: one line; what is finished stays, and a rerun resumes."""
    kept = (
        f"the {done} finished shard(s) are kept: the same command resumes"
        if (out / PARTIAL_MARKER).exists()
        else "nothing was written"
    )
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return InputError(
            f"cannot write {out}: {e.strerror} ({done} of {shards} shards written, {size_text(left)} to go)",
            f"free {size_text(left)} on that disk, or pick another OUT; {kept}",
        )
    return InputError(f"cannot write {out}: {e.strerror}", f"pick a directory you can write to; {kept}")


def _check_recipe(recipe: Recipe) -> None:
    widths = " or ".join(f"{b} (W{b}A16)" for b in sorted(PACKED))
    for flag, scheme in (
        ("--bits", recipe.experts),
        ("--resident-bits", recipe.resident),
        ("--head-bits", recipe.head),
    ):
        if scheme is not None and packed_format(scheme.bits) is None:
            raise InputError(f"{flag} {scheme.bits} is not supported", f"quantize writes {widths}")
    if recipe.experts.group_size not in GROUP_SIZES:
        raise InputError(f"--group-size {recipe.experts.group_size} is not supported", "use 32, 64 or 128")
    if recipe.head is not None and recipe.resident is None:
        raise InputError("--head-bits quantises lm_head, a resident layer", "add --scope all")


def quantize_checkpoint(
    src: Path,
    out: Path,
    recipe: Recipe | QuantScheme,
    *,
    force: bool = False,
    mse_clip: bool = False,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    on_progress: Callable[[QuantizeProgress], None] | None = None,
) -> QuantizeResult:
    """Write `src` (a local directory) quantised as `recipe` says (a QuantScheme: the experts only) to
    `out`, resuming an interrupted run.

    mse_clip: per group, the clipped range with the least squared error instead of the plain min/max.
    """
    recipe = as_recipe(recipe)
    _check_recipe(recipe)
    src, out = Path(src), Path(out)
    if out.resolve() == src.resolve():
        raise InputError("OUT is the source directory", "write the quantised checkpoint to a new directory")
    config = _source_config(src)
    ckpt = Checkpoint(src)
    _check_group_size(ckpt, recipe.experts)
    jobs = plan_jobs(ckpt, recipe)
    layers = layer_schemes(jobs)
    qc = quantization_config(recipe.experts) if recipe.scope == "experts" else recipe_config(layers)
    shards = plan_shards(jobs, shard_bytes)
    manifest = _manifest(src, recipe, mse_clip, shard_bytes, shards)
    done = _finished_shards(out, _read_marker(out), manifest, force)
    resumed = len(done)
    total = sum(s.nbytes for s in shards)
    written = sum(s.nbytes for s in shards if s.file in done)
    _check_free_space(out, total - written)
    report = on_progress or (lambda p: None)
    try:
        out.mkdir(parents=True, exist_ok=True)
        _clear_stale(out, done)
        _save_marker(out, manifest, done)
        report(QuantizeProgress(written, total, len(done), len(shards)))
        for shard in shards:
            if shard.file in done:
                continue

            def on_job(n: int) -> None:
                nonlocal written
                written += n
                report(QuantizeProgress(written, total, len(done), len(shards)))

            _write_shard(shard, out, mse_clip, on_job)
            written += len(shard.header)
            done.append(shard.file)
            _save_marker(out, manifest, done)
            report(QuantizeProgress(written, total, len(done), len(shards)))
        _write_metadata(src, out, config, qc, shards)
        (out / PARTIAL_MARKER).unlink()
    except OSError as e:
        if e.errno not in WRITE_ERRNOS or _is_source_error(e, src, out):
            raise
        raise _write_error(e, out, len(done), len(shards), total - written) from None
    return QuantizeResult(out, len(shards), total, resumed, describe_layers(layers))
