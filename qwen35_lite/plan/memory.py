"""The memory plan: what the process will hold on each device, and how many expert slots fit the budgets.

Everything is computed from the config (and the checkpoint's shapes when there is one) before anything
heavy is loaded, so `info` can print the plan for Qwen3.5-397B with no weights on disk. A budget
(--gpu-mem / --cpu-mem, or free memory with a margin) caps *everything* the process holds on that side:
resident weights, KV cache, DeltaNet state, activation buffers, the runtime itself and the expert slots.
The expert slots get what is left.

Longer than ~450 lines on purpose: one object whose figures, the shrinking that fits them and the refusals
that quote them all read the same fields; the byte arithmetic is in sizes.py and the table in table.py.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch

from ..errors import BudgetError
from ..experts.formats import ALIGN, ExpertFormat, choose
from ..kernels import dequant_transient
from ..model.qwen35 import PREFILL_BLOCK, PREFILL_CHUNK
from ..model.spill import stays_resident
from ..model.vision.tower import tower_dtype
from ..weights.checkpoint import Checkpoint
from ..weights.config import TextConfig, VisionConfig
from .sizes import (
    CUDA_CONTEXT,
    CUDA_HOST,
    DEFAULT_CONTEXT,
    FREE_MARGIN,
    KV_STEP,
    MAX_BUDGET_GIB,
    PROCESS_BASE,
    STATE_CACHE_MAX,
    STATE_CACHE_SHARE,
    TOKENIZER,
    TOKENIZER_PARSE,
    TOKENIZER_REUSED,
    GiB,
    Stored,
    activation_bytes,
    ceil_gib,
    compact_transient,
    deltanet_state_bytes,
    fmt_gib,
    kv_bytes_per_token,
    resident_memory,
    resident_stored,
    tensor_shapes,
    vision_tower_nbytes,
)

__all__ = ["GiB", "MemoryPlan", "plan_for", "tensor_shapes"]


@dataclass
class MemoryPlan:
    """Bytes per device and slots per tier. Build with `MemoryPlan.build`, then `check()`."""

    device: str  # "cpu" | "cuda"
    dtype: torch.dtype
    context: int
    cfg: TextConfig = field(repr=False)
    context_from: str = "default, --ctx sets it"  # or "--ctx", "the longest the budget holds" (plan_for)
    cpu_budget: int = 0
    gpu_budget: int = 0
    cpu_budget_from: str = "--cpu-mem"  # or "free memory"
    gpu_budget_from: str = "--gpu-mem"
    weights_gpu: int = 0
    weights_cpu: int = 0
    cpu_layers: list[int] = field(default_factory=list)  # layers whose resident weights must live on the CPU
    spill_buffers: int = 0  # GPU buffers the cpu_layers are copied into as they run
    kv_per_token: int = 0
    kv_bytes: int = 0
    state_bytes: int = 0
    activations: int = 0
    load_transient: int = 0  # a tensor read on the CPU on its way to the GPU or to another dtype
    overhead_cpu: int = 0
    parse_peak: int = 0  # RssAnon at the top of the tokenizer's parse, before any weight is read
    overhead_gpu: int = 0
    staging_bytes: int = 0
    kept_states: int = 0  # `serve --state-cache`: model states of recent requests, on the compute device
    kept_states_from: str = ""  # "--state-cache", or "a share of what is left" (serve's default)
    vision_bytes: int = 0  # the vision tower: loaded on the first image, reserved where one can come
    image_bytes: int = 0  # decoding + preprocessing `run --image`'s images, from their headers (CPU)
    prefill_block: int = PREFILL_CHUNK  # prompt tokens a layer-by-layer prefill takes at once
    experts_by_linear: bool = (
        True  # routed experts run as F.linear (not torch's int4 kernel): cpu_matmul_retained
    )
    expert_format: str = ""  # experts.formats: how a routed expert is encoded in its slots
    decode_gather: int = 0  # a decode step's stacked experts (ExpertFormat.gather_nbytes)
    prefill_expert: int = 0  # one expert dequantised for a prefill block's rows (ExpertFormat.prefill_nbytes)
    expert_disk_bytes: int = 0
    slot_bytes: int = 0
    moe_layers: int = 0
    cpu_slots: int = 0
    gpu_slots: int = 0
    cpu_slots_asked: int | None = None
    gpu_slots_asked: int | None = None
    dequant_bytes: int = 0  # a call dequantising a packed resident Linear (kernels.dequant_transient)
    # every resident tensor as stored (format, bytes on disk, scheme): sizes.resident_stored
    resident_stored: dict[str, Stored] = field(default_factory=dict, repr=False)
    _resident_memory: dict[str, int] = field(default_factory=dict, repr=False)
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
        raw_config: dict | None = None,
        experts: ExpertFormat | None = None,
        gpu_mem: float | None = None,
        cpu_mem: float | None = None,
        gpu_experts: int | None = None,
        cpu_experts: int | None = None,
        context: int | None = None,
        tokenizer: bool = True,
        vision: VisionConfig | None = None,
        kept_states: int | None = 0,
        images: Sequence[Path] | None = None,
    ) -> MemoryPlan:
        """gpu_mem / cpu_mem in GiB (None: free memory minus a margin); *_experts in slots per layer.

        images: the images of a `run` (() for a text run), or None where images may come at any turn
        (chat, serve). Nothing is reserved for images a run does not have: a text run reserves neither the
        vision tower nor any image memory (the tower is never loaded). A run with images reserves the tower
        and what its images take to decode and preprocess, read from their headers. Where images may come
        (None), the tower (the checkpoint's `visual.*` tensors, else counted from `vision`) stays reserved:
        it is loaded on the first image and kept for every later one, so a budget that cannot hold it is
        refused at the start, not at the first image of a conversation; an image's decoding takes room
        when it arrives (multimodal.room_for_images: expert RAM slots released for the time).
        kept_states: bytes for serve's kept model states; None: a share of what the budget leaves after
        the smallest expert cache (keep_states_from_what_is_left).
        experts: the routed experts' format, as a load chose it (plan.load); without it, chosen here from
        raw_config / ckpt / stored_dtype (planning without a load: tests, benchmarks).
        """
        dev = torch.device(device).type
        ctx = min(context or DEFAULT_CONTEXT, cfg.max_position_embeddings)
        plan = cls(dev, dtype, ctx, cfg, cpu_slots_asked=cpu_experts, gpu_slots_asked=gpu_experts)
        plan.kept_states = kept_states or 0
        plan.kept_states_from = "--state-cache" if kept_states else ""
        shapes = tensor_shapes(cfg)
        if ckpt is not None:
            ckpt.check_resident(shapes)  # the weights must be what config.json describes
        # in memory a resident tensor is in the compute dtype, a packed Linear in its kernel's encoding
        plan.resident_stored = resident_stored(shapes, ckpt, raw_config, dtype, stored_dtype)
        nbytes = {n: resident_memory(s, plan.resident_stored[n], dev, dtype) for n, s in shapes.items()}
        plan._resident_memory = nbytes
        plan.dequant_bytes = plan._dequant_bytes(shapes, dtype)
        plan._place_weights(nbytes, shapes, ckpt)
        if images is None or images:
            plan.vision_bytes = vision_tower_nbytes(vision, tower_dtype(dev, dtype), ckpt)
        if images and plan.vision_bytes:
            plan.image_bytes = images_nbytes(images, ckpt.dir if ckpt is not None else None)
        plan.kv_per_token = kv_bytes_per_token(cfg, dtype)
        plan._set_budgets(gpu_mem, cpu_mem)
        if cfg.is_moe:
            fmt = experts or choose(
                raw_config or {},
                cfg.hidden_size,
                cfg.moe_intermediate_size,
                device,
                dtype,
                ckpt,
                stored_dtype,
            )
            plan.expert_format = fmt.describe()
            plan.moe_layers = cfg.num_hidden_layers
            plan.expert_disk_bytes = fmt.disk_nbytes
            plan.slot_bytes = -(-fmt.slot_nbytes // ALIGN) * ALIGN  # slots start aligned (experts.slots)
            # a format that prepares slots reads through staging: foreground + prefetch thread
            plan.staging_bytes = 2 * fmt.staging_nbytes
            plan.experts_by_linear = not fmt.uses_cpu_kernel
            plan.decode_gather = fmt.gather_nbytes(cfg.num_experts_per_tok)
            plan.prefill_expert = fmt.prefill_nbytes()
        plan.prefill_block = plan._prefill_block(ctx)
        plan.kv_bytes, plan.activations = plan._context_bytes(ctx)
        plan.state_bytes = deltanet_state_bytes(cfg, dtype)
        n_lin = max(cfg.num_hidden_layers - len(cfg.full_attention_layers), 1)
        plan.state_bytes += plan.state_bytes // n_lin  # one layer's new state while the old is alive
        # the tokenizer's parse leaves freed heap the weights loaded after it reuse (sizes.TOKENIZER_REUSED)
        held = max(0, TOKENIZER - min(TOKENIZER_REUSED, plan.weights_cpu)) if tokenizer else 0
        plan.overhead_cpu = PROCESS_BASE + held + (CUDA_HOST if dev == "cuda" else 0)
        plan.parse_peak = PROCESS_BASE + TOKENIZER_PARSE if tokenizer else 0
        plan.overhead_gpu = CUDA_CONTEXT if dev == "cuda" else 0
        if dev == "cuda":
            plan._spill_layers_to_cpu()
        plan._shrink_prefill_block()
        if kept_states is None:
            plan._keep_states_from_what_is_left()
        plan._size_slots()
        return plan

    def _dequant_bytes(self, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype) -> int:
        """A prefill block keeps one layer's packed weights dequantised in the compute dtype
        (kernels.dequantized_once), made a block of rows at a time (kernels.dequant_transient)."""
        packed = [n for n, st in self.resident_stored.items() if st.scheme is not None]
        if not packed:
            return 0
        per_layer: dict[str, int] = {}
        for n in packed:
            layer = ".".join(n.split(".")[:2]) if n.startswith("layers.") else n
            per_layer[layer] = per_layer.get(layer, 0) + math.prod(shapes[n]) * dtype.itemsize
        return max(per_layer.values()) + max(dequant_transient(shapes[n]) for n in packed)

    def _shrink_prefill_block(self) -> None:
        """Halve the prefill block (down to PREFILL_CHUNK, what the mixers take at once) while the plan
        with one expert slot per layer is over the compute device's budget: a smaller block reads each
        expert more often in a long prompt, but a refusal would not run it at all."""
        while self.prefill_block > PREFILL_CHUNK and not self._fits_one_slot():
            self.prefill_block //= 2
            self.kv_bytes, self.activations = self._context_bytes(self.context)

    def _fits_one_slot(self) -> bool:
        one = self.moe_layers * self.slot_bytes
        if self.on_gpu:
            return self.gpu_fixed + one <= self.gpu_budget and self.cpu_fixed <= self.cpu_budget
        return self.cpu_fixed + one <= self.cpu_budget

    def _keep_states_from_what_is_left(self) -> None:
        """`serve` without --state-cache: STATE_CACHE_SHARE of what the compute device's budget leaves
        after the smallest useful expert cache (top-k slots per layer: a token's experts without streaming),
        at most STATE_CACHE_MAX; nothing when nothing is left (the server then keeps no states)."""
        per_slot = self.moe_layers * self.slot_bytes
        least = min(self.cfg.num_experts, self.cfg.num_experts_per_tok) * per_slot if per_slot else 0
        budget, fixed = (
            (self.gpu_budget, self.gpu_fixed) if self.on_gpu else (self.cpu_budget, self.cpu_fixed)
        )
        left = max(0, budget - fixed - least)
        self.kept_states = min(int(left * STATE_CACHE_SHARE), STATE_CACHE_MAX)
        self.kept_states_from = "a share of what is left"

    def _place_weights(self, nbytes: dict[str, int], shapes: dict, ckpt: Checkpoint | None) -> None:
        """The embedding table stays on the CPU (only indexed); on CUDA all else goes to the GPU."""
        embed = nbytes["embed_tokens.weight"]
        rest = sum(nbytes.values()) - embed
        if self.cfg.tie_word_embeddings:
            rest += embed if self.device == "cuda" else 0  # model.load copies the table to the GPU as lm_head
        self._layer_bytes = [  # what spilling layer i moves to the CPU (its router stays: spill.py)
            sum(v for n, v in nbytes.items() if n.startswith(f"layers.{i}.") and not stays_resident(n))
            for i in range(self.cfg.num_hidden_layers)
        ]
        if self.device == "cuda":
            self.weights_gpu, self.weights_cpu = rest, embed
        else:
            self.weights_gpu, self.weights_cpu = 0, rest + embed
        # Loading reads each tensor into a fresh CPU buffer; converting or moving it makes a second copy,
        # building a packed Linear's kernel encoding its intermediates (sizes.compact_transient).
        held = {}
        for n, (_fmt, disk, scheme, _) in self.resident_stored.items():
            if scheme is not None:
                held[n] = disk + compact_transient(shapes[n])
            elif self.device == "cuda" or (ckpt is not None and ckpt.info(n).dtype != self.dtype):
                held[n] = disk
        if held:
            self.load_transient = max(held.values())

    def _set_budgets(self, gpu_mem: float | None, cpu_mem: float | None) -> None:
        if cpu_mem is not None:
            self.cpu_budget = gib_to_bytes(cpu_mem)
        else:
            vm = psutil.virtual_memory()
            held = psutil.Process().memory_info().rss
            self.cpu_budget = held + max(0, vm.available - max(GiB, int(FREE_MARGIN * vm.total)))
            self.cpu_budget_from = "free memory"
        if self.device != "cuda":
            return
        if gpu_mem is not None:
            self.gpu_budget = gib_to_bytes(gpu_mem)
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
            # spilled layers run from two device buffers (one computing, the next one copying in)
            largest = max(self._layer_bytes[j] for j in self.cpu_layers)
            self.spill_buffers = min(2, len(self.cpu_layers)) * largest

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
        n = self.weights_cpu + self.overhead_cpu + self.staging_bytes + self.image_bytes
        if self.on_gpu:
            return n + self.load_transient
        n += self.vision_bytes + self.kept_states
        return n + self.kv_bytes + self.state_bytes + max(self.activations, self.load_transient)

    @property
    def gpu_fixed(self) -> int:
        if not self.on_gpu:
            return 0
        n = self.weights_gpu + self.vision_bytes + self.kv_bytes + self.state_bytes + self.activations
        return n + self.overhead_gpu + self.spill_buffers + self.kept_states

    @property
    def cpu_total(self) -> int:
        return self.cpu_fixed + self.cpu_slots * self.moe_layers * self.slot_bytes

    @property
    def gpu_total(self) -> int:
        return self.gpu_fixed + self.gpu_slots * self.moe_layers * self.slot_bytes if self.on_gpu else 0

    def _prefill_block(self, ctx: int) -> int:
        """Prompt tokens a layer-by-layer prefill takes at once: the most (up to PREFILL_BLOCK) whose
        activations stay within a tenth of the compute device's budget. Larger blocks read a MoE layer's
        experts fewer times a prompt; the tenth keeps most of the budget for the expert cache."""
        budget = self.gpu_budget if self.device == "cuda" else self.cpu_budget
        block = PREFILL_BLOCK
        # the tensors alone: what the CPU matmuls leave held stops growing past ~1024 rows, so a smaller
        # block would save little of it and read every expert more often (it is counted in activations)
        while block > PREFILL_CHUNK and activation_bytes(self.cfg, self.dtype, block, ctx) > budget / 10:
            block //= 2
        return block

    def _activations(self, tokens: int, ctx: int) -> int:
        return activation_bytes(self.cfg, self.dtype, tokens, ctx, not self.on_gpu, self.experts_by_linear)

    def _context_bytes(self, ctx: int, block: int | None = None) -> tuple[int, int]:
        """(KV cache, activation buffers) at a context of `ctx` tokens, prefilled in blocks of `block`
        (the plan's prefill_block by default)."""
        block = block or self.prefill_block
        n_full = max(len(self.cfg.full_attention_layers), 1)
        steps = -(-ctx // KV_STEP) * KV_STEP
        kv = self.kv_per_token * steps + self.kv_per_token // n_full * steps  # + one layer's regrowth copy
        act = max(
            self._activations(min(block, ctx), ctx) + self.prefill_expert,
            self._activations(1, ctx) + self.decode_gather,
        )
        return kv, act + self.dequant_bytes

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

        def fits(ctx: int) -> bool:  # at the smallest prefill block, as _shrink_prefill_block may lower it
            kv, act = self._context_bytes(ctx, PREFILL_CHUNK)
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
                    f"the resident path needs {fmt_gib(need)} on the GPU ({self._gpu_parts()}) "
                    f"but {self._budget_words('gpu')} is {fmt_gib(self.gpu_budget)}",
                    self._budget_hint("gpu", need),
                )
            if self.gpu_slots_asked is not None and self.gpu_total > self.gpu_budget:
                self._refuse_slots("gpu")
            if self.gpu_slots < 1 and self.moe_layers:
                self._refuse_slots("gpu")
        need = max(self.cpu_fixed + (one if self.moe_layers else 0), self.parse_peak)
        if need > self.cpu_budget:
            raise BudgetError(
                f"the resident path needs {fmt_gib(need)} of RAM ({self._cpu_parts()}) "
                f"but {self._budget_words('cpu')} is {fmt_gib(self.cpu_budget)}",
                self._budget_hint("cpu", need),
            )
        if self.cpu_slots_asked is not None and self.cpu_total > self.cpu_budget:
            self._refuse_slots("cpu")

    def _budget_hint(self, side: str, need: int) -> str:
        """What would make a refused plan fit: the larger budget; a smaller --state-cache where the kept
        states alone put it over; a shorter --ctx only where the KV cache is what the context costs
        (the compute device's side), with its size per token."""
        budget = self.gpu_budget if side == "gpu" else self.cpu_budget
        hint = f"use --{side}-mem {ceil_gib(need)} or more"
        on_compute = side == ("gpu" if self.on_gpu else "cpu")
        if on_compute and self.kept_states and need - self.kept_states <= budget:
            room = self.kept_states - (need - budget)
            hint += f", or --state-cache {math.floor(room / GiB * 100) / 100:.2f} or less"
        elif side == "cpu" and self.image_bytes and need - self.image_bytes <= budget:
            hint += f", or smaller images (decoding these takes {fmt_gib(self.image_bytes)})"
        elif on_compute and self._shorter_context_fits(need, budget):
            hint += f", or a shorter --ctx (KV is {fmt_gib(self.kv_per_token)} per token)"
        return hint

    def _shorter_context_fits(self, need: int, budget: int) -> bool:
        """Whether the shortest context (one KV step) would fit where this one does not."""
        kv, act = self._context_bytes(min(KV_STEP, self.context))
        if self.on_gpu:
            return need - self.kv_bytes - self.activations + kv + act <= budget
        held = max(self.activations, self.load_transient)
        return need - self.kv_bytes - held + kv + max(act, self.load_transient) <= budget

    def _refuse_slots(self, side: str) -> None:
        per = self.moe_layers * self.slot_bytes
        budget, fixed, slots = (
            (self.gpu_budget, self.gpu_fixed, self.gpu_slots)
            if side == "gpu"
            else (self.cpu_budget, self.cpu_fixed, self.cpu_slots)
        )
        fits = max(0, (budget - fixed) // per)
        raise BudgetError(
            f"--{side}-experts {slots} needs {fmt_gib(fixed + slots * per)} on the {side.upper()} "
            f"({fmt_gib(slots * per)} of expert slots) but {self._budget_words(side)} is {fmt_gib(budget)}",
            f"use --{side}-experts {fits} or fewer, or --{side}-mem {ceil_gib(fixed + slots * per)} or more",
        )

    def _budget_words(self, side: str) -> str:
        src = self.gpu_budget_from if side == "gpu" else self.cpu_budget_from
        return src if src.startswith("--") else f"the budget from {src}"

    def _cpu_parts(self) -> str:
        parts = [f"weights {fmt_gib(self.weights_cpu)}"]
        if not self.on_gpu:
            parts += [
                f"KV for {self.context} tokens {fmt_gib(self.kv_bytes)}",
                f"DeltaNet state {fmt_gib(self.state_bytes)}",
                f"buffers {fmt_gib(max(self.activations, self.load_transient))}",
            ]
            if self.vision_bytes:
                parts.append(f"vision tower {fmt_gib(self.vision_bytes)}")
            if self.kept_states:
                parts.append(f"kept model states {fmt_gib(self.kept_states)} ({self.kept_states_from})")
        else:
            parts.append(f"load buffer {fmt_gib(self.load_transient)}")
        if self.image_bytes:
            parts.append(f"decoding the images {fmt_gib(self.image_bytes)}")
        parts.append(f"runtime {fmt_gib(self.overhead_cpu + self.staging_bytes)}")
        if self.moe_layers:
            parts.append(f"one expert slot per layer {fmt_gib(self.moe_layers * self.slot_bytes)}")
        return ", ".join(parts)

    def _gpu_parts(self) -> str:
        return ", ".join(
            [
                f"weights {fmt_gib(self.weights_gpu)}",
                *([f"vision tower {fmt_gib(self.vision_bytes)}"] if self.vision_bytes else []),
                f"KV for {self.context} tokens {fmt_gib(self.kv_bytes)}",
                f"DeltaNet state {fmt_gib(self.state_bytes)}",
                f"buffers {fmt_gib(self.activations)}",
                f"CUDA runtime {fmt_gib(self.overhead_gpu)}",
                *([f"spilled-layer buffers {fmt_gib(self.spill_buffers)}"] if self.spill_buffers else []),
                *(
                    [f"kept model states {fmt_gib(self.kept_states)} ({self.kept_states_from})"]
                    if self.kept_states
                    else []
                ),
                f"one expert slot per layer {fmt_gib(self.moe_layers * self.slot_bytes)}",
            ]
        )

    # ---- reporting ------------------------------------------------------------------------------

    @property
    def resident_by_format(self) -> dict[str, dict[str, int]]:
        """Resident tensors grouped by how the checkpoint stores them: count, bytes on disk, bytes the load
        holds (the compute dtype; a packed Linear in its kernel's encoding, kernels.compact)."""
        out: dict[str, dict[str, int]] = {}
        for n, (fmt, disk, _scheme, _) in self.resident_stored.items():
            row = out.setdefault(fmt, {"tensors": 0, "disk_bytes": 0, "memory_bytes": 0})
            row["tensors"] += 1
            row["disk_bytes"] += disk
            row["memory_bytes"] += self._resident_memory[n]
        return out

    @property
    def spilled_bytes(self) -> int:
        """Weights of the cpu_layers: what is copied to the GPU for them every forward."""
        return sum(self._layer_bytes[i] for i in self.cpu_layers)

    @property
    def holds_every_expert(self) -> bool:
        """Whether the compute tier (GPU slots on CUDA, else RAM slots) has a slot for every expert."""
        slots = self.gpu_slots if self.on_gpu else self.cpu_slots
        return self.moe_layers > 0 and slots >= self.cfg.num_experts

    def provider_kwargs(self) -> dict[str, int]:
        """Keyword arguments for TieredExperts(store, device, dtype, **plan.provider_kwargs())."""
        return {"cpu_slots": self.cpu_slots, "gpu_slots": self.gpu_slots}


def images_nbytes(paths: Sequence[Path], model_dir: Path | None) -> int:
    """Bytes to decode and preprocess `run --image`'s images, read from their headers (nothing decoded):
    the sum of each one's image_nbytes under the checkpoint's preprocessor_config.json (an upper estimate:
    an image's decoding buffers are freed before the next one's are made)."""
    from ..model.vision.preprocess import (  # PIL: with images only
        ImageProcessorConfig,
        image_nbytes,
        load_image,
    )

    cfg = ImageProcessorConfig.from_dir(model_dir) if model_dir is not None else ImageProcessorConfig()
    total = 0
    for p in paths:
        im = load_image(Path(p).expanduser(), decode=False)  # the header: size, mode, transparency
        transparent = "A" in im.getbands() or im.info.get("transparency") is not None
        total += image_nbytes(im.width, im.height, im.mode, transparent, cfg)
    return total


def gib_to_bytes(gib: float) -> int:
    """A budget in GiB as bytes; a budget past any machine's (1e300, inf) is capped, never an overflow."""
    if not gib > 0:  # 0, negative or NaN: nothing fits (cli/options refuses these first)
        return 0
    return int(min(gib, MAX_BUDGET_GIB) * GiB)


def plan_for(cfg: TextConfig, *, context: int | None = None, **kwargs) -> MemoryPlan:
    """The plan a run uses, and the context it reserves (the engine's max_context must be the same).

    With --ctx: that context, capped at the model's maximum (a budget that cannot hold it is refused).
    Without: DEFAULT_CONTEXT capped at the maximum; where the budget cannot hold that with one expert slot
    per layer, the longest context that fits. Not "the longest that fits" always: that would hand every
    byte left to the KV cache and leave the expert cache a single slot per layer.
    """
    plan = MemoryPlan.build(cfg, context=context, **kwargs)
    if context is not None:
        plan.context_from = "--ctx"
        return plan
    fit = plan.context_fit
    if KV_STEP <= fit < plan.context:
        plan = MemoryPlan.build(cfg, context=fit, **kwargs)
        plan.context_from = "the longest the budget holds"
    return plan
