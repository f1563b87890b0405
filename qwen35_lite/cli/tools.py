"""`qwen35-lite info` (the memory plan, from config.json and safetensors headers only) and
`qwen35-lite bench` (a fixed workload under the budget flags). `register(app)` adds both to the Typer app.
"""

from __future__ import annotations

import inspect
from dataclasses import replace
from typing import TYPE_CHECKING, Annotated

import typer

from ..plan.options import EngineOptions
from .errors import friendly_errors
from .options import Model, check_load_flags, flag_groups, plan_memory, timed_load
from .ui import UI, plural, reply_rows

if TYPE_CHECKING:
    from ..plan.load import Planned
    from ..plan.memory import MemoryPlan

JsonOut = Annotated[bool, typer.Option("--json", help="One JSON object on stdout.")]


def register(app: typer.Typer) -> None:
    """Add `info` and `bench` to `app`, with the same one-line error handling as `run` and `chat`."""

    for command in (info, bench):
        app.command(help=flowed_help(command))(friendly_errors(command))


def flowed_help(fn) -> str:
    """fn's docstring with each paragraph on one line: typer's rich help keeps the docstring's line breaks."""
    paragraphs = inspect.getdoc(fn).split("\n\n")
    return "\n\n".join(" ".join(p.split()) for p in paragraphs)


@flag_groups
def info(model: Model, load: EngineOptions, json_out: JsonOut = False) -> None:
    """Print the memory plan without loading the weights.

    The plan shows the resident bytes per device, the KV cache per token and the context that fits, the
    expert slots per tier and the bytes expected to be read per token. A directory holding only
    config.json is enough.
    """
    check_load_flags(load, planning=True)
    import torch

    planned = plan_memory(model, load, config_only=True)
    plan = planned.plan
    plan.check()  # a budget that cannot hold the resident path: one line with the numbers, exit 1
    ui = UI()
    note = dtype_note(load.dtype, planned)
    threads = load.cpu_threads or torch.get_num_threads()  # what a run with these flags computes with
    if json_out:
        out = {"model": planned.model_dir.name, **plan_json(plan), "cpu_threads": threads, "dtype_note": note}
        ui.json_line(out)
    else:
        from ..plan.table import plan_rows

        source = "--cpu-threads" if load.cpu_threads else "torch's default; decode steps measure 1 to it"
        rows = plan_rows(plan, threads, source)
        ui.table(rows, title=f"memory plan for {planned.model_dir.name}", stdout=True)
    if note:
        ui.note("note: " + note)


def dtype_note(requested: str, planned: Planned) -> str | None:
    """Why auto planned float32 for a bfloat16 checkpoint (a CPU without native bf16), else None."""
    import torch

    from ..plan.cpu_features import NO_BF16_NOTE, cpu_has_native_bf16
    from ..plan.device import declared_dtype

    plan = planned.plan
    if requested != "auto" or plan.dtype != torch.float32 or torch.device(plan.device).type != "cpu":
        return None
    if cpu_has_native_bf16() is not False or declared_dtype(planned.cfg) != torch.bfloat16:
        return None
    return NO_BF16_NOTE


