"""MCP servers for the model's tool calls, through the official `mcp` SDK: started, listed, called, stopped.

The SDK is asynchronous and the model runs in the main thread, so the clients live on an event loop in a
thread of their own (an anyio blocking portal). Each server is one task there that holds its `Client` open
until it is told to stop; the main thread waits on futures, in short steps, so a Ctrl+C (the `cancel`
event), a timeout or a crash ends a call at once: the call's task is cancelled (the SDK sends the server
`notifications/cancelled`) and the result is an error for the model, never an exception for the chat.

Stdio servers run in a session of their own (no terminal Ctrl+C reaches them), with only their config's
`env` over the SDK's few safe variables, and their stderr in a log file (its last line explains a failed
start). `close()` stops them all (stdin closed, then SIGTERM, then SIGKILL, each bounded by the SDK).
"""

from __future__ import annotations

import base64
import binascii
import concurrent.futures
import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .mcp_config import ServerConfig

MAX_TOOL_CHARS = 200_000  # a tool's text beyond this is cut (and the context cuts it further, tool_loop)
MAX_IMAGE_BYTES = 20 << 20  # an image part larger than this is dropped with a note
START_TIMEOUT_MIN = 30.0  # a server gets at least this long to start (npx/uvx may install it first)
POLL_S = 0.05
IMAGE_TYPES = {"image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp", "image/gif": ".gif"}

logging.getLogger("mcp").addHandler(logging.NullHandler())  # the SDK's own logging never reaches the chat
logging.getLogger("mcp").propagate = False


class ToolCallCancelled(Exception):
    """The user stopped a running call (Ctrl+C): the turn ends."""


@dataclass
class McpTool:
    name: str  # as the model sees it: the server's name for it, prefixed by the server's where names clash
    server: str
    remote: str  # the server's own name for it
    description: str | None
    schema: dict

    def openai(self) -> dict:
        """The OpenAI-style function the chat template is given (MCP's inputSchema → parameters)."""
        function: dict[str, Any] = {"name": self.name}
        if self.description:
            function["description"] = self.description
        function["parameters"] = self.schema
        return {"type": "function", "function": function}


@dataclass
class ToolOutput:
    """What a call gave back, as the model will read it."""

    text: str
    images: list[Path] = field(default_factory=list)  # image parts, saved as files for the vision tower
    is_error: bool = False
    notes: list[str] = field(default_factory=list)  # what was cut or dropped, for the user (also in text)


@dataclass
class ServerState:
    config: ServerConfig
    status: str = "starting"  # starting | ready | failed | crashed | stopped
    error: str = ""
    tools: list[McpTool] = field(default_factory=list)
    client: Any = None
    stop: Any = None  # anyio.Event, set (on the portal) to stop the server
    life: concurrent.futures.Future | None = None
    log: Path | None = None


