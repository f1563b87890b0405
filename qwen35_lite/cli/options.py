"""Options shared by `run`, `chat` (and `info`/`bench`), and what they turn into: the engine load options,
the expert provider for the budget flags, and the chat settings over the checkpoint's defaults.

Heavy modules (torch, the engine) are imported inside the functions, so `--help` and usage errors are instant.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer

from ..errors import InputError
from .ui import UI

if TYPE_CHECKING:
    from ..plan.load import Planned
    from ..plan.options import EngineOptions
    from ..runtime.engine import Engine
    from ..runtime.session import ChatSettings

# ---- the options ---------------------------------------------------------------------------------

SAMPLING, HARDWARE = "Sampling", "Device and memory"
MAX_TOOLS_BYTES = 8 << 20  # a few hundred tool schemas take well under 1 MiB
MAX_BUDGET_GIB = float(1 << 20)  # 1 PiB: past any machine, and far from float overflow in the plan

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
Frequency = Annotated[
    float | None,
    typer.Option(
        "--frequency-penalty", help="Penalty per time a token is in the reply.", rich_help_panel=SAMPLING
    ),
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
JsonSchema = Annotated[
    Path | None,
    typer.Option(
        "--json-schema",
        metavar="FILE",
        help="The answer must be JSON matching this JSON Schema file (enforced token by token; thinking"
        " stays free).",
        show_default=False,
    ),
]
Tools = Annotated[
    Path | None,
    typer.Option(
        "--tools",
        metavar="FILE",
        help='Tools the model may call: a JSON list of {"type": "function", "function": {...}} (OpenAI'
        " style), a regular file of at most 8 MiB; the calls in the reply are printed after it.",
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
VideoFps = Annotated[
    float | None,
    typer.Option(
        "--video-fps",
        metavar="FPS",
        help="Frames a second sampled from each --video (default: the checkpoint's video config, 2).",
        show_default=False,
    ),
]
MaxFrames = Annotated[
    int | None,
    typer.Option(
        "--max-frames",
        metavar="N",
        help="The most frames sampled from one --video (default: the checkpoint's video config, 768).",
        show_default=False,
    ),
]


def video_parts(paths: list[Path] | None, fps: float | None, max_frames: int | None, raw: bool) -> list:
    """--video paths as Video parts with the sampling flags; the flags checked (also without a video)."""
    from ..runtime.video import Video

    if fps is not None and not (math.isfinite(fps) and 0 < fps <= 1000):
        raise typer.BadParameter(
            "must be a number of frames a second above 0 (at most 1000)", param_hint="--video-fps"
        )
    if max_frames is not None and max_frames < 1:
        raise typer.BadParameter("must be 1 or more", param_hint="--max-frames")
    if paths and raw:
        raise typer.BadParameter("videos need the chat template, which --raw turns off", param_hint="--video")
    return [Video(str(p.expanduser()), fps, max_frames) for p in paths or []]


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
        help="Threads torch uses for CPU compute, every step. Default: torch's own count (usually one per"
        " physical core) for prefill, and decode steps measure fewer against it and keep the fastest (a busy"
        " machine's cores make a second thread wait).",
        rich_help_panel=HARDWARE,
    ),
]


# ---- option groups ---------------------------------------------------------------------------------
# A command declares `load: EngineOptions` and/or `reply: ReplyFlags`; `flag_groups` turns each into the
# flags below (one Typer option per field) and builds the dataclass back from them on every call, so the
# flags are declared once here and the fields once in their dataclasses.

LOAD_OPTIONS: dict[str, Any] = {
    "device": Device,
    "dtype": Dtype,
    "ctx": Ctx,
    "offline": Offline,
    "gpu_mem": GpuMem,
    "cpu_mem": CpuMem,
    "gpu_experts": GpuExperts,
    "cpu_compute": CpuCompute,
    "cpu_experts": CpuExperts,
    "cpu_threads": CpuThreads,
}  # EngineOptions fields without a flag here (context, state_cache) are set by the command itself
SAMPLING_OPTIONS: dict[str, Any] = {
    "temperature": Temperature,
    "top_p": TopP,
    "top_k": TopK,
    "min_p": MinP,
    "presence_penalty": Presence,
    "frequency_penalty": Frequency,
    "repetition_penalty": Repetition,
    "seed": Seed,
}  # one flag per SamplingParams field (sampling.SAMPLING_KEYS; a test checks they agree)


@dataclass
class ReplyFlags:
    """How `run` and `chat` reply: the template's inputs, thinking, and sampling over the checkpoint's
    defaults (`sampling`: only the flags that were given)."""

    system: str | None = None
    raw: bool = False
    max_new_tokens: int | None = None
    think: bool = True
    hide_thinking: bool = False
    tools: Path | None = None
    json_schema: Path | None = None
    sampling: dict[str, Any] = field(default_factory=dict)


REPLY_OPTIONS: dict[str, Any] = {
    "system": System,
    "raw": Raw,
    "max_new_tokens": MaxNew,
    "think": Think,
    "hide_thinking": HideThinking,
    "tools": Tools,
    "json_schema": JsonSchema,
}


def _load_group() -> tuple[list[inspect.Parameter], Callable[[dict[str, Any]], Any]]:
    from ..plan.options import EngineOptions

    defaults = {f.name: f.default for f in fields(EngineOptions)}
    params = [_param(name, kind, defaults[name]) for name, kind in LOAD_OPTIONS.items()]
    return params, lambda values: EngineOptions(**values)


def _reply_group() -> tuple[list[inspect.Parameter], Callable[[dict[str, Any]], Any]]:
    defaults = {f.name: f.default for f in fields(ReplyFlags) if f.name != "sampling"}
    params = [_param(name, kind, defaults[name]) for name, kind in REPLY_OPTIONS.items()]
    params += [_param(name, kind, None) for name, kind in SAMPLING_OPTIONS.items()]

    def build(values: dict[str, Any]) -> ReplyFlags:
        sampling = {k: v for k in SAMPLING_OPTIONS if (v := values.pop(k)) is not None}
        return ReplyFlags(**values, sampling=sampling)

    return params, build


# ---- MCP tools (runtime/mcp.py, runtime/tool_loop.py) ------------------------------------------------
TOOLS_PANEL = "Tools (MCP)"
Mcp = Annotated[
    Path | None,
    typer.Option(
        "--mcp",
        metavar="FILE",
        envvar="QWEN35_LITE_MCP",
        help='MCP servers whose tools the model may call: {"mcpServers": {"NAME": {"command", "args", "env"}'
        ' | {"url"}}}. Each call is shown and asked for before it runs.',
        show_default=False,
        rich_help_panel=TOOLS_PANEL,
    ),
]
Yes = Annotated[
    bool,
    typer.Option("--yes", "-y", help="Run every MCP tool call without asking.", rich_help_panel=TOOLS_PANEL),
]
MaxToolRounds = Annotated[
    int,
    typer.Option(
        "--max-tool-rounds",
        min=0,
        help="Rounds of tool calls one message may lead to.",
        rich_help_panel=TOOLS_PANEL,
    ),
]
ToolTimeout = Annotated[
    float,
    typer.Option(
        "--tool-timeout",
        min=0.1,
        help="Seconds an MCP tool call (or a server's start) may take.",
        rich_help_panel=TOOLS_PANEL,
    ),
]


@dataclass
class AgentFlags:
    """MCP servers for the model's tool calls, and how their calls are approved and bounded."""

    mcp: Path | None = None
    yes: bool = False
    max_tool_rounds: int = 8
    tool_timeout: float = 60.0


