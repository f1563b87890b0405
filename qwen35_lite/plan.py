"""The memory plan: what the process will hold on each device, and how many expert slots fit the budgets.

Everything is computed from the config (and the checkpoint's shapes when there is one) before anything
heavy is loaded, so `info` can print the plan for Qwen3.5-397B with no weights on disk. A budget
(--gpu-mem / --cpu-mem, or free memory with a margin) caps *everything* the process holds on that side:
resident weights, KV cache, DeltaNet state, activation buffers, the runtime itself and the expert slots.
The expert slots get what is left.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import psutil
import torch

from .checkpoint import Checkpoint
from .config import TextConfig
from .errors import BudgetError
from .generate import PREFILL_CHUNK
from .model import resident_names

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
KV_STEP = 256  # cache.KV_GROW_STEP: the KV cache grows in steps of this many positions
FP8_BLOCK = 128
DEFAULT_CONTEXT = 32768  # KV reserved when no --ctx is given (capped at the model's maximum)

# Process overheads, measured as RssAnon on torch 2.13 (CPU build), Python 3, with margin:
PROCESS_BASE = 256 * MiB  # `import torch` + qwen35_lite: 143 MiB measured
TOKENIZER = 320 * MiB  # the 248K-entry tokenizer.json loaded in `tokenizers`: 265 MiB measured
CUDA_HOST = 1 * GiB  # CUDA runtime, cuBLAS and kernels' host-side state
CUDA_CONTEXT = 1 * GiB  # device memory taken by the CUDA context, cuBLAS workspace, allocator slack
ACTIVATION_MARGIN = 1.25
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


def expert_disk_nbytes(cfg: TextConfig, stored: torch.dtype) -> int:
    """Bytes of one routed expert on disk (block-FP8 scales included)."""
    D, I = cfg.hidden_size, cfg.moe_intermediate_size
    n = 3 * D * I * stored.itemsize
    if stored in (torch.float8_e4m3fn, torch.float8_e5m2):
        b = FP8_BLOCK
        n += 4 * (2 * math.ceil(I / b) * math.ceil(D / b) + math.ceil(D / b) * math.ceil(I / b))
    return n


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


def activation_bytes(cfg: TextConfig, dtype: torch.dtype, tokens: int, context: int) -> int:
    """Peak temporaries of one forward over `tokens` new tokens at `context` (one layer at a time).

    An upper estimate from the ops in model/moe/deltanet/attention: the widest layer's temporaries,
    plus the GQA expansion of K/V to every query head over the whole context (attention._attend).
    """
    T, D, b = tokens, cfg.hidden_size, dtype.itemsize
    A, I, Is = cfg.num_experts_per_tok, cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size
    common = T * D * (4 * b + 8)  # residual stream, norm input/output, fp32 norm temporaries
    moe = T * A * (4 * D + 4 * I) * b + T * 3 * Is * b + T * cfg.num_experts * 4 * 2
    hv, dk, dv = cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim
    conv = 2 * cfg.linear_num_key_heads * dk + hv * dv
    chunk = 64
    Tp = -(-T // chunk) * chunk
    deltanet = T * (4 * conv + 2 * hv * dv) * b + 16 * hv * Tp * max(dk, dv) * 4 + 5 * hv * Tp * chunk * 4
    H, Hkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    attn = T * H * hd * 8 * b + (2 * H * context * hd * b if H > Hkv else 0)
    attn += H * T * min(context, 1024) * 4  # SDPA score blocks (the fused kernels tile over the context)
    head = T * cfg.vocab_size * 4 if T == 1 else cfg.vocab_size * 4 * 2
    return int(ACTIVATION_MARGIN * (common + max(moe, deltanet, attn, head)))


@dataclass
class MemoryPlan:
    """Bytes per device and slots per tier. Build with `MemoryPlan.build`, then `check()`."""

    device: str  # "cpu" | "cuda"
    dtype: torch.dtype
    context: int
    cfg: TextConfig = field(repr=False)
    cpu_budget: int = 0
    gpu_budget: int = 0
    cpu_budget_from: str = "--cpu-mem"  # or "free memory"
    gpu_budget_from: str = "--gpu-mem"
    weights_gpu: int = 0
    weights_cpu: int = 0
    cpu_layers: list[int] = field(default_factory=list)  # layers whose resident weights must live on the CPU
    kv_per_token: int = 0
    kv_bytes: int = 0
    state_bytes: int = 0
    activations: int = 0
    load_transient: int = 0  # a tensor read on the CPU on its way to the GPU or to another dtype
    overhead_cpu: int = 0
    overhead_gpu: int = 0
    staging_bytes: int = 0
    expert_disk_bytes: int = 0
    slot_bytes: int = 0
    moe_layers: int = 0
    cpu_slots: int = 0
    gpu_slots: int = 0
    cpu_slots_asked: int | None = None
    gpu_slots_asked: int | None = None
    _layer_bytes: list[int] = field(default_factory=list, repr=False)

    # ---- building -------------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        cfg: TextConfig,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.bfloat16,
        ckpt: Checkpoint | None = None,
        stored_dtype: torch.dtype | None = None,
        gpu_mem: float | None = None,
        cpu_mem: float | None = None,
        gpu_experts: int | None = None,
        cpu_experts: int | None = None,
        context: int | None = None,
        tokenizer: bool = True,
    ) -> MemoryPlan:
        """gpu_mem / cpu_mem in GiB (None: free memory minus a margin); *_experts in slots per layer."""
        dev = torch.device(device).type
        ctx = min(context or DEFAULT_CONTEXT, cfg.max_position_embeddings)
        plan = cls(dev, dtype, ctx, cfg, cpu_slots_asked=cpu_experts, gpu_slots_asked=gpu_experts)
        shapes = tensor_shapes(cfg)
        if ckpt is not None:
            shapes = {n: ckpt.info(n).shape for n in shapes}
            if cfg.is_moe:
                stored_dtype = ckpt.info("layers.0.mlp.experts." + _first_expert_key(ckpt)).dtype
        b = dtype.itemsize
        nbytes = {n: math.prod(s) * b for n, s in shapes.items()}
        plan._place_weights(nbytes, shapes, ckpt)
        plan.kv_per_token = kv_bytes_per_token(cfg, dtype)
        plan.kv_bytes, plan.activations = plan._context_bytes(ctx)
        plan.state_bytes = deltanet_state_bytes(cfg, dtype)
        n_lin = max(cfg.num_hidden_layers - len(cfg.full_attention_layers), 1)
        plan.state_bytes += plan.state_bytes // n_lin  # one layer's new state while the old is alive
        plan.overhead_cpu = (
            PROCESS_BASE + (TOKENIZER if tokenizer else 0) + (CUDA_HOST if dev == "cuda" else 0)
        )
        plan.overhead_gpu = CUDA_CONTEXT if dev == "cuda" else 0
        if cfg.is_moe:
            stored = stored_dtype or dtype
            plan.moe_layers = cfg.num_hidden_layers
            plan.expert_disk_bytes = expert_disk_nbytes(cfg, stored)
            plan.slot_bytes = 3 * cfg.hidden_size * cfg.moe_intermediate_size * b
            converts = stored != dtype
            plan.staging_bytes = 2 * plan.expert_disk_bytes if converts else 0  # foreground + prefetch thread
        plan._set_budgets(gpu_mem, cpu_mem)
        if dev == "cuda":
            plan._spill_layers_to_cpu()
        plan._size_slots()
        return plan

    def _place_weights(self, nbytes: dict[str, int], shapes: dict, ckpt: Checkpoint | None) -> None:
        """The embedding table stays on the CPU (only indexed); on CUDA all else goes to the GPU."""
        embed = nbytes["embed_tokens.weight"]
        rest = sum(nbytes.values()) - embed
        if self.cfg.tie_word_embeddings:
            rest += embed if self.device == "cuda" else 0  # model.load copies the table to the GPU as lm_head
        self._layer_bytes = [
            sum(v for n, v in nbytes.items() if n.startswith(f"layers.{i}."))
            for i in range(self.cfg.num_hidden_layers)
        ]
        if self.device == "cuda":
            self.weights_gpu, self.weights_cpu = rest, embed
        else:
            self.weights_gpu, self.weights_cpu = 0, rest + embed
        # Loading reads each tensor into a fresh CPU buffer; converting or moving it makes a second copy.
        stored_size = {
            n: math.prod(s) * (ckpt.info(n).dtype.itemsize if ckpt else self.dtype.itemsize)
            for n, s in shapes.items()
        }
        converting = ckpt is not None and any(ckpt.info(n).dtype != self.dtype for n in shapes)
        if self.device == "cuda":
            self.load_transient = max(stored_size.values())
        elif converting:
            self.load_transient = max(stored_size[n] for n in shapes if ckpt.info(n).dtype != self.dtype)

    def _set_budgets(self, gpu_mem: float | None, cpu_mem: float | None) -> None:
        if cpu_mem is not None:
            self.cpu_budget = int(cpu_mem * GiB)
        else:
            vm = psutil.virtual_memory()
            held = psutil.Process().memory_info().rss
            self.cpu_budget = held + max(0, vm.available - max(GiB, int(FREE_MARGIN * vm.total)))
            self.cpu_budget_from = "free memory"
        if self.device != "cuda":
            return
        if gpu_mem is not None:
            self.gpu_budget = int(gpu_mem * GiB)
        else:
            free, total = torch.cuda.mem_get_info()
            self.gpu_budget = max(0, free - max(GiB, int(0.05 * total)))
            self.gpu_budget_from = "free GPU memory"

    def _spill_layers_to_cpu(self) -> None:
        """Where the resident path does not fit the GPU budget (with one expert slot per layer), move
        whole layers' resident weights to the CPU, last layers first."""
        one_slot = self.moe_layers * self.slot_bytes
        i = self.cfg.num_hidden_layers
        while self.gpu_fixed + one_slot > self.gpu_budget and i > 0:
            i -= 1
            self.cpu_layers.insert(0, i)
            self.weights_gpu -= self._layer_bytes[i]
            self.weights_cpu += self._layer_bytes[i]

    def _size_slots(self) -> None:
        if not self.moe_layers:
            return
        per_slot = self.moe_layers * self.slot_bytes  # one slot in every layer
        E = self.cfg.num_experts
        fit_cpu = max(0, (self.cpu_budget - self.cpu_fixed) // per_slot)
        self.cpu_slots = min(E, self.cpu_slots_asked if self.cpu_slots_asked is not None else fit_cpu)
        if self.device == "cuda":
            fit_gpu = max(0, (self.gpu_budget - self.gpu_fixed) // per_slot)
            self.gpu_slots = min(E, self.gpu_slots_asked if self.gpu_slots_asked is not None else fit_gpu)

    # ---- totals ---------------------------------------------------------------------------------

    @property
    def on_gpu(self) -> bool:
        return self.device == "cuda"

    @property
    def cpu_fixed(self) -> int:
        """Everything on the CPU but the expert slots."""
        n = self.weights_cpu + self.overhead_cpu + self.staging_bytes
        if self.on_gpu:
            return n + self.load_transient
        return n + self.kv_bytes + self.state_bytes + max(self.activations, self.load_transient)

    @property
    def gpu_fixed(self) -> int:
        if not self.on_gpu:
            return 0
        return self.weights_gpu + self.kv_bytes + self.state_bytes + self.activations + self.overhead_gpu

    @property
    def cpu_total(self) -> int:
        return self.cpu_fixed + self.cpu_slots * self.moe_layers * self.slot_bytes

    @property
    def gpu_total(self) -> int:
        return self.gpu_fixed + self.gpu_slots * self.moe_layers * self.slot_bytes if self.on_gpu else 0

    def _context_bytes(self, ctx: int) -> tuple[int, int]:
        """(KV cache, activation buffers) at a context of `ctx` tokens."""
        n_full = max(len(self.cfg.full_attention_layers), 1)
        steps = -(-ctx // KV_STEP) * KV_STEP
        kv = self.kv_per_token * steps + self.kv_per_token // n_full * steps  # + one layer's regrowth copy
        act = max(
            activation_bytes(self.cfg, self.dtype, min(PREFILL_CHUNK, ctx), ctx),
            activation_bytes(self.cfg, self.dtype, 1, ctx),
        )
        return kv, act

    @property
    def context_fit(self) -> int:
        """The longest context (a multiple of 256) whose KV and buffers fit the budget of the KV's
        device with one expert slot per layer."""
        budget, fixed = (
            (self.gpu_budget, self.gpu_fixed) if self.on_gpu else (self.cpu_budget, self.cpu_fixed)
        )
        base = fixed - self.kv_bytes - self.activations + self.moe_layers * self.slot_bytes
        if not self.on_gpu:  # on the CPU the buffers are max(activations, load buffer)
            base += self.activations - max(self.activations, self.load_transient)

        def fits(ctx: int) -> bool:
            kv, act = self._context_bytes(ctx)
            extra = act if self.on_gpu else max(act, self.load_transient)
            return base + kv + extra <= budget

        lo, hi = 0, self.cfg.max_position_embeddings // KV_STEP
        while lo < hi:  # the largest number of 256-token steps that fits
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid * KV_STEP) else (lo, mid - 1)
        return lo * KV_STEP

    def bytes_per_token(self, ram_hit: float | None = None, gpu_hit: float | None = None) -> tuple[int, int]:
        """(bytes read from disk, bytes copied to the GPU) per decoded token at these hit rates
        (default: uniform routing, hit = slots / experts; real routing has more locality)."""
        if not self.moe_layers:
            return 0, 0
        E, k = self.cfg.num_experts, self.cfg.num_experts_per_tok
        g = min(1.0, self.gpu_slots / E) if gpu_hit is None else gpu_hit
        r = min(1.0, max(self.cpu_slots, self.gpu_slots) / E) if ram_hit is None else ram_hit
        lookups = self.moe_layers * k
        to_gpu = int(lookups * (1 - g) * self.slot_bytes) if self.on_gpu else 0
        return int(lookups * (1 - r) * self.expert_disk_bytes), to_gpu

    # ---- refusing -------------------------------------------------------------------------------

    def check(self) -> None:
        """Raise BudgetError (with the numbers and the flags that would fit) if the plan cannot run."""
        one = self.moe_layers * self.slot_bytes
        if self.on_gpu:
            need = self.gpu_fixed + one
            if need > self.gpu_budget:
                raise BudgetError(
                    f"the resident path needs {_gib(need)} on the GPU ({self._gpu_parts()}) "
                    f"but {self._budget_words('gpu')} is {_gib(self.gpu_budget)}",
                    f"use --gpu-mem {_ceil_gib(need)} or more, or a shorter --ctx "
                    f"(KV is {self.kv_per_token / KiB:.0f} KiB per token)",
                )
            if self.gpu_slots_asked is not None and self.gpu_total > self.gpu_budget:
                self._refuse_slots("gpu")
            if self.gpu_slots < 1 and self.moe_layers:
                self._refuse_slots("gpu")
        need = self.cpu_fixed + (one if self.moe_layers else 0)
        if need > self.cpu_budget:
            raise BudgetError(
                f"the resident path needs {_gib(need)} of RAM ({self._cpu_parts()}) "
                f"but {self._budget_words('cpu')} is {_gib(self.cpu_budget)}",
                f"use --cpu-mem {_ceil_gib(need)} or more"
                + ("" if self.on_gpu else ", or a shorter --ctx")
                + (f" (KV is {self.kv_per_token / KiB:.0f} KiB per token)" if not self.on_gpu else ""),
            )
        if self.cpu_slots_asked is not None and self.cpu_total > self.cpu_budget:
            self._refuse_slots("cpu")

    def _refuse_slots(self, side: str) -> None:
        per = self.moe_layers * self.slot_bytes
        budget, fixed, slots = (
            (self.gpu_budget, self.gpu_fixed, self.gpu_slots)
            if side == "gpu"
            else (self.cpu_budget, self.cpu_fixed, self.cpu_slots)
        )
        fits = max(0, (budget - fixed) // per)
        raise BudgetError(
            f"--{side}-experts {slots} needs {_gib(fixed + slots * per)} on the {side.upper()} "
            f"({_gib(slots * per)} of expert slots) but {self._budget_words(side)} is {_gib(budget)}",
            f"use --{side}-experts {fits} or fewer, or --{side}-mem {_ceil_gib(fixed + slots * per)} or more",
        )

    def _budget_words(self, side: str) -> str:
        src = self.gpu_budget_from if side == "gpu" else self.cpu_budget_from
        return src if src.startswith("--") else f"the budget from {src}"

    def _cpu_parts(self) -> str:
        parts = [f"weights {_gib(self.weights_cpu)}"]
        if not self.on_gpu:
            parts += [
                f"KV for {self.context} tokens {_gib(self.kv_bytes)}",
                f"DeltaNet state {_gib(self.state_bytes)}",
                f"buffers {_gib(max(self.activations, self.load_transient))}",
            ]
        else:
            parts.append(f"load buffer {_gib(self.load_transient)}")
        parts.append(f"runtime {_gib(self.overhead_cpu + self.staging_bytes)}")
        if self.moe_layers:
            parts.append(f"one expert slot per layer {_gib(self.moe_layers * self.slot_bytes)}")
        return ", ".join(parts)

    def _gpu_parts(self) -> str:
        return ", ".join(
            [
                f"weights {_gib(self.weights_gpu)}",
                f"KV for {self.context} tokens {_gib(self.kv_bytes)}",
                f"DeltaNet state {_gib(self.state_bytes)}",
                f"buffers {_gib(self.activations)}",
                f"CUDA runtime {_gib(self.overhead_gpu)}",
                f"one expert slot per layer {_gib(self.moe_layers * self.slot_bytes)}",
            ]
        )

    # ---- reporting ------------------------------------------------------------------------------

    def provider_kwargs(self) -> dict[str, int]:
        """Keyword arguments for TieredExperts(store, device, dtype, **plan.provider_kwargs())."""
        return {"cpu_slots": self.cpu_slots, "gpu_slots": self.gpu_slots}

    def rows(self) -> list[tuple[str, str]]:
        """(label, value) pairs for the CLI's `info` table."""
        cfg = self.cfg
        rows = [("device", f"{self.device}, {str(self.dtype).removeprefix('torch.')}")]
        if self.on_gpu:
            rows.append(("GPU budget", f"{_gib(self.gpu_budget)} ({self.gpu_budget_from})"))
        rows.append(("CPU budget", f"{_gib(self.cpu_budget)} ({self.cpu_budget_from})"))
        if self.on_gpu:
            rows.append(("resident weights (GPU)", _gib(self.weights_gpu)))
        embed = "embedding table" + (f" + {len(self.cpu_layers)} layers" if self.cpu_layers else "")
        rows.append(
            ("resident weights (CPU)", f"{_gib(self.weights_cpu)}" + (f" ({embed})" if self.on_gpu else ""))
        )
        if self.cpu_layers:
            rows.append(
                (
                    "placed on the CPU",
                    f"layers {self.cpu_layers[0]}-{self.cpu_layers[-1]}: the GPU budget cannot hold them",
                )
            )
        kv_dev = "GPU" if self.on_gpu else "CPU"
        rows += [
            (
                "KV cache per token",
                f"{self.kv_per_token / KiB:.1f} KiB ({len(cfg.full_attention_layers)} attention layers)",
            ),
            (f"KV cache, {self.context} tokens ({kv_dev})", _gib(self.kv_bytes)),
            ("DeltaNet state (fixed)", _gib(self.state_bytes)),
            ("activation buffers", _gib(self.activations)),
            (
                "runtime overhead",
                f"{_gib(self.overhead_cpu)} CPU"
                + (f", {_gib(self.overhead_gpu)} GPU" if self.on_gpu else ""),
            ),
            ("context that fits", f"{self.context_fit} tokens"),
        ]
        if self.moe_layers:
            E = cfg.num_experts
            rows.append(
                ("expert size", f"{_mib(self.expert_disk_bytes)} on disk, {_mib(self.slot_bytes)} in a slot")
            )
            if self.on_gpu:
                rows.append(("expert slots (GPU)", self._slots_text(self.gpu_slots, E)))
            rows.append(("expert slots (RAM)", self._slots_text(self.cpu_slots, E)))
            disk, to_gpu = self.bytes_per_token()
            text = f"{_gib(disk)} from disk" + (f", {_gib(to_gpu)} to the GPU" if self.on_gpu else "")
            rows.append(("expected reads per token", text + " (uniform routing: hit = slots / experts)"))
        rows.append(("total (CPU)", f"{_gib(self.cpu_total)} of {_gib(self.cpu_budget)}"))
        if self.on_gpu:
            rows.append(("total (GPU)", f"{_gib(self.gpu_total)} of {_gib(self.gpu_budget)}"))
        return rows

    def _slots_text(self, slots: int, E: int) -> str:
        total = slots * self.moe_layers * self.slot_bytes
        return f"{slots} per layer ({100 * slots / E:.1f}% of experts), {_gib(total)}"


def _first_expert_key(ckpt: Checkpoint) -> str:
    return "gate_up_proj" if "layers.0.mlp.experts.gate_up_proj" in ckpt else "0.down_proj.weight"


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def _mib(n: float) -> str:
    return f"{n / MiB:.1f} MiB"


def _ceil_gib(n: float) -> str:
    return f"{math.ceil(n / GiB * 10) / 10:.1f}"
