"""The `qwen35-lite` command line: run (one shot), chat (interactive), make-checkpoint (random weights).

Every user-caused failure is a Qwen35Error and ends as one `error:` line plus a `hint:` line, exit code 1;
usage errors (a bad flag value, a missing argument) print the same two lines and exit 2 (cli/help.py).
Anything else is our bug and keeps its traceback.
"""

from __future__ import annotations

import contextvars
import io
import shutil
import sys
from pathlib import Path
from typing import Annotated, Literal

import typer
from typer.core import TyperCommand

from .. import __version__
from ..errors import InputError
from ..plan.options import EngineOptions
from .errors import EXIT_INTERRUPTED, friendly_errors
from .help import install as install_help
from .options import (
    AgentFlags,
    MaxFrames,
    Model,
    Quiet,
    ReplyFlags,
    VideoFps,
    chat_settings,
    check_flags,
    check_load_flags,
    flag_groups,
    read_json_schema,
    read_tools,
    timed_load,
    video_parts,
)
from .ui import UI, format_stats, human_bytes, plural

install_help()

app = typer.Typer(
    name="qwen35-lite",
    help="Run Qwen3.5 mixture-of-experts models exactly, on one GPU plus CPU RAM plus NVMe.",
    invoke_without_command=True,  # bare `qwen35-lite` shows the help and exits 0 (main below), as git does
    pretty_exceptions_enable=False,  # our bugs print a plain traceback, without dumping tensors as locals
    context_settings={"help_option_names": ["-h", "--help"]},
)


def version() -> str:
    """The installed package's version (its metadata), else the source tree's."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("qwen35-lite")
    except PackageNotFoundError:
        return __version__


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"qwen35-lite {version()}")
        raise typer.Exit()


@app.callback()
def main_options(
    ctx: typer.Context,
    show_version: Annotated[
        bool,
        typer.Option("--version", "-V", callback=_print_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Run Qwen3.5 mixture-of-experts models exactly, on one GPU plus CPU RAM plus NVMe."""
    if ctx.invoked_subcommand is None:
        if text := ctx.get_help():  # rich help prints itself and returns ""
            typer.echo(text)
        raise typer.Exit()


# ---- run ---------------------------------------------------------------------------------------------


def read_prompt(ui: UI, words: list[str]) -> str:
    """The prompt: the words of the command line joined with spaces, or stdin for `-`.

    Bytes that are not UTF-8 (in an argument or piped in) become U+FFFD instead of failing in the
    tokenizer. A piped prompt loses its trailing newline and spaces, as with ollama.
    """
    from ..text.tokenizer import as_valid_text

    if words == ["-"]:
        if sys.stdin.isatty():
            ui.info("(type the prompt, then Ctrl+D)")
        text = read_stdin().rstrip()
    else:
        text = " ".join(words)
    if not text.strip():
        raise InputError("the prompt is empty", "pass the prompt as an argument, or pipe it in with -")
    return as_valid_text(text)


def read_stdin() -> str:
    stream = getattr(sys.stdin, "buffer", None)
    if stream is None:  # a text-only stream (tests, embedding)
        return sys.stdin.read()
    return stream.read().decode("utf-8", errors="replace")


MEDIA_ORDER: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("media_order", default=None)


class MediaOrderCommand(TyperCommand):
    """Keeps the command line's order of --image and --video, which click's per-option lists lose."""

    def parse_args(self, ctx, args):
        _, _, order = self.make_parser(ctx).parse_args(args=list(args))  # no side effects: parsed again below
        MEDIA_ORDER.set([p.name for p in order if p.name in ("image", "video")])
        return super().parse_args(ctx, args)


def ordered_media(images: list[Path], videos: list, order: list[str] | None) -> list:
    """--image and --video values interleaved as they were typed (images first without an order)."""
    if not order or len(order) != len(images) + len(videos):
        return [*images, *videos]
    its = {"image": iter(images), "video": iter(videos)}
    return [next(its[name]) for name in order]