class McpHub:
    """The servers of one `--mcp` file, for the life of a chat (or a run)."""

    def __init__(
        self,
        configs: list[ServerConfig],
        timeout: float = 60.0,
        image_dir: Path | None = None,
        reserved_names: tuple[str, ...] = (),
    ) -> None:
        self.configs, self.timeout = configs, timeout
        self.image_dir = image_dir or tool_image_dir()
        # Names taken already (--tools): an MCP tool of one of these names is prefixed by its server's.
        self.reserved = set(reserved_names)
        self.servers: dict[str, ServerState] = {}
        self._portal_cm = None
        self.portal = None
        self._logs = tempfile.TemporaryDirectory(prefix="qwen35-lite-mcp-")

    # --- life ---------------------------------------------------------------------------------------
    def start(self, on_server: Callable[[ServerState], None] | None = None) -> None:
        """Start every server at once and wait for each (a failure is its state, never raised)."""
        from anyio.from_thread import start_blocking_portal

        if self.portal is None:
            self._portal_cm = start_blocking_portal()
            self.portal = self._portal_cm.__enter__()
        states = [ServerState(c) for c in self.configs]
        ready = {}
        for state in states:
            self.servers[state.config.name] = state
            ready[state.config.name] = concurrent.futures.Future()
            state.life = self.portal.start_task_soon(self._lifetime, state, ready[state.config.name])
        deadline = time.monotonic() + max(self.timeout, START_TIMEOUT_MIN)
        for state in states:
            self._wait_ready(state, ready[state.config.name], deadline)
            if on_server is not None:
                on_server(state)
        self._name_tools()

    def _wait_ready(self, state: ServerState, ready: concurrent.futures.Future, deadline: float) -> None:
        try:
            ready.result(timeout=max(0.0, deadline - time.monotonic()))
        except concurrent.futures.TimeoutError:
            state.life.cancel()
            self._fail(state, f"did not answer within {max(self.timeout, START_TIMEOUT_MIN):.0f} s")
        except Exception as e:  # the server's own failure, whatever the SDK raised for it
            self._fail(state, _reason(e))

    def _fail(self, state: ServerState, reason: str) -> None:
        state.status, state.tools = "failed", []
        state.error = reason + _last_log_line(state.log)

    async def _lifetime(self, state: ServerState, ready: concurrent.futures.Future) -> None:
        """One server's task: connect, list its tools, then hold the connection until told to stop."""
        import anyio

        state.stop = anyio.Event()
        try:
            async with contextlib.AsyncExitStack() as stack:
                state.client = await stack.enter_async_context(self._client(state, stack))
                state.tools = await _list_tools(state.client, state.config.name)
                state.status = "ready"
                ready.set_result(True)
                await state.stop.wait()
        except BaseException as e:  # noqa: BLE001 (a failed start: told to the main thread, which waits)
            if not ready.done():
                ready.set_exception(e if isinstance(e, Exception) else RuntimeError("cancelled"))
            if not isinstance(e, Exception):
                raise
        finally:
            if state.status == "ready":
                state.status = "stopped"

    def _client(self, state: ServerState, stack: contextlib.AsyncExitStack):
        from mcp import Client, StdioServerParameters
        from mcp.client.stdio import stdio_client
        from mcp.client.streamable_http import streamable_http_client

        cfg = state.config
        if cfg.url:
            from mcp.shared._httpx_utils import create_mcp_http_client

            http = create_mcp_http_client(headers=cfg.headers or None)
            stack.push_async_callback(http.aclose)
            transport = streamable_http_client(cfg.url, http_client=http)
        else:
            state.log = Path(self._logs.name) / f"{cfg.name}.log"
            errlog = stack.enter_context(open(state.log, "w", encoding="utf-8", errors="replace"))
            params = StdioServerParameters(
                command=cfg.command, args=list(cfg.args), env=dict(cfg.env) or None, cwd=cfg.cwd
            )
            transport = stdio_client(params, errlog=errlog)
        return Client(transport, mode="legacy", client_info=_client_info(), cache=None)

    def close(self) -> None:
        """Stop every server and the event loop; children are gone when this returns (bounded waits)."""
        if self.portal is None:
            return
        for state in self.servers.values():
            self._stop(state)
        for state in self.servers.values():
            with contextlib.suppress(Exception):
                state.life.result(timeout=10)
        with contextlib.suppress(Exception):  # a task still running now is cancelled, not waited for
            self.portal.call(self.portal.stop, True)
        with contextlib.suppress(Exception):
            self._portal_cm.__exit__(None, None, None)
        self.portal = self._portal_cm = None
        self._logs.cleanup()

    def _stop(self, state: ServerState) -> None:
        if state.life is None or state.life.done():
            return
        if state.stop is not None:
            with contextlib.suppress(Exception):
                self.portal.call(state.stop.set)
        else:  # still starting
            state.life.cancel()

    def reload(
        self, configs: list[ServerConfig], on_server: Callable[[ServerState], None] | None = None
    ) -> None:
        """Stop every server, then start those of `configs` (the file read again)."""
        for state in self.servers.values():
            self._stop(state)
        for state in self.servers.values():
            with contextlib.suppress(Exception):
                state.life.result(timeout=10)
        self.configs, self.servers = configs, {}
        self.start(on_server)

    def __enter__(self) -> McpHub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- tools --------------------------------------------------------------------------------------
    def _name_tools(self) -> None:
        """A tool keeps the server's name for it unless another server (or --tools) has one of that name;
        then every tool of that name is `server_name`."""
        counts: dict[str, int] = {}
        for state in self.servers.values():
            for tool in state.tools:
                counts[tool.remote] = counts.get(tool.remote, 0) + 1
        for state in self.servers.values():
            for tool in state.tools:
                clash = counts[tool.remote] > 1 or tool.remote in self.reserved
                tool.name = f"{state.config.name}_{tool.remote}" if clash else tool.remote

    def tools(self) -> list[McpTool]:
        return [t for s in self.servers.values() if s.status in ("ready", "crashed") for t in s.tools]

    def openai_tools(self) -> list[dict]:
        return [t.openai() for t in self.tools()]

    def find(self, name: str) -> McpTool | None:
        return next((t for t in self.tools() if t.name == name), None)

    # --- calls --------------------------------------------------------------------------------------
    def call(
        self,
        tool: McpTool,
        arguments: dict,
        cancel: threading.Event | None = None,
        timeout: float | None = None,
    ) -> ToolOutput:
        """Run one call; every failure of the server is an error output. Raises ToolCallCancelled when
        `cancel` is set while it runs."""
        state = self.servers.get(tool.server)
        if state is None or state.status != "ready":
            why = state.error if state is not None and state.error else "it is not running"
            return _error(f"the MCP server {tool.server!r} cannot run this call: {why}")
        timeout = self.timeout if timeout is None else timeout
        future = self.portal.start_task_soon(state.client.call_tool, tool.remote, arguments)
        try:
            result = self._wait(future, cancel, time.monotonic() + timeout)
        except TimeoutError:
            return _error(f"the call timed out after {timeout:g} s (--tool-timeout)")
        except ToolCallCancelled:
            raise
        except Exception as e:  # the connection closed (crash), a result the SDK could not read, ...
            return self._call_failed(state, e)
        try:
            return self.convert(result)
        except Exception as e:  # a result of a shape we cannot read: malformed
            return _error(f"the server sent a result that could not be read: {_reason(e)}")

    @staticmethod
    def _wait(future: concurrent.futures.Future, cancel: threading.Event | None, deadline: float) -> Any:
        """The call's result, in short waits so Ctrl+C and the deadline act at once; the call's task is
        cancelled on every way out but its result (a second Ctrl+C included)."""
        try:
            while True:
                try:
                    return future.result(timeout=POLL_S)
                except concurrent.futures.TimeoutError:
                    if cancel is not None and cancel.is_set():
                        raise ToolCallCancelled() from None
                    if time.monotonic() >= deadline:
                        raise TimeoutError() from None
                except concurrent.futures.CancelledError:
                    raise ToolCallCancelled() from None
        finally:
            future.cancel()  # a no-op once it is done

    def _call_failed(self, state: ServerState, e: Exception) -> ToolOutput:
        if callable(getattr(e, "errors", None)) and hasattr(e, "error_count"):  # pydantic: a malformed result
            first = e.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ()))
            return _error(
                f"the server's result does not follow the MCP protocol ({where}: {first.get('msg')})"
            )
        reason = _reason(e)
        if "connection closed" in reason.lower() or not _alive(state):
            state.status, state.error = (
                "crashed",
                "the server stopped during a call" + _last_log_line(state.log),
            )
            return _error(f"the MCP server {state.config.name!r} stopped during the call ({reason})")
        return _error(f"the call failed: {reason}")

    def convert(self, result: Any) -> ToolOutput:
        """A CallToolResult → text (text parts joined), images saved as files, notes on what was dropped."""
        texts, images, notes = [], [], []
        for part in getattr(result, "content", None) or []:
            kind = getattr(part, "type", None)
            if kind == "text":
                texts.append(str(part.text))
            elif kind == "image":
                path, note = self._save_image(part)
                if path is not None:
                    images.append(path)
                if note:
                    notes.append(note)
            elif kind == "resource":
                resource = part.resource
                text = getattr(resource, "text", None)
                texts.append(text if isinstance(text, str) else f"[resource {resource.uri}]")
            elif kind == "resource_link":
                texts.append(f"[resource link {part.uri}]")
            else:
                notes.append(f"a {kind or 'nameless'} part was dropped (only text and images are read)")
        structured = getattr(result, "structured_content", None)
        if not texts and not images and structured is not None:
            texts.append(json.dumps(structured, ensure_ascii=False))
        text = "\n".join(texts)
        if len(text) > MAX_TOOL_CHARS:
            notes.append(f"the output was cut to {MAX_TOOL_CHARS} of {len(text)} characters")
            text = text[:MAX_TOOL_CHARS]
        text += "".join(f"\n[{n}]" for n in notes)
        return ToolOutput(text, images, bool(getattr(result, "is_error", False)), notes)

    def _save_image(self, part: Any) -> tuple[Path | None, str]:
        """An image part → a file named by its content (so a saved chat finds it again), or a note."""
        suffix = IMAGE_TYPES.get(str(getattr(part, "mime_type", "")).lower())
        if suffix is None:
            return None, f"an image of type {getattr(part, 'mime_type', '?')} was dropped"
        try:
            data = base64.b64decode(part.data, validate=True)
        except (binascii.Error, ValueError, TypeError):
            return None, "an image that is not base64 was dropped"
        if len(data) > MAX_IMAGE_BYTES:
            return None, f"an image of {len(data)} bytes was dropped (over {MAX_IMAGE_BYTES} bytes)"
        path = self.image_dir / (hashlib.sha256(data).hexdigest()[:32] + suffix)
        try:
            self.image_dir.mkdir(parents=True, exist_ok=True)
            if not path.is_file():
                tmp = path.with_suffix(path.suffix + f".{os.getpid()}.tmp")
                tmp.write_bytes(data)
                os.replace(tmp, path)
        except OSError as e:
            return None, f"an image could not be kept ({e.strerror or e})"
        return path, ""


