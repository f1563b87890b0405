"""Byte arithmetic of the memory plan, from the config alone: tensor shapes, KV per
token, DeltaNet state, activation buffers, the vision tower; and the process overheads measured here.

Pure functions with no I/O beyond optional checkpoint headers, so `info` can size Qwen3.5-397B with no
weights on disk. `plan.MemoryPlan` adds them up against the budgets.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..kernels import compact_nbytes
from ..model.qwen35 import PREFILL_CHUNK, resident_names
from ..model.vision.tower import vision_tensor_shapes
from ..weights.checkpoint import Checkpoint
from ..weights.config import TextConfig, VisionConfig
from ..weights.packed import QuantScheme, describe, quantization_config
from ..weights.resident import PackedLinear, covered_scheme

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
KV_STEP = 256  # cache.KV_GROW_STEP: the KV cache grows in steps of this many positions
DEFAULT_CONTEXT = 32768  # KV reserved when no --ctx is given (capped at the model's maximum)

# Process overheads, measured as RssAnon on torch 2.13 (CPU build), Python 3.12, on this machine class
# (2-core Xeon, glibc malloc), with margin:
# RssAnon of a process that imported torch and every module of a run (cli, engine, session): 156 MiB.
PROCESS_BASE = 160 * MiB
# The 248K-entry tokenizer.json (or the packaged copy) in `tokenizers`: 280 MiB held once parsed, 334 MiB
# over the base at the top of the parse (TOKENIZER_PARSE), which ends before any weight is read (Engine.load
# reads the tokenizer first). What its parse freed stays in the heap and the weights loaded next reuse it:
# Engine.load of `make-checkpoint --size medium` (0.53 GiB of resident weights) held 923 MiB where the base,
# the weights loaded alone (552 MiB), the tokenizer loaded after them (267 MiB) and one expert slot per
# layer (24 MiB) add up to 999 MiB. So the plan counts the tokenizer as 280 MiB less up to
# TOKENIZER_REUSED of the weights (MemoryPlan.build), and never less than the parse's peak in all.
TOKENIZER = 280 * MiB
TOKENIZER_REUSED = 72 * MiB
TOKENIZER_PARSE = 336 * MiB
CUDA_HOST = 1 * GiB  # CUDA runtime, cuBLAS and kernels' host-side state
CUDA_CONTEXT = 1 * GiB  # device memory taken by the CUDA context, cuBLAS workspace, allocator slack
ACTIVATION_MARGIN = 1.25
# serve's kept model states without --state-cache: this share of what the budget leaves after the smallest
# expert cache, at most STATE_CACHE_MAX (the fixed 2 GiB it used to be)
STATE_CACHE_SHARE = 0.25
STATE_CACHE_MAX = 2 * GiB
MAX_BUDGET_GIB = float(1 << 32)  # a --cpu-mem / --gpu-mem past this (4 EiB) is taken as this
FREE_MARGIN = 0.10  # default budgets leave 10% of the memory (at least 1 GiB) to everything else


def tensor_shapes(cfg: TextConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every resident tensor (the names of model.resident_names), from the config alone."""
    D, V = cfg.hidden_size, cfg.vocab_size
    H, Hkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    hk, hv, dk, dv = (
        cfg.linear_num_key_heads,
        cfg.linear_num_value_heads,
        cfg.linear_key_head_dim,
        cfg.linear_value_head_dim,
    )
    conv = 2 * hk * dk + hv * dv
    Is, Iff, E = cfg.shared_expert_intermediate_size, cfg.intermediate_size, cfg.num_experts
    by_key = {
        "input_layernorm.weight": (D,),
        "post_attention_layernorm.weight": (D,),
        "linear_attn.in_proj_qkv.weight": (conv, D),
        "linear_attn.in_proj_z.weight": (hv * dv, D),
        "linear_attn.in_proj_b.weight": (hv, D),
        "linear_attn.in_proj_a.weight": (hv, D),
        "linear_attn.conv1d.weight": (conv, 1, cfg.linear_conv_kernel_dim),
        "linear_attn.dt_bias": (hv,),
        "linear_attn.A_log": (hv,),
        "linear_attn.norm.weight": (dv,),
        "linear_attn.out_proj.weight": (D, hv * dv),
        "self_attn.q_proj.weight": (2 * H * hd, D),
        "self_attn.k_proj.weight": (Hkv * hd, D),
        "self_attn.v_proj.weight": (Hkv * hd, D),
        "self_attn.o_proj.weight": (D, H * hd),
        "self_attn.q_norm.weight": (hd,),
        "self_attn.k_norm.weight": (hd,),
        "mlp.gate.weight": (E, D),
        "mlp.shared_expert.gate_proj.weight": (Is, D),
        "mlp.shared_expert.up_proj.weight": (Is, D),
        "mlp.shared_expert.down_proj.weight": (D, Is),
        "mlp.shared_expert_gate.weight": (1, D),
        "mlp.gate_proj.weight": (Iff, D),
        "mlp.up_proj.weight": (Iff, D),
        "mlp.down_proj.weight": (D, Iff),
    }
    top = {"embed_tokens.weight": (V, D), "lm_head.weight": (V, D), "norm.weight": (D,)}
    out = {}
    for name in resident_names(cfg):
        out[name] = top[name] if name in top else by_key[name.split(".", 2)[2]]
    return out


