"""Options shared by `run`, `chat` (and `info`/`bench`), and what they turn into: the engine load options,
the expert provider for the budget flags, and the chat settings over the checkpoint's defaults.

Heavy modules (torch, the engine) are imported inside the functions, so `--help` and usage errors are instant.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer

from ..errors import InputError
from .ui import UI

if TYPE_CHECKING:
    from ..engine import Engine, EngineOptions
    from ..plan.load import Planned
    from ..session import ChatSettings

# ---- the options ---------------------------------------------------------------------------------

SAMPLING, HARDWARE = "Sampling", "Device and memory"

Model = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        envvar="QWEN35_LITE_MODEL",
        help="Checkpoint directory or hub id.",
        show_default=False,
    ),
]
System = Annotated[str | None, typer.Option("--system", "-s", help="System prompt.")]
Raw = Annotated[bool, typer.Option("--raw", help="No chat template: the text is tokenised as is.")]
MaxNew = Annotated[
    int | None,
    typer.Option(
        "--max-new-tokens",
        "-n",
        help="Reply length cap (default: the checkpoint's, else 2048).",
        rich_help_panel=SAMPLING,
    ),
]
Temperature = Annotated[
    float | None,
    typer.Option(
        "--temperature", "-t", help="0 = greedy (default: generation_config.json).", rich_help_panel=SAMPLING
    ),
]
TopP = Annotated[
    float | None, typer.Option("--top-p", help="Nucleus sampling mass.", rich_help_panel=SAMPLING)
]
TopK = Annotated[
    int | None,
    typer.Option("--top-k", help="Keep the k likeliest tokens (0 = all).", rich_help_panel=SAMPLING),
]
MinP = Annotated[
    float | None,
    typer.Option("--min-p", help="Drop tokens below min-p × the top probability.", rich_help_panel=SAMPLING),
]
Presence = Annotated[
    float | None,
    typer.Option("--presence-penalty", help="Penalty on tokens of the reply.", rich_help_panel=SAMPLING),
]
Repetition = Annotated[
    float | None,
    typer.Option(
        "--repetition-penalty", help="Penalty on every token seen (1 = none).", rich_help_panel=SAMPLING
    ),
]
Seed = Annotated[
    int | None,
    typer.Option(
        "--seed",
        help="Seed for reproducible sampling (on one device: a GPU and a CPU draw differently).",
        rich_help_panel=SAMPLING,
    ),
]
Tools = Annotated[
    Path | None,
    typer.Option(
        "--tools",
        metavar="FILE",
        help='Tools the model may call: a JSON list of {"type": "function", "function": {...}} (OpenAI'
        " style); the calls in the reply are printed after it.",
        show_default=False,
    ),
]
Think = Annotated[bool, typer.Option("--think/--no-think", help="Let the model think first.")]
HideThinking = Annotated[
    bool, typer.Option("--hide-thinking", help="The model still thinks; none of it is shown.")
]
Device = Annotated[
    str,
    typer.Option(
        "--device", envvar="QWEN35_LITE_DEVICE", help="auto, cpu, cuda or cuda:N.", rich_help_panel=HARDWARE
    ),
]
Dtype = Annotated[
    Literal["auto", "bfloat16", "float32", "float16"],
    typer.Option(
        "--dtype",
        envvar="QWEN35_LITE_DTYPE",
        help="Compute dtype (auto = the checkpoint's).",
        rich_help_panel=HARDWARE,
    ),
]
Ctx = Annotated[
    int | None,
    typer.Option(
        "--ctx",
        envvar="QWEN35_LITE_CTX",
        min=2,
        help="Maximum context in tokens (default: 32768, or the longest the memory budget holds).",
        rich_help_panel=HARDWARE,
    ),
]
Offline = Annotated[
    bool,
    typer.Option(
        "--offline", help="Never touch the network (also HF_HUB_OFFLINE=1).", rich_help_panel=HARDWARE
    ),
]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No stats line.")]
# Memory budgets: the plan (plan.MemoryPlan) fits everything into them; expert slots get what is left.
GpuMem = Annotated[
    float | None,
    typer.Option(
        "--gpu-mem",
        help="GPU memory budget, GiB: caps all the process holds there (weights, KV cache, DeltaNet state,"
        " expert cache, buffers). Default: free GPU memory minus a margin.",
        rich_help_panel=HARDWARE,
    ),
]
CpuMem = Annotated[
    float | None,
    typer.Option(
        "--cpu-mem",
        help="RAM budget, GiB: caps all the process holds in RAM (weights, KV cache and DeltaNet state on a"
        " CPU run, expert cache, buffers, runtime). Default: available RAM minus a margin.",
        rich_help_panel=HARDWARE,
    ),
]
GpuExperts = Annotated[
    int | None,
    typer.Option("--gpu-experts", min=1, help="GPU expert slots per layer.", rich_help_panel=HARDWARE),
]
CpuExperts = Annotated[
    int | None,
    typer.Option("--cpu-experts", min=1, help="RAM expert slots per layer.", rich_help_panel=HARDWARE),
]
CpuCompute = Annotated[
    Literal["auto", "on", "off"],
    typer.Option(
        "--cpu-compute",
        help="GPU runs: a decode step's experts missing on the GPU are computed by the CPU from RAM while"
        " the GPU computes its own (on), or copied to the GPU first (off); auto: whichever the CPU and PCIe"
        " rates measured at load favour.",
        rich_help_panel=HARDWARE,
    ),
]
CpuThreads = Annotated[
    int | None,
    typer.Option(
        "--cpu-threads",
        min=1,
        help="Threads torch uses for CPU compute (default: torch's own, usually one per physical core).",
        rich_help_panel=HARDWARE,
    ),
]


@dataclass
class LoadFlags:
    model: str
    device: str = "auto"
    dtype: str = "auto"
    ctx: int | None = None
    offline: bool = False
    gpu_mem: float | None = None
    cpu_mem: float | None = None
    gpu_experts: int | None = None
    cpu_experts: int | None = None
    cpu_threads: int | None = None
    cpu_compute: str = "auto"
    state_cache: float | None = 0.0  # serve only (None: a share of what the budget leaves)
    image_paths: tuple[Path, ...] | None = None  # run: its images, () for none; None: chat, serve, info


@dataclass
class ReplyFlags:
    system: str | None = None
    raw: bool = False
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    think: bool = True
    hide_thinking: bool = False
    tools: Path | None = None


def pick(cls: type, values: dict[str, Any]) -> Any:
    """Build a flags dataclass from a command's locals() (its parameters are exactly the options)."""
    return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})


