"""The memory plan as the rows of `qwen35-lite info`'s table: what goes where, in GiB, and why."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .sizes import KiB, fmt_gib, fmt_mib

if TYPE_CHECKING:
    from .memory import MemoryPlan


def plan_rows(
    plan: MemoryPlan, cpu_threads: int | None = None, threads_from: str = "torch's default"
) -> list[tuple[str, str]]:
    """(label, value) pairs for the CLI's `info` table; cpu_threads: the CPU compute threads a run uses."""
    cfg = plan.cfg
    rows = [("device", f"{plan.device}, {str(plan.dtype).removeprefix('torch.')}")]
    if plan.on_gpu:
        rows.append(("GPU budget", f"{fmt_gib(plan.gpu_budget)} ({plan.gpu_budget_from})"))
    rows.append(("CPU budget", f"{fmt_gib(plan.cpu_budget)} ({plan.cpu_budget_from})"))
    if cpu_threads is not None:
        rows.append(("CPU threads", f"{cpu_threads} ({threads_from})"))
    if plan.on_gpu:
        rows.append(("resident weights (GPU)", fmt_gib(plan.weights_gpu)))
    embed = "embedding table" + (f" + {len(plan.cpu_layers)} layers" if plan.cpu_layers else "")
    rows.append(
        (
            "resident weights (CPU)",
            f"{fmt_gib(plan.weights_cpu)}" + (f" ({embed})" if plan.on_gpu else ""),
        )
    )
    by_format = plan.resident_by_format
    if any(fmt.startswith("int") for fmt in by_format):  # a packed Linear: what the load makes of it
        rows.append(("resident weights by format", resident_formats_text(plan)))
    if plan.cpu_layers:
        rows.append(
            (
                "placed on the CPU",
                f"layers {plan.cpu_layers[0]}-{plan.cpu_layers[-1]}: the GPU budget cannot hold them; "
                f"copied in as they run ({fmt_gib(plan.spill_buffers)} of GPU buffers, "
                f"{fmt_gib(plan.spilled_bytes)} over PCIe a token)",
            )
        )
    kv_dev = "GPU" if plan.on_gpu else "CPU"
    rows += [
        (
            "KV cache per token",
            f"{plan.kv_per_token / KiB:.1f} KiB ({len(cfg.full_attention_layers)} attention"
            f" layer{'' if len(cfg.full_attention_layers) == 1 else 's'})",
        ),
        (f"KV cache, {plan.context} tokens ({kv_dev})", fmt_gib(plan.kv_bytes)),
        ("DeltaNet state (fixed)", fmt_gib(plan.state_bytes)),
        *(
            [
                (
                    "vision tower (loaded on first image)",
                    f"{fmt_gib(plan.vision_bytes)} ({kv_dev}), reserved",
                )
            ]
            if plan.vision_bytes
            else []
        ),
        *(
            [
                (
                    "decoding the images (--image)",
                    f"{fmt_gib(plan.image_bytes)} (CPU), from their headers",
                )
            ]
            if plan.image_bytes
            else []
        ),
        *(
            [("kept model states (serve)", f"{fmt_gib(plan.kept_states)} ({plan.kept_states_from})")]
            if plan.kept_states
            else []
        ),
        (
            "activation buffers",
            f"{fmt_gib(plan.activations)} (prefill in blocks of {plan.prefill_block} tokens)",
        ),
        (
            "runtime overhead",
            f"{fmt_gib(plan.overhead_cpu)} CPU"
            + (f", {fmt_gib(plan.overhead_gpu)} GPU" if plan.on_gpu else ""),
        ),
        ("context", f"{plan.context} tokens ({plan.context_from})"),
        ("context that fits", f"{plan.context_fit} tokens"),
    ]
    if plan.moe_layers:
        E = cfg.num_experts
        rows.append(("expert format", plan.expert_format))
        rows.append(
            (
                "expert size",
                f"{fmt_mib(plan.expert_disk_bytes)} on disk, {fmt_mib(plan.slot_bytes)} in a slot",
            )
        )
        if plan.on_gpu:
            rows.append(("expert slots (GPU)", _slots_text(plan, plan.gpu_slots, E)))
        rows.append(("expert slots (RAM)", _slots_text(plan, plan.cpu_slots, E)))
        disk, to_gpu = plan.bytes_per_token()
        text = f"{fmt_gib(disk)} from disk" + (f", {fmt_gib(to_gpu)} to the GPU" if plan.on_gpu else "")
        rows.append(("expected reads per token", text + " (uniform routing: hit = slots / experts)"))
        if plan.on_gpu and plan.gpu_slots < E:
            rows.append(("expected expert split", expert_split_text(plan)))
    rows.append(("total (CPU)", f"{fmt_gib(plan.cpu_total)} of {fmt_gib(plan.cpu_budget)}"))
    if plan.on_gpu:
        rows.append(("total (GPU)", f"{fmt_gib(plan.gpu_total)} of {fmt_gib(plan.gpu_budget)}"))
    return rows


def resident_formats_text(plan: MemoryPlan) -> str:
    """`int4 g32 symmetric 12.0 MiB on disk, 14.0 MiB in memory; bfloat16 ...`: packed Linears stay packed
    in memory, in the layout their kernel reads (kernels/choose.py)."""
    parts = []
    for fmt, row in plan.resident_by_format.items():
        text = f"{fmt} {fmt_gib(row['disk_bytes'])} on disk"
        if fmt.startswith("int"):
            text += f", {fmt_gib(row['memory_bytes'])} in memory"
        parts.append(text)
    return "; ".join(parts)


def expert_split(plan: MemoryPlan) -> dict[str, float]:
    """Where a decode step's routed experts are expected to be, under uniform routing: the GPU's slots,
    the RAM tier's (the CPU computes those in place or copies them, as the rates measured at load favour),
    or disk (read into RAM first)."""
    E = plan.cfg.num_experts
    gpu = min(1.0, plan.gpu_slots / E)
    ram = min(1.0, max(plan.cpu_slots, plan.gpu_slots) / E) - gpu
    return {"gpu": round(gpu, 4), "ram": round(max(ram, 0.0), 4), "disk": round(1 - gpu - max(ram, 0.0), 4)}


def expert_split_text(plan: MemoryPlan) -> str:
    s = expert_split(plan)
    return (
        f"{100 * s['gpu']:.0f}% on the GPU, {100 * s['ram']:.0f}% in RAM (computed by the CPU or copied to"
        f" the GPU: measured at load), {100 * s['disk']:.0f}% from disk"
    )


def _slots_text(plan: MemoryPlan, slots: int, E: int) -> str:
    total = slots * plan.moe_layers * plan.slot_bytes
    return f"{slots} per layer ({100 * slots / E:.1f}% of experts), {fmt_gib(total)}"
