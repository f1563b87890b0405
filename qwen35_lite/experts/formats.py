"""Expert formats: the one place that knows how a routed expert is encoded.

A format knows an expert's tensors on disk (`locate`: the byte ranges, in a fixed order), the layout of
those raw bytes in a buffer (`raw`), what a cache slot holds (`slot_nbytes`; the raw bytes themselves when
`direct`, else what `prepare` makes of them when the expert enters a cache), and how to compute the
expert's SwiGLU FFN from a slot (`bind(slot)` -> a callable `x -> y`). Slots, tiers, prefetch and the GPU
copy only move opaque slot bytes.

Formats:
- `DenseFormat`: bf16/fp16/fp32 weights; slots in the compute dtype (converted on entry when the stored
  dtype differs).
- `Fp8BlockFormat`: the official FP8 release (float8_e4m3fn weights + fp32 `weight_scale_inv` per 128x128
  block); slots hold the FP8 bytes and scales, dequantised on the compute device when the expert runs.
- `Int4Format`: compressed-tensors `pack-quantized` W4A16 (int32-packed nibbles + per-group scales, zero
  points when asymmetric). Exact mode keeps the packed bytes and dequantises as transformers does; on the
  CPU in bf16 the slot holds torch's int4 kernel layout (repacked on entry) and runs `_weight_int4pack_mm`.

Legend: D = hidden, I = expert FFN width, G = groups along the input dim.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..checkpoint import FP8_BLOCK, Checkpoint, TensorInfo, dequantize_fp8
from ..errors import CheckpointError, ConfigError
from ..experts import int4, int4_cpu
from .stacks import StackedExperts, StackedFp8, StackedInt4, stack_parts

ALIGN = 64  # part offsets inside a buffer: every dtype view stays aligned
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
        return ffn(x, self.gate_up, self.down)


# ---- buffer layouts ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    """One tensor at a byte offset of a flat uint8 buffer."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def view(self, buf: torch.Tensor) -> torch.Tensor:
        return buf[self.offset : self.offset + self.nbytes].view(self.dtype).view(self.shape)