AGENT_OPTIONS: dict[str, Any] = {
    "mcp": Mcp,
    "yes": Yes,
    "max_tool_rounds": MaxToolRounds,
    "tool_timeout": ToolTimeout,
}


def _agent_group() -> tuple[list[inspect.Parameter], Callable[[dict[str, Any]], Any]]:
    defaults = {f.name: f.default for f in fields(AgentFlags)}
    params = [_param(name, kind, defaults[name]) for name, kind in AGENT_OPTIONS.items()]
    return params, lambda values: AgentFlags(**values)


GROUPS = {"load": _load_group, "reply": _reply_group, "agent": _agent_group}


def _param(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)


def flag_groups(fn: Callable[..., None]) -> Callable[..., None]:
    """A command whose `load` / `reply` parameters are expanded into their flags for Typer, and rebuilt
    into `EngineOptions` / `ReplyFlags` when it runs."""
    sig = inspect.signature(fn)
    params, builders = [], {}
    for p in sig.parameters.values():
        if p.name in GROUPS:  # its annotation names the dataclass; only its fields' flags are read
            group, builders[p.name] = GROUPS[p.name]()
            params += group
        else:
            kind = eval(p.annotation, fn.__globals__) if isinstance(p.annotation, str) else p.annotation
            params.append(p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=kind))
    names = {name: [q.name for q in GROUPS[name]()[0]] for name in builders}

    @functools.wraps(fn)
    def command(**values: Any) -> None:
        for name, build in builders.items():
            values[name] = build({k: values.pop(k) for k in names[name]})
        return fn(**values)

    command.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    del command.__wrapped__  # Typer must read the expanded signature, not fn's
    return command


# ---- loading ---------------------------------------------------------------------------------------


