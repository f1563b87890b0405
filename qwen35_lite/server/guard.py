"""What every request passes before the app sees it: a Host header this server answers to (a web page
that rebinds its own name to 127.0.0.1 sends its name, not ours), and a body no larger than the cap
(read in chunks and counted, so a huge body is refused before anything parses it).

A plain ASGI middleware, so streamed responses pass through untouched."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable

LOCAL_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
WILDCARDS = frozenset({"0.0.0.0", "::", ""})
DRAIN = 4  # a body over the cap is read on (and dropped) up to this many times the cap before the 413


def host_name(header: str) -> str:
    """The name in a Host header, without port or IPv6 brackets, lowercased ("[::1]:8000" -> "::1")."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    if header.count(":") == 1:  # name:port (a bare IPv6 address has several colons)
        header = header.partition(":")[0]
    return header.rstrip(".")  # "localhost." is localhost


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class HostPolicy:
    """Which Host headers are answered: localhost names, the bound address, and `allowed` ("*": any).

    Bound to a wildcard address (0.0.0.0, ::), any IP literal is answered as well: the machine has many
    addresses, and DNS rebinding always carries a name, never an address."""

    def __init__(self, bound: str, allowed: Iterable[str] = ()) -> None:
        names = {host_name(a) for item in allowed for a in item.split(",") if a.strip()}
        self.any = "*" in names
        self.bound = host_name(bound)
        self.names = LOCAL_NAMES | names | {self.bound}

    def allows(self, header: str | None) -> bool:
        if self.any:
            return True
        if not header:  # HTTP/1.0 without Host: no browser sends that
            return True
        name = host_name(header)
        return name in self.names or (self.bound in WILDCARDS and _is_ip(name))


class Guard:
    """ASGI middleware: 400 for a Host not in `hosts`, 413 for a body over `max_body` bytes."""

    def __init__(self, app, hosts: HostPolicy, max_body: int) -> None:
        self.app, self.hosts, self.max_body = app, hosts, max_body

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if not self.hosts.allows(headers.get("host")):
            message = (
                f"the Host header {headers.get('host')!r} is not one this server answers to (start it with"
                " --allowed-hosts NAME to allow a name it is reached by)"
            )
            scope.setdefault("state", {})["error"] = "host_not_allowed"  # for the request's log line
            return await _refuse(send, 400, message, "host_not_allowed")
        body = await self._read(receive)
        if body is None:
            scope.setdefault("state", {})["error"] = "request_too_large"
            return await _refuse(send, 413, self._too_large(), "request_too_large")
        return await self.app(scope, _replay(body, receive), send)

    def _too_large(self) -> str:
        return (
            f"the request body is over {self.max_body / 2**20:g} MiB (start the server with a larger"
            " --max-request-mb)"
        )

    async def _read(self, receive) -> list[dict] | None:
        """The body's messages, or None when they pass max_body (a chunked body declares no length, and
        a declared one can lie). What is over the cap is read and dropped, up to DRAIN times the cap, so
        the client, still sending, gets the 413 instead of a reset connection; nothing of it is kept."""
        messages, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None if size > self.max_body else [*messages, message]
            size += len(message.get("body", b""))
            if size <= self.max_body:
                messages.append(message)
            else:
                messages.clear()
            if not message.get("more_body", False) or size > DRAIN * self.max_body:
                return None if size > self.max_body else messages


def _replay(messages: list[dict], receive):
    """A receive that hands out the messages already read, then the client's own (its disconnect)."""
    pending = list(messages)

    async def replayed():
        return pending.pop(0) if pending else await receive()

    return replayed


async def _refuse(send, status: int, message: str, code: str) -> None:
    kind = "invalid_request_error"
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