def kv_bytes_per_token(cfg: TextConfig, dtype: torch.dtype) -> int:
    """K and V of every full-attention layer: 2 · n_full · Hkv · hd · itemsize (30 KiB for 397B bf16)."""
    return 2 * len(cfg.full_attention_layers) * cfg.num_key_value_heads * cfg.head_dim * dtype.itemsize


def deltanet_state_bytes(cfg: TextConfig, dtype: torch.dtype) -> int:
    """Conv window [C, K] in the model dtype + fp32 recurrent state [Hv, dk, dv], per DeltaNet layer."""
    conv = 2 * cfg.linear_num_key_heads * cfg.linear_key_head_dim
    conv += cfg.linear_num_value_heads * cfg.linear_value_head_dim
    per = conv * cfg.linear_conv_kernel_dim * dtype.itemsize
    per += cfg.linear_num_value_heads * cfg.linear_key_head_dim * cfg.linear_value_head_dim * 4
    return per * (cfg.num_hidden_layers - len(cfg.full_attention_layers))


def activation_bytes(
    cfg: TextConfig,
    dtype: torch.dtype,
    tokens: int,
    context: int,
    on_cpu: bool = False,
    experts_by_linear: bool = True,
) -> int:
    """Peak temporaries of one prefill block (or decode step) of `tokens` new tokens at `context`.

    An upper estimate from the ops in model/moe/deltanet/attention: the widest layer's temporaries. A
    block goes through a layer whole (the residual stream and the MoE over all its tokens) but through
    the mixers PREFILL_CHUNK tokens at a time (model.Qwen35Model.prefill).
    SDPA with `enable_gqa` reads the shared K/V heads in place (measured on the CPU: +2 MB peak for a
    decode step at H=32, Hkv=2, S=8192, hd=256, where expanding K/V would take 268 MB); in fp32 on CUDA
    its math backend still expands them, so that case keeps the expansion term.
    On the CPU, what a block's matmuls leave held after they return counts too (cpu_matmul_retained).
    """
    T, D, b = tokens, cfg.hidden_size, dtype.itemsize
    A, I, Is = cfg.num_experts_per_tok, cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size
    common = T * D * (4 * b + 8)  # residual stream, norm input/output, fp32 norm temporaries
    # dispatch_grouped: the [T, A, D] outputs, one expert's rows and FFN temporaries (at most T rows),
    # the shared expert, the router's fp32 probabilities and the sort indices
    moe = T * A * D * b + T * (2 * D + 3 * I) * b + T * 3 * Is * b + T * cfg.num_experts * 8 + T * A * 16
    T = min(T, PREFILL_CHUNK)  # the mixers see one chunk at a time
    hv, dk, dv = cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim
    conv = 2 * cfg.linear_num_key_heads * dk + hv * dv
    chunk = 64
    Tp = -(-T // chunk) * chunk
    deltanet = T * (4 * conv + 2 * hv * dv) * b + 16 * hv * Tp * max(dk, dv) * 4 + 5 * hv * Tp * chunk * 4
    H, Hkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    expands = H > Hkv and dtype == torch.float32
    attn = T * H * hd * 8 * b + (2 * H * context * hd * b if expands else 0)
    attn += H * T * min(context, 1024) * 4  # SDPA score blocks (the fused kernels tile over the context)
    head = T * cfg.vocab_size * 4 if T == 1 else cfg.vocab_size * 4 * 2
    retained = 0
    if on_cpu:  # experts run by a C or torch int4 kernel make no oneDNN primitives
        retained = CPU_RETAINED_BASE + (cpu_matmul_retained(cfg, tokens, context) if experts_by_linear else 0)
    return int(ACTIVATION_MARGIN * (common + max(moe, deltanet, attn, head))) + retained


def cpu_matmul_retained(cfg: TextConfig, tokens: int, context: int) -> int:
    """RssAnon a CPU prefill holds beyond the live tensors summed above: oneDNN's cached primitives, one
    per matmul shape, kept after the matmuls return; the allocator keeps little (heap.py).

    A block's experts see as many shapes as there are distinct row counts among them: about the spread of
    a binomial count, 8 standard deviations of `tokens * A / E`. Each count makes two primitives (gate/up,
    down), twice over where the decode thread tuner runs a prefill's small experts on one thread (a
    primitive is made for a thread count), and a longer prompt's last block brings counts of its own.
    Measured (first bf16 prefill's peak RssAnon over the loaded model, the tensor sum subtracted, torch
    2.13): the cached primitives 34 MiB for 8 layers, E = 128, A = 8, a 1024-token block; 74 MiB for 16
    layers, E = 64, 2201 tokens in blocks of 1024 (0.27-0.32 MiB a primitive, about the same at D = 2048);
    about twice that through the CLI; 13 MiB besides with the primitive cache off (CPU_RETAINED_BASE,
    counted for every CPU run: an int4 run peaked 4% over a plan without it). Before glibc's mmap
    threshold was fixed this was dominated by allocator slack, fitted as T * (D + I) * 384 bytes, which
    then over-reserved bf16 runs by 0.15-0.35 GiB (and ~1.9 GiB on the 397B).
    """
    counts = 1
    if cfg.num_experts:
        p = cfg.num_experts_per_tok / cfg.num_experts
        counts = min(tokens, int(8 * math.sqrt(tokens * p * (1 - p))) + 1)
    blocks = 1 if context <= tokens else 2
    return 2 * 2 * blocks * counts * CPU_PRIMITIVE_BYTES


CPU_PRIMITIVE_BYTES = 5 << 16  # cpu_matmul_retained: a cached bf16 matmul primitive, 0.31 MiB (measured)
CPU_RETAINED_BASE = 16 << 20  # what a CPU prefill keeps besides the primitives (13 MiB measured)


def vision_tower_nbytes(
    vision: VisionConfig | None, dtype: torch.dtype, ckpt: Checkpoint | None = None
) -> int:
    """Weights of the vision tower in the compute dtype: the checkpoint's `visual.*` tensors when there is
    a checkpoint, else counted from vision_config (0 for a text-only model)."""
    if ckpt is not None:
        return sum(math.prod(ckpt.info(n).shape) for n in ckpt.names("visual.")) * dtype.itemsize
    if vision is None:
        return 0
    return sum(math.prod(s) for s in vision_tensor_shapes(vision).values()) * dtype.itemsize


def fmt_gib(n: float) -> str:
    """GiB as the budgets are given; a figure that would round to 0.00 GiB in a smaller unit."""
    return f"{n / GiB:.2f} GiB" if n >= GiB / 100 else fmt_mib(n)


def fmt_mib(n: float) -> str:
    if n >= MiB / 10:
        return f"{n / MiB:.1f} MiB"
    return f"{n / KiB:.1f} KiB" if n >= KiB / 10 else f"{int(n)} B"


def ceil_gib(n: float) -> str:
    return f"{math.ceil(n / GiB * 10) / 10:.1f}"


class Stored(NamedTuple):
    """A resident tensor as the checkpoint stores it: its format (`bfloat16`, `int4 g32 symmetric`), its
    bytes on disk, and for a pack-quantized Linear its scheme and the dtype of its scales."""

    format: str
    disk: int
    scheme: QuantScheme | None = None
    scale_dtype: torch.dtype | None = None


def resident_stored(
    shapes: dict[str, tuple[int, ...]],
    ckpt: Checkpoint | None,
    raw_config: dict | None,
    dtype: torch.dtype,
    stored_dtype: torch.dtype | None = None,
) -> dict[str, Stored]:
    """Every resident tensor as stored: as the checkpoint stores it, or, from the config alone,
    pack-quantized where a compressed-tensors config group selects the Linear (scales in bf16, as
    compressed-tensors writes them from bf16 weights) and `stored_dtype` (else `dtype`) elsewhere."""
    if ckpt is not None:
        return {n: _from_checkpoint(ckpt, n) for n in shapes}
    qc = quantization_config(raw_config or {})
    stored_as = stored_dtype or dtype
    prefix = "model.language_model." if (raw_config or {}).get("text_config") else "model."
    out = {}
    for name, shape in shapes.items():
        module = name.removesuffix(".weight")
        scheme = None
        if len(shape) == 2 and name != "embed_tokens.weight":
            stored = module if module == "lm_head" else prefix + module
            scheme = covered_scheme(qc, stored, module)
        if scheme is None:
            out[name] = Stored(str(stored_as).removeprefix("torch."), math.prod(shape) * stored_as.itemsize)
        else:
            bf16 = torch.bfloat16
            out[name] = Stored(describe(scheme), packed_nbytes(shape, scheme, bf16), scheme, bf16)
    return out


def _from_checkpoint(ckpt: Checkpoint, name: str) -> Stored:
    r = ckpt.resident(name)
    if isinstance(r, PackedLinear):
        return Stored(r.format, r.nbytes, r.scheme, r.parts["weight_scale"].dtype)
    return Stored(str(r.dtype).removeprefix("torch."), r.nbytes)


def resident_memory(
    shape: tuple[int, ...], stored: Stored, device: torch.device | str, dtype: torch.dtype
) -> int:
    """Bytes a resident tensor takes once loaded: a pack-quantized Linear in the encoding its kernel runs
    in on `device` (kernels.compact_nbytes), anything else in the compute dtype."""
    if stored.scheme is None:
        return math.prod(shape) * dtype.itemsize
    sc = stored.scheme
    return compact_nbytes(sc.bits, sc.group_size, sc.symmetric, shape, device, dtype, stored.scale_dtype)


def packed_nbytes(shape: tuple[int, ...], scheme: QuantScheme, scale_dtype: torch.dtype) -> int:
    """A pack-quantized Linear [out, in] on disk: packed words, scales, zero points, weight_shape."""
    out_f, in_f = shape
    groups = in_f // scheme.group_size if scheme.group_size else 1
    n = out_f * -(-in_f * scheme.bits // 32) * 4 + out_f * groups * scale_dtype.itemsize + 16
    return n + (0 if scheme.symmetric else -(-out_f * scheme.bits // 32) * groups * 4)


def compact_transient(shape: tuple[int, ...]) -> int:
    """What building one packed Linear's kernel encoding holds beside its packed bytes (kernels.compact:
    the nibbles or bytes regrouped, padded and laid out), at most ~4 bytes a weight."""
    return math.prod(shape) * 4
