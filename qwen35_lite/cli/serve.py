"""`qwen35-lite serve`: load the model once (the same plan as `run`) and answer the OpenAI API over HTTP.
`register(app)` adds the command to the Typer app."""

from __future__ import annotations

import ipaddress
import logging
import socket
from pathlib import Path
from typing import Annotated

import typer

from ..errors import InputError
from .errors import friendly_errors
from .options import (
    CpuCompute,
    CpuExperts,
    CpuMem,
    CpuThreads,
    Ctx,
    Device,
    Dtype,
    GpuExperts,
    GpuMem,
    LoadFlags,
    Model,
    Offline,
    check_load_flags,
    pick,
    timed_load,
)
from .tools import flowed_help
from .ui import UI

SERVER = "Server"


def register(app: typer.Typer) -> None:
    """Add `serve` to `app`, with the same one-line error handling as `run` and `chat`."""
    app.command(help=flowed_help(serve))(friendly_errors(serve))


def serve(
    model: Model,
    host: Annotated[str, typer.Option(help="Address to bind.", rich_help_panel=SERVER)] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port.", rich_help_panel=SERVER)] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            envvar="QWEN35_LITE_API_KEY",
            help="Require Authorization: Bearer KEY.",
            rich_help_panel=SERVER,
        ),
    ] = None,
    queue: Annotated[
        int,
        typer.Option(
            min=1, help="Requests waiting or running before 503 Retry-After.", rich_help_panel=SERVER
        ),
    ] = 8,
    state_cache: Annotated[
        float | None,
        typer.Option(
            "--state-cache",
            min=0,
            help="GiB kept for model states of recent prompts and replies, on the model's device (reused by"
            " later requests); part of the memory plan, so the expert cache gets that much less."
            " Default: a quarter of what the budget leaves after the smallest expert cache, at most 2.",
            rich_help_panel=SERVER,
            show_default=False,
        ),
    ] = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    ctx: Ctx = None,
    offline: Offline = False,
    gpu_mem: GpuMem = None,
    cpu_mem: CpuMem = None,
    gpu_experts: GpuExperts = None,
    cpu_compute: CpuCompute = "auto",
    cpu_experts: CpuExperts = None,
    cpu_threads: CpuThreads = None,
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models).

    One generation runs at a time; other requests wait in order. Ctrl+C stops the server.
    """
    import uvicorn

    from ..server.app import create_app

    load = pick(LoadFlags, locals())
    check_load_flags(load)
    check_address(host, port)  # before the load, which can take minutes
    ui = UI()
    engine, load_s = timed_load(ui, load)
    model_id = engine.model_dir.name if Path(model).expanduser().is_dir() else model
    app = create_app(engine, model_id, api_key, capacity=queue, state_bytes=engine.plan.kept_states)
    if not api_key and not _loopback(host):
        ui.note(f"warning: listening on {host} without --api-key: anyone who can reach this port can use it")
    ui.info(f"serving {model_id} on http://{host}:{port}/v1 (loaded in {load_s:.1f} s; Ctrl+C stops)")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    uvicorn.run(app, host=host, port=port, log_level="warning")


def check_address(host: str, port: int) -> None:
    """Refuse an address this process cannot listen on (taken, or not this machine's) in one line."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            s.bind((host, port))
    except OSError as e:
        raise InputError(
            f"cannot listen on {host}:{port}: {e.strerror or e}",
            "pick another --port, or stop what is using it (or check --host)",
        ) from None


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