def plan_memory(model: str, load: EngineOptions, config_only: bool = False) -> Planned:
    """Resolve --model and plan memory from config.json and the safetensors headers (nothing heavy)."""
    from ..plan.load import plan_load

    return plan_load(model, load, config_only)


def load_engine(ui: UI, model: str, load: EngineOptions) -> Engine:
    """Plan memory, refuse a budget that cannot hold the run, then load under the plan, with progress bars."""
    from ..runtime.engine import Engine

    with ui.load_progress() as on_progress:
        return Engine.load(model, load, on_progress=on_progress)


def check_flags(flags: ReplyFlags) -> None:
    """Reject bad flag values before the (slow) load, as usage errors (exit 2)."""
    from ..runtime.settings import check_setting

    if flags.raw and flags.system:
        raise typer.BadParameter("--system has no effect with --raw", param_hint="--system")
    if flags.raw and flags.tools:
        raise typer.BadParameter("tools need the chat template, which --raw turns off", param_hint="--tools")
    given = {**flags.sampling, "max_new_tokens": flags.max_new_tokens}
    for key, value in given.items():
        if value is not None:
            try:
                check_setting(key, value)
            except InputError as e:
                raise typer.BadParameter(e.message, param_hint="--" + key.replace("_", "-")) from None


def check_load_flags(flags: EngineOptions, planning: bool = False) -> None:
    """Reject memory budgets that are no size, and GPU flags on a run that has no GPU, before the load.

    planning: `info`, which may plan for a GPU this machine lacks when --device cuda names one.
    """
    for name, value in (("--cpu-mem", flags.cpu_mem), ("--gpu-mem", flags.gpu_mem)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise typer.BadParameter(
                f"{value:g} is not a size; give GiB above 0 (e.g. {name} 8)", param_hint=name
            )
        if value is not None and value > MAX_BUDGET_GIB:
            raise typer.BadParameter(
                f"{value:g} GiB is more than any machine has (at most {MAX_BUDGET_GIB:.0f} GiB, 1 PiB);"
                f" give the GiB to use (e.g. {name} 8), or leave it out for what is available",
                param_hint=name,
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


def chat_settings(
    engine: Engine, flags: ReplyFlags, schema: dict | None = None, tools: list[dict] | None = None
) -> ChatSettings:
    """Checkpoint defaults, overridden by every flag that was given. schema (read_json_schema): the answer
    must be JSON of it, or, with tools, JSON of it or tool calls."""
    from ..runtime.constrain import json_grammar, tool_grammar
    from ..runtime.session import ChatSettings

    think = "hide" if flags.think and flags.hide_thinking else "on" if flags.think else "off"
    grammar = None
    if schema is not None:
        special = engine.tokenizer.token_id
        grammar = tool_grammar(tools, special, content_schema=schema) if tools else json_grammar(schema)
    return ChatSettings(
        params=replace(engine.defaults.params, **flags.sampling),
        max_new_tokens=flags.max_new_tokens or engine.defaults.max_new_tokens,
        think=think,
        system=flags.system,
        raw=flags.raw,
        grammar=grammar,
    )


def read_json_schema(path: Path | None) -> dict | None:
    """The --json-schema file, read and checked before the (slow) load; one error line says what is
    wrong (unreadable, not JSON, not a schema the grammar engine can enforce)."""
    from ..runtime.constrain import SCHEMA_HINT, check_schema
    from ..runtime.user_files import read_user_file

    if path is None:
        return None
    raw = read_user_file(path, "the JSON schema file", MAX_TOOLS_BYTES, "pass a JSON Schema file")
    try:
        schema = json.loads(raw)
    except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, nested too deeply
        raise InputError(f"{path} is not JSON: {e}", SCHEMA_HINT) from None
    return check_schema(schema, str(path))


def read_tools(path: Path | None) -> list[dict] | None:
    """The --tools file, read and checked before the (slow) load: one error line says what is wrong."""
    from ..runtime.user_files import read_user_file
    from ..text.tool_calls import TOOLS_HINT, check_tools

    if path is None:
        return None
    raw = read_user_file(path, "the tools file", MAX_TOOLS_BYTES, "pass the JSON file that lists the tools")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, nested too deeply
        raise InputError(f"{path} is not JSON: {e}", TOOLS_HINT) from None
    return check_tools(data, str(path))


def timed_load(ui: UI, model: str, load: EngineOptions) -> tuple[Engine, float]:
    """load_engine, and the seconds it took (the progress bars vanish, so the stats carry the figure)."""
    start = time.perf_counter()
    engine = load_engine(ui, model, load)
    return engine, round(time.perf_counter() - start, 2)