@app.command(cls=MediaOrderCommand)
@friendly_errors
@flag_groups
def run(
    prompt: Annotated[
        list[str],
        typer.Argument(
            metavar="PROMPT",
            help="The prompt (several words are joined with spaces); - reads it from stdin.",
            show_default=False,
        ),
    ],
    model: Model,
    load: EngineOptions,
    reply: ReplyFlags,
    agent: AgentFlags,
    json_out: Annotated[
        bool, typer.Option("--json", help="One JSON object on stdout, nothing streamed.")
    ] = False,
    quiet: Quiet = False,
    image: Annotated[
        list[Path] | None,
        typer.Option(
            "--image",
            "-i",
            metavar="PATH",
            help="An image to show the model, before the prompt text (repeat for several, in order).",
            show_default=False,
        ),
    ] = None,
    video: Annotated[
        list[Path] | None,
        typer.Option(
            "--video",
            metavar="PATH",
            help="A video clip to show the model (MP4, MOV, MKV, WebM; repeat for several; mixes with"
            " --image in the order given).",
            show_default=False,
        ),
    ] = None,
    video_fps: VideoFps = None,
    max_frames: MaxFrames = None,
) -> None:
    """Answer one prompt: the answer alone on stdout; thinking and stats on stderr."""
    from ..runtime.session import ChatSession
    from .chat_repl import stream_reply

    check_flags(reply)
    check_load_flags(load)
    images = list(image or [])
    if images and reply.raw:
        raise typer.BadParameter("images need the chat template, which --raw turns off", param_hint="--image")
    videos = video_parts(video, video_fps, max_frames, reply.raw)
    ui = UI(quiet=quiet or json_out)
    text = read_prompt(ui, prompt)
    tool_list = read_tools(reply.tools)
    schema = read_json_schema(reply.json_schema)
    servers = _read_servers(agent, reply.raw)
    if images:
        from ..runtime.multimodal import check_images

        check_images(images)  # a wrong path fails now, not after loading the model (decoded after it)
    if videos:
        from ..runtime.multimodal import check_videos

        check_videos(videos, model if Path(model).is_dir() else None)  # metadata only, before the load
    # The plan reserves what the images take, and nothing without any; with videos it reserves the tower
    # (None: media may come), and a clip's decoding takes its room when it comes (multimodal.room_for_images).
    load.image_paths = tuple(images) if not videos else None
    media = ordered_media(images, videos, MEDIA_ORDER.get())
    engine, load_s = timed_load(ui, model, load)
    session = ChatSession(engine, chat_settings(engine, reply, schema, tool_list), tools=tool_list)
    show = session.settings.think == "on"
    if servers is not None:
        done, answer, extra = _run_with_tools(
            ui, session, agent, servers, text, media, show, json_out, prompt
        )
    else:
        done = stream_reply(ui, session, text, show_thinking=show, printing=not json_out, images=media)
        answer, extra = session.last_reply, {}
    done.stats["load_s"] = load_s
    if json_out:
        ui.json_line(
            {
                "text": answer.text,
                "thinking": answer.thinking if show else "",
                "tokens": answer.tokens,
                "prompt_ids": answer.prompt_ids,
                "finish_reason": answer.finish_reason,
                "tool_calls": [
                    {"id": c.id, "name": c.name, "arguments": c.arguments} for c in answer.tool_calls
                ],
                **extra,
                "stats": done.stats,
            }
        )
    else:
        ui.stats_line(format_stats(done.stats, engine.max_context, done.reason))
    if done.reason == "cancelled":
        raise typer.Exit(EXIT_INTERRUPTED)


def _read_servers(agent: AgentFlags, raw: bool):
    """The --mcp file's servers (None without --mcp); the MCP modules are imported only for it."""
    if agent.mcp is None:
        return None
    from .agent import read_servers

    return read_servers(agent, raw)


def _run_with_tools(ui, session, agent, servers, text, images, show, json_out, words):
    """`run --mcp`: the tool rounds of one prompt; approval on the terminal unless --yes (without a terminal
    to ask on, calls are refused). Returns the last reply's Finished, that reply, and the JSON's extra keys:
    `transcript` (every call, its approval and its result) and `rounds`."""
    from .agent import Agent, ask_approval, refuse_all, terminal_line

    can_ask = sys.stdin.isatty() and words != ["-"]
    approve = ask_approval(ui, terminal_line(ui)) if can_ask else refuse_all(ui)
    with Agent.started(ui, agent, servers, session, approve) as tools:
        done = tools.stream(text, images, show_thinking=show, printing=not json_out, round_stats=False)
        first = session.messages.index(next(m for m in session.messages if m["role"] == "user"))
        rounds = sum(1 for m in session.messages[first:] if m["role"] == "assistant")
        transcript = [r.as_json() for r in tools.loop.transcript]
        extra = {"prompt_ids": tools.first_prompt_ids, "transcript": transcript, "rounds": rounds}
    return done, session.last_reply, extra


