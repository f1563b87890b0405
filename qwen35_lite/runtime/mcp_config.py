"""The `--mcp` file: MCP servers in the shape Claude Desktop, Cursor and VS Code share, read and checked
before anything is started.

    {"mcpServers": {
        "files": {"command": "npx", "args": ["-y", "@modelcontextprotocol/server-filesystem", "/tmp"],
                  "env": {"KEY": "value"}, "cwd": "/tmp"},
        "web":   {"url": "http://127.0.0.1:8000/mcp", "headers": {"Authorization": "Bearer ..."}}
    }}

`servers` (VS Code's key) is read too. A server with `"disabled": true` is skipped; keys other tools add
(`autoApprove`, `timeout`, ...) are ignored, so one file serves them all. Each server's `env` is given to
that server's process alone, over the few variables the SDK passes on (PATH, HOME, ...).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError
from .user_files import MiB, read_user_file

MAX_CONFIG_BYTES = 1 * MiB
HINT = (
    'give {"mcpServers": {"NAME": {"command": "...", "args": [...], "env": {...}}}}'
    ' or {"mcpServers": {"NAME": {"url": "http://..."}}}'
)
NAME = re.compile(r"[A-Za-z0-9_-]+")


@dataclass(frozen=True)
class ServerConfig:
    name: str
    command: str | None = None  # stdio: the program, its arguments, its own environment and directory
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    url: str | None = None  # streamable HTTP
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def transport(self) -> str:
        return "http" if self.url else "stdio"

    @property
    def where(self) -> str:
        """What the server is, in one line: its URL, or its command line."""
        return self.url or " ".join([self.command or "", *self.args])


def read_config(path: Path) -> list[ServerConfig]:
    """The servers the file lists, in order; InputError naming the first problem."""
    raw = read_user_file(path, "the MCP config", MAX_CONFIG_BYTES, HINT)
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise InputError(f"the MCP config {path} is not JSON: {e}", HINT) from None
    return parse_config(data, str(path))


def parse_config(data: object, where: str = "the MCP config") -> list[ServerConfig]:
    if not isinstance(data, dict):
        raise InputError(f"{where} must hold a JSON object", HINT)
    servers = data.get("mcpServers", data.get("servers"))
    if not isinstance(servers, dict):
        raise InputError(f'{where} has no "mcpServers" object', HINT)
    configs = []
    for name, entry in servers.items():
        what = f"{where}: server {name!r}"
        if not NAME.fullmatch(name):
            raise InputError(f"{what}: a name is letters, digits, _ and -", "rename the server")
        if not isinstance(entry, dict):
            raise InputError(f"{what} is not an object", HINT)
        if entry.get("disabled") is True:
            continue
        configs.append(_server(name, entry, what))
    return configs


def _server(name: str, entry: dict, what: str) -> ServerConfig:
    kind = entry.get("type", entry.get("transport"))
    if "url" in entry:
        if kind not in (None, "http", "streamable-http", "streamableHttp", "streamable_http"):
            raise InputError(f"{what}: transport {kind!r} is not supported", "use streamable HTTP or stdio")
        url = entry["url"]
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise InputError(f"{what}: url must be an http:// or https:// address", HINT)
        return ServerConfig(name, url=url, headers=_strings(entry.get("headers", {}), f"{what}: headers"))
    if kind not in (None, "stdio"):
        raise InputError(f"{what}: transport {kind!r} needs a url", HINT)
    command = entry.get("command")
    if not isinstance(command, str) or not command.strip():
        raise InputError(f'{what} has neither "command" nor "url"', HINT)
    args = entry.get("args", [])
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise InputError(f"{what}: args must be a list of strings", HINT)
    cwd = entry.get("cwd")
    if cwd is not None and not isinstance(cwd, str):
        raise InputError(f"{what}: cwd must be a string", HINT)
    env = _strings(entry.get("env", {}), f"{what}: env")
    if any("\0" in s for s in (command, *args, *env, *env.values(), cwd or "")):
        raise InputError(f"{what}: a NUL byte in the command, its arguments or env", HINT)
    return ServerConfig(name, command=command, args=tuple(args), env=env, cwd=cwd)


def _strings(value: object, what: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise InputError(f"{what} must be an object of strings", HINT)
    return dict(value)