# ---- loading ---------------------------------------------------------------------------------------


def engine_options(flags: LoadFlags, context: int | None = None) -> EngineOptions:
    """The engine's load options for these flags; `context`: the workload's, used when --ctx is not given."""
    from ..engine import EngineOptions

    return EngineOptions(
        **{f.name: getattr(flags, f.name) for f in fields(LoadFlags) if f.name != "model"}, context=context
    )


def plan_memory(flags: LoadFlags, context: int | None = None, config_only: bool = False) -> Planned:
    """Resolve --model and plan memory from config.json and the safetensors headers (nothing heavy)."""
    from ..plan.load import plan_load

    return plan_load(flags.model, engine_options(flags, context), config_only)


def load_engine(ui: UI, flags: LoadFlags, context: int | None = None) -> Engine:
    """Plan memory, refuse a budget that cannot hold the run, then load under the plan, with progress bars."""
    from ..engine import Engine

    with ui.load_progress() as on_progress:
        return Engine.load(flags.model, engine_options(flags, context), on_progress=on_progress)


def check_flags(flags: ReplyFlags) -> None:
    """Reject bad flag values before the (slow) load, as usage errors (exit 2)."""
    from .chat_repl import SETTINGS, check_setting

    if flags.raw and flags.system:
        raise typer.BadParameter("--system has no effect with --raw", param_hint="--system")
    if flags.raw and flags.tools:
        raise typer.BadParameter("tools need the chat template, which --raw turns off", param_hint="--tools")
    for key in SETTINGS:
        value = getattr(flags, key)
        if value is not None:
            try:
                check_setting(key, value)
            except InputError as e:
                raise typer.BadParameter(e.message, param_hint="--" + key.replace("_", "-")) from None