# ---- chat --------------------------------------------------------------------------------------------


@app.command()
@friendly_errors
@flag_groups
def chat(
    model: Model,
    load: EngineOptions,
    reply: ReplyFlags,
    agent: AgentFlags,
    quiet: Quiet = False,
    video_fps: VideoFps = None,
    max_frames: MaxFrames = None,
) -> None:
    """Chat interactively (/help lists the commands; reads lines from a pipe too)."""
    from ..runtime.session import ChatSession
    from .chat_repl import Repl

    check_flags(reply)
    check_load_flags(load)
    video_parts(None, video_fps, max_frames, reply.raw)  # the flags checked before the load
    if isinstance(sys.stdin, io.TextIOWrapper):  # bytes that are not UTF-8 become U+FFFD, not an error
        sys.stdin.reconfigure(errors="replace")
    ui = UI(quiet=quiet)
    tool_list = read_tools(reply.tools)
    schema = read_json_schema(reply.json_schema)
    servers = _read_servers(agent, reply.raw)
    engine, load_s = timed_load(ui, model, load)
    session = ChatSession(engine, chat_settings(engine, reply, schema, tool_list), tools=tool_list)
    repl = Repl(ui, session)
    repl.video_sampling = (video_fps, max_frames)  # for /video
    if servers is None:
        _chat_loop(ui, repl, engine, session, tool_list, load_s)
        return
    from .agent import Agent, ask_approval

    with Agent.started(ui, agent, servers, session, ask_approval(ui, repl.read_line)) as repl.agent:
        _chat_loop(ui, repl, engine, session, tool_list, load_s)


def _chat_loop(ui: UI, repl, engine, session, tool_list, load_s: float) -> None:
    if repl.tty:
        m = engine.model
        ui.header(
            [
                f"qwen35-lite · {engine.model_dir.name} · {m.device.type} {str(m.dtype).removeprefix('torch.')}"
                f" · ctx {engine.max_context} · thinking {session.settings.think}"
                + (f" · {plural(len(session.tools), 'tool')}" if session.tools else "")
                + f" · loaded in {load_s:.1f} s",
                '/help for commands · """ for multi-line · Ctrl+C stops a reply · Ctrl+D leaves',
            ]
        )
    repl.run()


# ---- make-checkpoint -----------------------------------------------------------------------------------

SIZES: dict[str, dict[str, int]] = {
    "tiny": {},  # SyntheticSpec defaults: ~130 MB in bf16, mostly the 248k-row embedding and head
    "small": dict(
        hidden_size=256,
        num_hidden_layers=8,
        num_experts=32,
        num_experts_per_tok=4,
        moe_intermediate_size=256,
        shared_expert_intermediate_size=256,
        head_dim=64,
        linear_num_key_heads=4,
        linear_num_value_heads=8,
        linear_key_head_dim=32,
        linear_value_head_dim=32,
    ),
    "medium": dict(  # ~2 GB in bf16, 1.6 GB of it routed experts: enough to exercise offloading
        hidden_size=512,
        num_hidden_layers=16,
        num_experts=64,
        num_experts_per_tok=8,
        moe_intermediate_size=512,
        shared_expert_intermediate_size=512,
        num_attention_heads=8,
        head_dim=64,
        linear_num_key_heads=4,
        linear_num_value_heads=8,
        linear_key_head_dim=64,
        linear_value_head_dim=64,
    ),
}


