"""The two modules the server leans on that may not be merged yet: tool-call parsing and prefix reuse of
model state. Each is imported when present; otherwise a stand-in that keeps the server correct (no tool
calls parsed, the answer stays content; no state reused, every prompt is fed whole)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

try:  # pragma: no cover - exercised once qwen35_lite/tool_calls.py is merged
    from ..tool_calls import ContentDelta, StreamingToolParser, ToolCall, ToolCallDelta, parse_tool_calls
except ImportError:

    @dataclass
    class ToolCall:  # type: ignore[no-redef]
        id: str
        name: str
        arguments: str

    @dataclass
    class ContentDelta:  # type: ignore[no-redef]
        text: str

    @dataclass
    class ToolCallDelta:  # type: ignore[no-redef]
        index: int
        id: str | None = None
        name: str | None = None
        arguments: str = ""

    def parse_tool_calls(text: str, tools: list[dict] | None) -> tuple[str, list[ToolCall]]:  # type: ignore[misc]
        return text, []

    class StreamingToolParser:  # type: ignore[no-redef]
        def __init__(self, tools) -> None:
            self.tools = tools

        def feed(self, text: str) -> list:
            return [ContentDelta(text)] if text else []

        def finish(self) -> list:
            return []


try:  # pragma: no cover - exercised once qwen35_lite/state_cache.py is merged
    from ..state_cache import PrefixCache

    REUSES_STATE = True
except ImportError:
    REUSES_STATE = False

    class PrefixCache:  # type: ignore[no-redef]
        """Keeps nothing: every match misses."""

        def __init__(self, max_bytes: int, max_entries: int = 16) -> None:
            self.max_bytes, self.max_entries = max_bytes, max_entries

        def match(self, ids: list[int], key: str = ""):
            return None, 0

        def save(self, ids: list[int], cache, key: str = "") -> None:
            pass


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


__all__ = [
    "REUSES_STATE",
    "ContentDelta",
    "PrefixCache",
    "StreamingToolParser",
    "ToolCall",
    "ToolCallDelta",
    "new_call_id",
    "parse_tool_calls",
]