def check_load_flags(flags: LoadFlags, planning: bool = False) -> None:
    """Reject memory budgets that are no size, and GPU flags on a run that has no GPU, before the load.

    planning: `info`, which may plan for a GPU this machine lacks when --device cuda names one.
    """
    for name, value in (("--cpu-mem", flags.cpu_mem), ("--gpu-mem", flags.gpu_mem)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise typer.BadParameter(
                f"{value:g} is not a size; give GiB above 0 (e.g. {name} 8)", param_hint=name
            )
    check_cpu_threads(flags.cpu_threads)
    gpu_flags = [
        n
        for n, v in (
            ("--gpu-mem", flags.gpu_mem),
            ("--gpu-experts", flags.gpu_experts),
            ("--cpu-compute", flags.cpu_compute != "auto"),
        )
        if v
    ]
    if gpu_flags and not _runs_on_gpu(flags.device):
        raise InputError(
            f"{' and '.join(gpu_flags)} {'apply' if len(gpu_flags) > 1 else 'applies'} to a GPU, but"
            f" {_why_cpu(flags.device)}",
            "drop it, or use --device cuda on a machine with a GPU"
            + (" (info --device cuda plans for one anywhere)" if planning else ""),
        )


def check_cpu_threads(threads: int | None) -> None:
    """More threads than CPUs only makes them wait for each other: refuse it, naming the count."""
    cpus = os.cpu_count()
    if threads is not None and cpus is not None and threads > cpus:
        raise typer.BadParameter(
            f"{threads} is more than the {cpus} CPUs this machine has; give 1 to {cpus}",
            param_hint="--cpu-threads",
        )


def _runs_on_gpu(device: str) -> bool:
    # --device cuda on a machine without one: pick_device refuses it in its own words (info plans for it)
    return device.startswith("cuda") or (device == "auto" and _cuda_visible())


def _cuda_visible() -> bool:
    import torch

    return torch.cuda.is_available()


def _why_cpu(device: str) -> str:
    return (
        "--device cpu runs on the CPU" if device == "cpu" else "no CUDA GPU is visible (this runs on the CPU)"
    )


def chat_settings(engine: Engine, flags: ReplyFlags) -> ChatSettings:
    """Checkpoint defaults, overridden by every flag that was given."""
    from ..session import ChatSettings

    keys = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "repetition_penalty", "seed")
    overrides = {k: getattr(flags, k) for k in keys if getattr(flags, k) is not None}
    think = "hide" if flags.think and flags.hide_thinking else "on" if flags.think else "off"
    return ChatSettings(
        params=replace(engine.defaults.params, **overrides),
        max_new_tokens=flags.max_new_tokens or engine.defaults.max_new_tokens,
        think=think,
        system=flags.system,
        raw=flags.raw,
    )


def read_tools(path: Path | None) -> list[dict] | None:
    """The --tools file, read and checked before the (slow) load: one error line says what is wrong."""
    from ..tool_calls import TOOLS_HINT, check_tools

    if path is None:
        return None
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"no such file: {path}", "pass the JSON file that lists the tools") from None
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the name
        reason = getattr(e, "strerror", None) or str(e)
        raise InputError(f"cannot read {path}: {reason}", "check the path and its permissions") from None
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, nested too deeply
        raise InputError(f"{path} is not JSON: {e}", TOOLS_HINT) from None
    return check_tools(data, str(path))


def timed_load(ui: UI, load: LoadFlags, context: int | None = None) -> tuple[Engine, float]:
    """load_engine, and the seconds it took (the progress bars vanish, so the stats carry the figure)."""
    start = time.perf_counter()
    engine = load_engine(ui, load, context)
    return engine, round(time.perf_counter() - start, 2)