@app.command("make-checkpoint")
@friendly_errors
def make_checkpoint(
    out: Annotated[Path, typer.Argument(help="Directory to write.", show_default=False)],
    size: Annotated[Literal["tiny", "small", "medium"], typer.Option(help="Preset.")] = "tiny",
    layers: Annotated[int | None, typer.Option(min=1, help="Decoder layers.")] = None,
    experts: Annotated[int | None, typer.Option(min=1, help="Routed experts per layer.")] = None,
    hidden: Annotated[int | None, typer.Option(min=8, help="Hidden size.")] = None,
    moe_intermediate: Annotated[int | None, typer.Option(min=1, help="Expert intermediate size.")] = None,
    top_k: Annotated[int | None, typer.Option(min=1, help="Experts per token.")] = None,
    layout: Annotated[Literal["fused", "per-expert"], typer.Option(help="Expert tensor layout.")] = "fused",
    fp8: Annotated[
        bool,
        typer.Option(
            "--fp8", help="Routed experts in block-128 FP8, per expert (the official FP8 release's layout)."
        ),
    ] = False,
    dtype: Annotated[Literal["bfloat16", "float32"], typer.Option(help="Stored dtype.")] = "bfloat16",
    shard_size_mb: Annotated[int, typer.Option(min=1, help="Shard size limit, MiB.")] = 2048,
    seed: Annotated[int, typer.Option(help="Weights seed.")] = 0,
    force: Annotated[
        bool,
        typer.Option("--force", help="Write into a non-empty directory (its old shards are removed first)."),
    ] = False,
) -> None:
    """Write a random-weight Qwen3.5-MoE checkpoint (real tokenizer and chat template) to try offline."""
    import torch

    from ..convert.synthetic import SyntheticSpec, write_checkpoint

    values = dict(SIZES[size])
    for key, value in (
        ("num_hidden_layers", layers),
        ("num_experts", experts),
        ("hidden_size", hidden),
        ("moe_intermediate_size", moe_intermediate),
        ("num_experts_per_tok", top_k),
    ):
        if value is not None:
            values[key] = value
    spec = SyntheticSpec(**values)
    if spec.num_experts_per_tok > spec.num_experts:
        raise typer.BadParameter(
            f"{spec.num_experts_per_tok} experts per token but only {spec.num_experts} experts",
            param_hint="--top-k",
        )
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} is a file, not a directory", "pick a new directory path")
    if out.exists() and any(out.iterdir()) and not force:
        raise InputError(
            f"{out} already exists and is not empty",
            "pick a new directory, or pass --force to replace the checkpoint in it",
        )
    check_room(out, spec, getattr(torch, dtype).itemsize, shard_size_mb << 20)
    ui = UI()
    created = not out.exists()
    try:
        with ui.count_progress("writing layers") as on_progress:
            write_checkpoint(
                out,
                spec,
                dtype=getattr(torch, dtype),
                fused=layout == "fused",
                fp8_experts=fp8,
                shard_bytes=shard_size_mb << 20,
                seed=seed,
                on_progress=on_progress,
            )
    except BaseException:
        if created:  # random weights, all of them ours: leave no half checkpoint (nor an empty directory)
            shutil.rmtree(out, ignore_errors=True)
        raise
    shards = sorted(out.glob("*.safetensors"))
    total = sum(p.stat().st_size for p in shards)
    ui.out.print(f"wrote {out} ({human_bytes(total)} in {plural(len(shards), 'shard')})", markup=False)
    ui.out.print(f"try:  qwen35-lite chat --model {out} --no-think --max-new-tokens 40", markup=False)


def check_room(out: Path, spec, dtype_size: int, shard_bytes: int) -> None:
    """Refuse, before anything is allocated or created, a checkpoint larger than the free disk space or one
    whose writing needs more RAM than is available, naming both figures."""
    import psutil

    from ..convert.synthetic import checkpoint_bytes, peak_ram_bytes

    disk = checkpoint_bytes(spec, dtype_size)
    where = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())
    free = _free_bytes(where)
    if free is not None and disk > free:
        raise InputError(
            f"this checkpoint would be {human_bytes(disk)}; {where} has {human_bytes(free)} free",
            "pick smaller --experts, --hidden, --layers or --moe-intermediate, or another directory",
        )
    ram, available = peak_ram_bytes(spec, dtype_size, shard_bytes), psutil.virtual_memory().available
    if ram > available:
        raise InputError(
            f"writing this checkpoint ({human_bytes(disk)}) needs about {human_bytes(ram)} of RAM;"
            f" {human_bytes(available)} is available",
            "pick smaller --experts, --hidden or --moe-intermediate (and --shard-size-mb)",
        )


def _free_bytes(path: Path) -> int | None:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None  # unknown: the write itself reports a full disk


# ---- info, bench (tools.py) -----------------------------------------------------------------------

from .quantize import register as _register_quantize  # noqa: E402  (`quantize`: quantize.py)
from .serve import register as _register_serve  # noqa: E402  (`serve`: serve.py)
from .tools import register as _register_tools  # noqa: E402  (`info`, `bench`: tools.py)

_register_tools(app)
_register_quantize(app)
_register_serve(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
