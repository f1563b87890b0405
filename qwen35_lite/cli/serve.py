"""`qwen35-lite serve`: load the model once (the same plan as `run`) and answer the OpenAI API over HTTP.
`register(app)` adds the command to the Typer app."""

from __future__ import annotations

import importlib
import ipaddress
import json
import logging
import os
import socket
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from ..errors import InputError
from ..plan.options import EngineOptions
from .errors import friendly_errors
from .options import Model, check_load_flags, flag_groups, timed_load
from .tools import flowed_help
from .ui import UI

SERVER = "Server"


def register(app: typer.Typer) -> None:
    """Add `serve` to `app`, with the same one-line error handling as `run` and `chat`."""
    app.command(help=flowed_help(serve))(friendly_errors(serve))


@flag_groups
def serve(
    model: Model,
    load: EngineOptions,
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
    allowed_local_media_path: Annotated[
        Path | None,
        typer.Option(
            "--allowed-local-media-path",
            metavar="DIR",
            help="A directory whose image files requests may name by path or file:// URL (checked after"
            " symlinks and .. are resolved). Without it, image_url takes data URLs only.",
            rich_help_panel=SERVER,
        ),
    ] = None,
    allowed_hosts: Annotated[
        list[str] | None,
        typer.Option(
            "--allowed-hosts",
            metavar="NAMES",
            help="Host header names answered besides localhost and the bound address (comma list or"
            " repeated; * for any). Others get 400 (DNS rebinding).",
            rich_help_panel=SERVER,
        ),
    ] = None,
    max_request_mb: Annotated[
        float,
        typer.Option(
            "--max-request-mb",
            metavar="MiB",
            min=0.001,
            help="Largest request body in MiB (413 above it); a data-URL image counts in it.",
            rich_help_panel=SERVER,
        ),
    ] = 20.0,
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
    think: Annotated[
        bool | None,
        typer.Option(
            "--think/--no-think",
            help="The template's enable_thinking for requests that do not set it (chat_template_kwargs, or"
            " reasoning.effort on /v1/responses). Default: the template's own (on).",
            rich_help_panel=SERVER,
            show_default=False,
        ),
    ] = None,
    chat_template_kwargs: Annotated[
        str | None,
        typer.Option(
            "--chat-template-kwargs",
            metavar="JSON",
            help="Default chat_template_kwargs, a JSON object (e.g. '{\"enable_thinking\": false}'); a"
            " request's own keys win.",
            rich_help_panel=SERVER,
        ),
    ] = None,
    cors_origins: Annotated[
        list[str] | None,
        typer.Option(
            "--cors-origins",
            metavar="ORIGINS",
            help="Browser origins allowed to call the API (CORS; comma list or repeated; * for any). Off by"
            " default.",
            rich_help_panel=SERVER,
        ),
    ] = None,
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions,
    /v1/responses, /v1/models).

    One generation runs at a time; other requests wait in order. Ctrl+C stops the server.
    """
    from ..server.app import create_app, run_server
    from ..server.guard import HostPolicy
    from ..server.media import allowed_dir

    load = replace(load, state_cache=state_cache)
    check_load_flags(load)
    defaults = template_defaults(chat_template_kwargs, think)
    origins = [o.strip() for item in cors_origins or () for o in item.split(",") if o.strip()]
    script = scripted_reply()
    check_address(host, port)  # before the load, which can take minutes
    media_dir = allowed_dir(allowed_local_media_path)
    ui = UI()
    engine, load_s = timed_load(ui, model, load)
    model_id = engine.model_dir.name if Path(model).expanduser().is_dir() else model
    app = create_app(
        engine,
        model_id,
        api_key,
        capacity=queue,
        state_bytes=engine.plan.kept_states,
        hosts=HostPolicy(host, allowed_hosts or ()),
        media_dir=media_dir,
        max_body=int(max_request_mb * 2**20),
        template_defaults=defaults,
        cors_origins=origins or None,
        script=script,
    )
    if not api_key and not _loopback(host):
        ui.note(f"warning: listening on {host} without --api-key: anyone who can reach this port can use it")
    ui.info(f"serving {model_id} on http://{host}:{port}/v1 (loaded in {load_s:.1f} s; Ctrl+C stops)")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run_server(app, host, port)


def template_defaults(kwargs: str | None, think: bool | None) -> dict:
    """--chat-template-kwargs parsed, with --think/--no-think as its enable_thinking."""
    try:
        defaults = json.loads(kwargs) if kwargs else {}
    except ValueError as e:
        raise InputError(f"--chat-template-kwargs is not valid JSON: {e}", "give a JSON object") from None
    if not isinstance(defaults, dict):
        raise InputError(
            "--chat-template-kwargs must be a JSON object", "e.g. '{\"enable_thinking\": false}'"
        )
    if think is not None:
        defaults["enable_thinking"] = think
    if not isinstance(defaults.get("enable_thinking", True), bool):
        raise InputError("--chat-template-kwargs: enable_thinking must be true or false", "or use --no-think")
    return defaults


TEST_SCRIPT = "QWEN35_LITE_TEST_SCRIPT"


def scripted_reply():
    """Tests only: QWEN35_LITE_TEST_SCRIPT=module:function names a function from a prompt's text to the
    reply's text, spoken instead of the model's tokens (server.worker.Script). Unset: None."""
    name = os.environ.get(TEST_SCRIPT)
    if not name:
        return None
    module, _, function = name.partition(":")
    try:
        return getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError, ValueError) as e:
        raise InputError(f"{TEST_SCRIPT}={name} cannot be loaded: {e}", "unset it: it is for tests") from None


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