@flag_groups
def bench(
    model: Model,
    load: EngineOptions,
    prompt_tokens: Annotated[int, typer.Option("--prompt-tokens", min=1, help="Prompt length.")] = 512,
    new_tokens: Annotated[int, typer.Option("--new-tokens", min=1, help="Tokens to decode.")] = 64,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the prompt ids.")] = 0,
    profile: Annotated[
        bool,
        typer.Option(
            "--profile",
            help="Also count kernel-launching ops and host reads (syncs on a GPU) per decode token.",
        ),
    ] = False,
    json_out: JsonOut = False,
) -> None:
    """Time a fixed workload under the budget flags.

    The workload is --prompt-tokens seeded prompt ids, then exactly --new-tokens greedy tokens. The
    result gives prefill and decode speed, time to first token, cache hits and misses per tier, bytes
    read per token and peak memory.
    """
    from ..runtime.benchmark import check_workload, run_benchmark

    load.image_paths = ()  # a text workload: nothing reserved for images
    check_load_flags(load)
    if load.ctx is not None:  # before the load; the model's cap is checked after
        check_workload(prompt_tokens, new_tokens, load.ctx)
    ui = UI()
    # Without --ctx the KV reserve is the workload's, not 32K: the rest of the budget goes to experts.
    engine, load_s = timed_load(ui, model, replace(load, context=prompt_tokens + new_tokens + 1))
    with ui.phase_progress() as on_progress:
        result = run_benchmark(
            engine, prompt_tokens, new_tokens, seed=seed, profile=profile, on_progress=on_progress
        )
    result["load_s"] = load_s
    if json_out:
        ui.json_line(result)
        return
    bf16 = {True: "native bf16", False: "no native bf16", None: "bf16 support unknown"}
    rows = [
        ("model", f"{result['model']} ({result['device']}, {result['dtype']})"),
        (
            "CPU",
            f"{result['cpu']} ({bf16[result['cpu_native_bf16']]}, {plural(result['cpu_threads'], 'thread')})",
        ),
    ]
    if result.get("decode_threads") is not None:
        rows.append(("decode threads", f"{result['decode_threads']} (chosen by measuring the steps)"))
    if plan := result.get("plan"):
        slots = f"{plan['cpu_slots']} RAM" + (
            f", {plan['gpu_slots']} GPU" if result["device"] == "cuda" else ""
        )
        rows.append(("expert slots per layer", f"{slots} of {plan['experts']}"))
    if rates := result.get("expert_rates"):
        rows.append(
            (
                "GPU misses",
                f"computed by the {'CPU' if rates['gpu_misses_computed_by'] == 'cpu' else 'GPU after a copy'}"
                f" (measured: CPU {rates['cpu_ms_per_expert']:g} ms, copy {rates['copy_ms_per_expert']:g} ms"
                " an expert)",
            )
        )
    if prof := result.get("profile"):
        rows.append(
            (
                "per decode token",
                f"{prof['ops_per_token']:g} kernel-launching ops ({prof['ops_per_layer']:g} a layer), "
                f"{prof['host_reads_per_token']:g} host reads ({prof['host_reads_per_layer']:g} a layer)",
            )
        )
    ui.table(rows + reply_rows(result), title="bench", stdout=True)


def plan_json(plan: MemoryPlan) -> dict:
    """The plan's figures in bytes and counts (the `info --json` object)."""
    from ..plan.table import expert_split

    disk, to_gpu = plan.bytes_per_token()
    return {
        "device": plan.device,
        "dtype": str(plan.dtype).removeprefix("torch."),
        "cpu_budget": plan.cpu_budget,
        "cpu_budget_from": plan.cpu_budget_from,
        "gpu_budget": plan.gpu_budget if plan.on_gpu else None,
        "weights_cpu": plan.weights_cpu,
        "weights_gpu": plan.weights_gpu,
        "resident_by_format": plan.resident_by_format,
        "cpu_layers": plan.cpu_layers,
        "vision_bytes": plan.vision_bytes,
        "image_bytes": plan.image_bytes,
        "kv_bytes_per_token": plan.kv_per_token,
        "context": plan.context,
        "context_from": plan.context_from,
        "kv_bytes": plan.kv_bytes,
        "context_fit": plan.context_fit,
        "deltanet_state_bytes": plan.state_bytes,
        "activation_bytes": plan.activations,
        "expert_disk_bytes": plan.expert_disk_bytes,
        "expert_format": plan.expert_format,
        "prefill_block": plan.prefill_block,
        "expert_slot_bytes": plan.slot_bytes,
        "experts": plan.cfg.num_experts if plan.moe_layers else 0,
        "moe_layers": plan.moe_layers,
        "cpu_slots": plan.cpu_slots,
        "gpu_slots": plan.gpu_slots,
        "disk_bytes_per_token": disk,
        "gpu_bytes_per_token": to_gpu,
        "expert_split": expert_split(plan) if plan.on_gpu and plan.moe_layers else None,
        "cpu_total": plan.cpu_total,
        "gpu_total": plan.gpu_total,
    }