def pack_layout(specs: Sequence[tuple[torch.dtype, tuple[int, ...]]]) -> tuple[list[Part], int]:
    """Parts back to back while the dtype stays the same (so gate and up form one [2I, D] view), aligned
    where it changes. Returns (parts, total bytes)."""
    parts, pos, dtype = [], 0, specs[0][0]
    for dt, shape in specs:
        if dt != dtype:
            pos = -(-pos // ALIGN) * ALIGN
            dtype = dt
        parts.append(Part(dt, tuple(shape), pos))
        pos += parts[-1].nbytes
    return parts, pos


# ---- the formats ---------------------------------------------------------------------------------


class ExpertFormat:
    """Base: subclasses set `name`, `raw` (layout of the disk tensors in `locate` order), `slot_nbytes`,
    `direct`, and implement `locate`, `dense`, `bind` (and `prepare` when not direct)."""

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

    def describe(self) -> str:
        return self.name

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
        """Every slot of a layer's buffer as one StackedExperts, for formats whose slots hold dense weights;
        None otherwise (their experts run one by one through `bind`)."""
        return None

    def gather_nbytes(self, top_k: int) -> int:
        """What a decode step's stacked experts hold at once (StackedExperts: the top-k gate_up
        matrices gathered; formats dequantised per use also their raw bytes and fp32 intermediates)."""
        return 0

    def raw_views(self, buf: torch.Tensor) -> list[torch.Tensor]:
        return [p.view(buf) for p in self.raw]

    def check(self, key: tuple[int, int], infos: list[TensorInfo]) -> None:
        """Every expert must have the tensors this format expects, with its shapes and dtypes."""
        got = [(i.dtype, tuple(i.shape)) for i in infos]
        want = [(p.dtype, p.shape) for p in self.raw]
        if got != want:
            raise CheckpointError(
                f"expert {key[1]} of layer {key[0]} has tensors {got}, expected {want}",
                "the checkpoint is inconsistent: re-download it",
            )


def _per_expert(ckpt: Checkpoint, layer: int, e: int, suffixes: Sequence[str]) -> list[TensorInfo]:
    """layers.L.mlp.experts.E.{gate,up,down}_proj.<suffix>, suffix-major: all weights, then all scales."""
    p = f"layers.{layer}.mlp.experts.{e}."
    return [ckpt.info(f"{p}{k}_proj.{s}") for s in suffixes for k in PROJ]


def _slice(info: TensorInfo, e: int) -> TensorInfo:
    """Expert e's slice of a fused [E, ...] tensor: contiguous because e is the leading dim."""
    per = info.nbytes // info.shape[0]
    start = info.start + e * per
    return TensorInfo(f"{info.name}[{e}]", info.file, info.dtype, info.shape[1:], start, start + per)


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
        self.name = str(stored).removeprefix("torch.") + ("" if self.direct else f" -> {_name(dtype)}")

    def locate(self, ckpt: Checkpoint, layer: int, e: int) -> list[TensorInfo]:
        p = f"layers.{layer}.mlp.experts."
        if self.fused:
            return [_slice(ckpt.info(p + "gate_up_proj"), e), _slice(ckpt.info(p + "down_proj"), e)]
        return _per_expert(ckpt, layer, e, ["weight"])

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
        return top_k * 2 * self.I * self.D * self.dtype.itemsize


def _dequantised_gather(fmt: ExpertFormat, top_k: int) -> int:
    """Raw bytes of top-k experts, gate and up in fp32 and concatenated, and the cast to the compute dtype."""
    return top_k * (fmt.raw_nbytes + 2 * fmt.I * fmt.D * (8 + fmt.dtype.itemsize))


class Fp8BlockFormat(ExpertFormat):
    """float8_e4m3fn weights + fp32 weight_scale_inv [ceil(out/128), ceil(in/128)], per expert.

    On CUDA (`dequantise_on_use`) slots hold the raw FP8 bytes and scales (half the bytes of bf16 in RAM,
    on the bus and on the GPU) and the GPU dequantises an expert when it runs. On the CPU a per-use
    dequantisation would cost more than the matmul many times over, so the expert is dequantised once,
    when it enters the cache, into a compute-dtype slot (the disk still reads half the bytes of bf16).
    Either way W = w.float() * scale_inv per block, then the compute dtype (checkpoint.dequantize_fp8)."""

    def __init__(
        self, hidden: int, inter: int, dtype: torch.dtype, stored: torch.dtype, dequantise_on_use: bool
    ) -> None:
        super().__init__(hidden, inter, dtype)
        D, I, b = hidden, inter, FP8_BLOCK
        w = [(stored, (I, D)), (stored, (I, D)), (stored, (D, I))]
        s = [(torch.float32, (math.ceil(o / b), math.ceil(i / b))) for o, i in ((I, D), (I, D), (D, I))]
        self.raw, self.raw_nbytes = pack_layout(w + s)
        self.direct = dequantise_on_use
        if dequantise_on_use:
            self.slot_nbytes = self.raw_nbytes
        else:
            self.slot, self.slot_nbytes = pack_layout([(dtype, (2 * I, D)), (dtype, (D, I))])
        self.name = f"fp8 block-{b}" + (
            "" if dequantise_on_use else f" (dequantised into the cache: {_name(dtype)})"
        )

    def locate(self, ckpt: Checkpoint, layer: int, e: int) -> list[TensorInfo]:
        return _per_expert(ckpt, layer, e, ["weight", "weight_scale_inv"])

    def dense(self, raw: list[torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up, down = (dequantize_block(w, s).to(dtype) for w, s in zip(raw[:3], raw[3:]))
        return torch.cat([gate, up], dim=0), down

    def prepare(self, raw: list[torch.Tensor], slot: torch.Tensor) -> None:
        gate_up, down = (p.view(slot) for p in self.slot)
        gate_up[: self.I].copy_(dequantize_block(raw[0], raw[3]))
        gate_up[self.I :].copy_(dequantize_block(raw[1], raw[4]))
        down.copy_(dequantize_block(raw[2], raw[5]))

    def bind(self, slot: torch.Tensor) -> Expert:
        if not self.direct:
            return DenseExpert(*(p.view(slot) for p in self.slot))
        raw = self.raw_views(slot)
        return lambda x: ffn(x, *self.dense(raw, x.dtype))

    def stack(self, buffer: torch.Tensor, n_slots: int, stride: int) -> StackedExperts | None:
        if self.direct:  # the FP8 bytes and scales: gathered, then dequantised together
            return StackedFp8(stack_parts(self.raw, buffer, n_slots, stride), FP8_BLOCK)
        return StackedExperts(*stack_parts(self.slot, buffer, n_slots, stride))

    def gather_nbytes(self, top_k: int) -> int:
        if self.direct:
            return _dequantised_gather(self, top_k)
        return top_k * 2 * self.I * self.D * self.dtype.itemsize


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def e4m3_to_float(w: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn -> float32, exactly (NaN aside), by moving the bits: torch's own conversion runs
    ~3x slower on the CPU. The sign and the 7 exponent/mantissa bits go to a bf16's top and bottom bits,
    which read as the value scaled by 2^-120 (subnormals included), and the scale is exact to undo."""
    u = w.view(torch.uint8).to(torch.int16)
    bits = ((u & 0x7F) << 4) | ((u & 0x80) << 8)  # s | 0eeeemmm << 4 as bf16: value * 2^-120
    out = bits.view(torch.bfloat16).float().mul_(2.0**120)
    if out.abs().amax() > 448:  # e4m3fn's NaN code S.1111.111 reads as 480 here; every finite value <= 448
        out.masked_fill_((u & 0x7F) == 0x7F, float("nan"))
    return out


def dequantize_block(w: torch.Tensor, scale_inv: torch.Tensor, block: int = FP8_BLOCK) -> torch.Tensor:
    """checkpoint.dequantize_fp8 (w.float() * scale_inv per block, fp32), the same bits, faster: no
    repeated scale matrix when the blocks tile exactly, and the bit-level e4m3 conversion."""
    o, i = w.shape
    if o % block or i % block or w.dtype != torch.float8_e4m3fn:
        return dequantize_fp8(w, scale_inv, block)
    # the bit-level conversion pays on the CPU; on a GPU torch's own is fast and needs no NaN check (a sync)
    wf = e4m3_to_float(w) if w.device.type == "cpu" else w.float()
    blocks = wf.view(o // block, block, i // block, block)  # [O/b, b, I/b, b]
    return blocks.mul_(scale_inv.float()[:, None, :, None]).view(o, i)


class Int4Format(ExpertFormat):
    """compressed-tensors pack-quantized W4A16, per expert: weight_packed int32 [out, in/8], weight_scale
    [out, in/g], and weight_zero_point int32 [out/8, in/g] when asymmetric.

    `kernel=False` (exact): slots hold the packed bytes; the expert is dequantised as compressed-tensors
    does (W = q * scale in the scale's dtype, then cast) and runs densely: what transformers computes.
    `kernel=True` (CPU, bf16): on entry into a cache the expert is repacked into the layout of torch's
    `_weight_int4pack_mm_for_cpu` (gate and up as one [2I, D] matrix) with its (scale, zero) table."""

    def __init__(
        self,
        hidden: int,
        inter: int,
        dtype: torch.dtype,
        scheme: int4.QuantScheme,
        scale_dtype: torch.dtype,
        kernel: bool,
    ) -> None:
        super().__init__(hidden, inter, dtype)
        D, I = hidden, inter
        self.scheme, self.kernel = scheme, kernel
        self.mats = ((I, D), (I, D), (D, I))  # (out, in) of gate, up, down
        specs = [(torch.int32, (o, i // 8)) for o, i in self.mats]
        specs += [(scale_dtype, (o, self.groups(i))) for o, i in self.mats]
        if not scheme.symmetric:
            specs += [(torch.int32, (math.ceil(o / 8), self.groups(i))) for o, i in self.mats]
        self.raw, self.raw_nbytes = pack_layout(specs)
        self.direct = not kernel
        if kernel:  # gate_up and down in the kernel's uint8 layout, then their [G, N, 2] tables
            self.slot, self.slot_nbytes = pack_layout(
                [
                    (torch.uint8, (2 * I, D // 2)),
                    (torch.uint8, (D, I // 2)),
                    (dtype, (self.groups(D), 2 * I, 2)),
                    (dtype, (self.groups(I), D, 2)),
                ]
            )
        else:
            self.slot_nbytes = self.raw_nbytes
        size = f"g{scheme.group_size}" if scheme.group_size else "per-channel"
        kind = "symmetric" if scheme.symmetric else "asymmetric"
        self.name = f"int4 {size} {kind}" + (" (CPU int4 kernel)" if kernel else "")

    def groups(self, in_features: int) -> int:
        g = self.scheme.group_size
        return in_features // g if g else 1

    def locate(self, ckpt: Checkpoint, layer: int, e: int) -> list[TensorInfo]:
        suffixes = ["weight_packed", "weight_scale"] + (
            [] if self.scheme.symmetric else ["weight_zero_point"]
        )
        return _per_expert(ckpt, layer, e, suffixes)

    def _matrices(self, raw: list[torch.Tensor]):
        """(packed, scale, zero_point | None, (out, in)) for gate, up, down."""
        zps = raw[6:9] if not self.scheme.symmetric else [None] * 3
        return zip(raw[0:3], raw[3:6], zps, self.mats)

    def dense(self, raw: list[torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up, down = (
            int4.dequantize_int4(p, s, z, self.scheme.group_size or shape[1], dtype, shape)
            for p, s, z, shape in self._matrices(raw)
        )
        return torch.cat([gate, up], dim=0), down

    def prepare(self, raw: list[torch.Tensor], slot: torch.Tensor) -> None:
        gu_w, down_w, gu_sz, down_sz = (p.view(slot) for p in self.slot)
        (gp, gs, gz, (i_out, _)), (up_, us, uz, _), (dp, ds, dz, (d_out, _)) = self._matrices(raw)
        # gate and up share the input dim: one [2I, D] matrix, rows of gate then up
        gu_w.copy_(int4_cpu.to_kernel_layout(torch.cat([gp, up_], dim=0)))
        down_w.copy_(int4_cpu.to_kernel_layout(dp))
        gu_zp = None if gz is None else torch.cat([int4.unpack_zero_point(z, i_out) for z in (gz, uz)])
        gu_sz.copy_(int4_cpu.scales_zeros(torch.cat([gs, us]), gu_zp, self.dtype))
        down_zp = None if dz is None else int4.unpack_zero_point(dz, d_out)
        down_sz.copy_(int4_cpu.scales_zeros(ds, down_zp, self.dtype))

    def bind(self, slot: torch.Tensor) -> Expert:
        if not self.kernel:
            raw = self.raw_views(slot)
            return lambda x: ffn(x, *self.dense(raw, x.dtype))
        gu_w, down_w, gu_sz, down_sz = (p.view(slot) for p in self.slot)
        g_gu, g_down = self.D // gu_sz.shape[0], self.I // down_sz.shape[0]
        mm = torch.ops.aten._weight_int4pack_mm_for_cpu

        def run(x: torch.Tensor) -> torch.Tensor:
            g, u = mm(x.contiguous(), gu_w, g_gu, gu_sz).chunk(2, dim=-1)  # [T, I] each
            return mm((F.silu(g) * u).contiguous(), down_w, g_down, down_sz)

        return run

    def stack(self, buffer: torch.Tensor, n_slots: int, stride: int) -> StackedExperts | None:
        # the CPU int4 kernel takes one matrix at a time: its experts run one by one
        return None if self.kernel else StackedInt4(self, stack_parts(self.raw, buffer, n_slots, stride))

    def gather_nbytes(self, top_k: int) -> int:
        return 0 if self.kernel else _dequantised_gather(self, top_k)


# ---- choosing the format -------------------------------------------------------------------------


def expert_format(
    raw_config: dict,
    hidden: int,
    inter: int,
    device: torch.device | str,
    dtype: torch.dtype | None,
    ckpt: Checkpoint | None = None,
    stored: torch.dtype | None = None,
) -> ExpertFormat:
    """The format of this checkpoint's routed experts for compute `dtype` on `device`: from the tensors
    when there is a checkpoint, else from config.json's `quantization_config` (and `stored`, the dtype of a
    plain checkpoint). dtype None: as stored (dense), float32 for the quantised formats.

    An unsupported quantization_config is refused here, whatever the tensors (ConfigError)."""
    qc = _quantization_config(raw_config)
    quant = int4.parse_quantization_config(qc)
    device = torch.device(device)
    if ckpt is None:
        if quant is None:
            return DenseFormat(hidden, inter, dtype or stored or torch.bfloat16, stored or dtype, fused=False)
        if isinstance(quant, int4.Fp8Block):
            return Fp8BlockFormat(
                hidden, inter, dtype or torch.float32, torch.float8_e4m3fn, device.type != "cpu"
            )
        return _int4(qc, hidden, inter, device, dtype or torch.float32, None)
    probe = "layers.0.mlp.experts.0.gate_proj."
    if probe + "weight_packed" in ckpt:
        return _int4(qc, hidden, inter, device, dtype or torch.float32, ckpt)
    fused = "layers.0.mlp.experts.gate_up_proj" in ckpt
    if not fused and probe + "weight" not in ckpt:
        raise CheckpointError(
            "no routed expert tensors for layer 0 (neither fused nor per-expert)",
            "the checkpoint is incomplete or not a Qwen3.5-MoE checkpoint",
        )
    first = ckpt.info("layers.0.mlp.experts.gate_up_proj" if fused else probe + "weight")
    if first.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        if fused or probe + "weight_scale_inv" not in ckpt:
            raise CheckpointError(
                "FP8 experts without per-expert block scales (weight_scale_inv)",
                "qwen35-lite reads the official block-128 FP8 layout; quantize from the bf16 release",
            )
        return Fp8BlockFormat(hidden, inter, dtype or torch.float32, first.dtype, device.type != "cpu")
    return DenseFormat(hidden, inter, dtype or first.dtype, first.dtype, fused)


def _quantization_config(raw_config: dict) -> dict | None:
    qc = raw_config.get("quantization_config")
    if qc is None and isinstance(raw_config.get("text_config"), dict):
        qc = raw_config["text_config"].get("quantization_config")
    if qc is not None and not isinstance(qc, dict):
        raise ConfigError("config.json: quantization_config is not an object", "re-download the checkpoint")
    return qc


def _int4(
    qc: dict | None,
    hidden: int,
    inter: int,
    device: torch.device,
    dtype: torch.dtype,
    ckpt: Checkpoint | None,
) -> Int4Format:
    q = int4.parse_quantization_config(qc)
    if not isinstance(q, int4.Int4Quantization):
        raise ConfigError(
            "the experts are int4-packed (weight_packed) but config.json has no compressed-tensors"
            " quantization_config",
            "re-download config.json of this checkpoint",
        )
    scheme, g = q.scheme, q.scheme.group_size
    for name, size in (("hidden_size", hidden), ("moe_intermediate_size", inter)):
        if size % 8 or (g and size % g):
            raise ConfigError(
                f"{name} {size} is not a multiple of 8 and of the int4 group size {g}",
                "this quantised checkpoint does not fit its config.json",
            )
    if ckpt is not None:
        scale_dtype = ckpt.info("layers.0.mlp.experts.0.gate_proj.weight_scale").dtype
    else:  # compressed-tensors stores the scales in the original weights' dtype
        scale_dtype = scheme.scale_dtype or torch.bfloat16
    kernel = (
        device.type == "cpu"
        and dtype == torch.bfloat16
        and g is not None
        and int4_cpu.kernel_fits(hidden, inter, g)
    )
    return Int4Format(hidden, inter, dtype, scheme, scale_dtype, kernel)