def tool_image_dir() -> Path:
    """Where the images of tool results are kept, by content: the cache directory (they stay readable for
    `/load` in a later chat)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "qwen35-lite" / "tool-images"


def _error(text: str) -> ToolOutput:
    return ToolOutput(text, is_error=True)


async def _list_tools(client: Any, server: str) -> list[McpTool]:
    tools, cursor = [], None
    for _ in range(100):  # pages: a server that never ends its listing cannot hang the start
        page = await client.list_tools(cursor=cursor)
        for t in page.tools:
            schema = t.input_schema if isinstance(t.input_schema, dict) else {"type": "object"}
            tools.append(McpTool(t.name, server, t.name, t.description, schema))
        cursor = page.next_cursor
        if not cursor:
            break
    return tools


def _client_info() -> Any:
    from mcp.types import Implementation

    from .. import __version__

    return Implementation(name="qwen35-lite", version=__version__)


def _alive(state: ServerState) -> bool:
    return state.life is not None and not state.life.done()


def _reason(e: BaseException) -> str:
    """An exception in one short line (an exception group: its first leaf)."""
    while isinstance(getattr(e, "exceptions", None), tuple) and e.exceptions:  # an ExceptionGroup
        e = e.exceptions[0]
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, FileNotFoundError) and e.filename:
        text = f"no such program: {e.filename}"
    return text if len(text) <= 300 else text[:297] + "..."


def _last_log_line(log: Path | None) -> str:
    """`: ` + the last line the server wrote on stderr, when there is one (why it failed, usually)."""
    if log is None:
        return ""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, os.path.getsize(log) - 4096))
            lines = [ln for ln in f.read().decode("utf-8", "replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return f" (its stderr: {printable(lines[-1].strip())[:300]})" if lines else ""


_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """Text safe to show on a terminal: control, format (bidi) and line/paragraph separator characters
    written as \\uXXXX, as JSON would; nothing else changes."""
    return "".join(
        f"\\u{ord(c):04x}" if _UNSAFE.match(c) or unicodedata.category(c) in ("Cf", "Zl", "Zp") else c
        for c in text
    )
