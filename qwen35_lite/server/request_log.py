"""One log line per request. A generation writes its own line (tokens, speed, time to first token: app.py's
log_request, which calls mark_logged); every other request, a 4xx or 5xx included, gets this middleware's
line with its status and, for an error, its code or message. Times run from the request's arrival, which
this outermost middleware records."""

from __future__ import annotations

import logging
import time

from starlette.requests import Request

log = logging.getLogger("qwen35_lite.server")


def arrival(request: Request) -> float:
    """perf_counter() when the request reached the server (now, for a request that bypassed the log)."""
    return request.scope.get("state", {}).get("arrived", time.perf_counter())


def mark_logged(request: Request) -> None:
    """The request's line is written elsewhere: the middleware writes none."""
    request.scope.setdefault("state", {})["logged"] = True


def note_error(request: Request, what: str) -> None:
    """What went wrong, for the line (an error handler's code or message)."""
    request.scope.setdefault("state", {})["error"] = what


class RequestLog:
    """ASGI middleware: records the arrival time, and logs `METHOD PATH · STATUS [· error] · seconds` for
    each request whose line nobody else wrote."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})
        state["arrived"] = time.perf_counter()
        status = 500

        def write() -> None:
            if state.get("logged"):
                return
            state["logged"] = True
            error = state.get("error")
            log.info(
                "%s %s · %d%s · %.2f s",
                scope.get("method", ""),
                scope.get("path", ""),
                status,
                f" {error}" if error else "",
                time.perf_counter() - state["arrived"],
            )

        async def sending(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                write()  # before the last byte: a client that reads the answer finds the line written
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            write()
